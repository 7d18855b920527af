"""Tag sets and request queues: the setup half of ``block/blk-mq.c``.

Runs in the owner, before the CPU workers are forked, as the kernel's alloc/init phase:
:func:`alloc_tag_set` validates a tag set, maps CPUs to hardware queues and *declares*
its tags and request pool in a :class:`~mqrt.lib.shm.Layout`; :func:`init_queue`
declares a request queue's hctxs, ctxs and lists on it; :func:`init_shared`
initialises all of it in the arena once the arena exists.  The data path that then runs
on each CPU is :mod:`mqrt.block.blk_mq`.

Errors are :class:`~mqrt.block.blk_mq_structs.BlkMqError` naming what the kernel would
return (-EINVAL, -ENOMEM, -EBUSY) and the field at fault.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mqrt.block.blk_mq_cpumap import (
    HCTX_MAX_TYPES,
    HctxType,
    QueueMap,
    Topology,
    map_for,
    map_queues,
    queue_cpumasks,
)
from mqrt.block.blk_mq_structs import (
    HCTX,
    MAX_CTX_PER_HCTX,
    QUEUE,
    BlkMqError,
    RequestQueue,
    RqList,
    RqListSpec,
    TagSet,
    declare_rq_list,
    request_dtype,
)
from mqrt.block.blk_mq_tag import BLK_MQ_TAG_MIN, declare_tags, init_tags
from mqrt.block.blk_mq_types import (
    BLK_MQ_MAX_DEPTH,
    BlkMqFlag,
    BlkMqOps,
    QueueFlag,
)
from mqrt.lib.sbitmap import UINT_MAX
from mqrt.lib.shm import Arena, Layout

# -- tag sets (blk_mq_alloc_tag_set) -------------------------------------------------------


def _default_pool_limit() -> int:
    """How many bytes a request pool may take: a quarter of /dev/shm's free space."""
    import os

    try:
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize // 4
    except OSError:
        return 1 << 30


def _einval(msg: str) -> BlkMqError:
    return BlkMqError(f"EINVAL: {msg}")


def alloc_tag_set(tset: TagSet, layout: Layout, topology: Topology) -> TagSet:
    """blk_mq_alloc_tag_set(): validate, map CPUs to hardware queues and declare the
    tags and the request pool in ``layout``.  Raises :class:`BlkMqError` where the
    kernel returns -EINVAL or -ENOMEM; capped values are noted in ``tset.messages``."""
    if tset.tags:
        raise _einval(f"tag set {tset.name} is already allocated")
    if tset.nr_hw_queues < 1:
        raise _einval(f"nr_hw_queues must be >= 1, got {tset.nr_hw_queues}")
    if tset.queue_depth < 1:
        raise _einval(f"queue_depth must be >= 1, got {tset.queue_depth}")
    if tset.reserved_tags < 0:
        raise _einval(f"reserved_tags must be >= 0, got {tset.reserved_tags}")
    if tset.queue_depth < tset.reserved_tags + BLK_MQ_TAG_MIN:
        raise _einval(
            f"queue_depth must be >= reserved_tags + {BLK_MQ_TAG_MIN} "
            f"({tset.reserved_tags + BLK_MQ_TAG_MIN}), got {tset.queue_depth}"
        )
    if type(tset.ops).queue_rq is BlkMqOps.queue_rq:  # declared, not implemented
        raise _einval(f"{tset.ops.name}: ops.queue_rq is required")
    if (tset.ops.get_budget is None) != (tset.ops.put_budget is None):
        raise _einval(f"{tset.ops.name}: ops.get_budget and ops.put_budget go together")
    if not 0 <= tset.cmd_size <= 4096:
        raise _einval(f"cmd_size must be in 0..4096, got {tset.cmd_size}")
    if tset.timeout_ms < 0:
        raise _einval(f"timeout must be >= 0 ms, got {tset.timeout_ms}")
    if tset.queue_depth > BLK_MQ_MAX_DEPTH:
        tset.messages.append(f"blk-mq: reduced tag depth to {BLK_MQ_MAX_DEPTH}")
        tset.queue_depth = BLK_MQ_MAX_DEPTH
    if tset.nr_maps == 0:
        tset.nr_maps = 1
    elif not 1 <= tset.nr_maps <= HCTX_MAX_TYPES:
        raise _einval(f"nr_maps must be in 1..{HCTX_MAX_TYPES}, got {tset.nr_maps}")
    nr_cpus = topology.nr_cpus
    if tset.nr_maps == 1 and tset.nr_hw_queues > nr_cpus:
        tset.messages.append(
            f"blk-mq: nr_hw_queues capped at {nr_cpus} (nr_cpu_ids) from {tset.nr_hw_queues}"
        )
        tset.nr_hw_queues = nr_cpus
    tset.nr_cpus = nr_cpus
    tset.topology = topology
    tset.map = [QueueMap(nr_queues=tset.nr_hw_queues) for _ in range(tset.nr_maps)]
    _update_queue_map(tset)
    _alloc_map_and_rqs(tset, layout)
    return tset


def _update_queue_map(tset: TagSet) -> None:
    """blk_mq_update_queue_map(): the driver's map_queues, or the default map."""
    if tset.nr_maps == 1:
        tset.map[HctxType.DEFAULT].nr_queues = tset.nr_hw_queues
    if tset.ops.map_queues is not None:
        tset.ops.map_queues(tset)
    else:
        if tset.nr_maps > 1:
            raise _einval(f"{tset.ops.name}: nr_maps > 1 needs ops.map_queues")
        map_queues(tset.map[HctxType.DEFAULT], tset.topology)
    for i, qmap in enumerate(tset.map):
        if qmap.nr_queues and len(qmap.mq_map) != tset.nr_cpus:
            raise _einval(f"{tset.ops.name}: map {HctxType(i).name} maps no CPUs")
        for cpu, hctx in enumerate(qmap.mq_map):
            if not 0 <= hctx < tset.nr_hw_queues:
                raise _einval(
                    f"{tset.ops.name}: map {HctxType(i).name} sends CPU {cpu} to hctx {hctx}, "
                    f"outside 0..{tset.nr_hw_queues - 1}"
                )


def _alloc_map_and_rqs(tset: TagSet, layout: Layout) -> None:
    """blk_mq_alloc_map_and_rqs() for every hctx (or the shared tags), halving the
    depth while the request pool does not fit the memory limit."""
    limit = tset.pool_limit_bytes if tset.pool_limit_bytes is not None else _default_pool_limit()
    rq_dtype = request_dtype(tset.cmd_size)
    nr_tags_sets = 1 if tset.shared_tags else tset.nr_hw_queues
    depth = tset.queue_depth
    while nr_tags_sets * tset.queue_depth * rq_dtype.itemsize > limit:
        tset.queue_depth >>= 1
        if tset.queue_depth < tset.reserved_tags + BLK_MQ_TAG_MIN:
            tset.queue_depth = depth
            raise BlkMqError(
                f"ENOMEM: blk-mq: failed to allocate request map: {nr_tags_sets} x "
                f"{rq_dtype.itemsize}-byte requests do not fit {limit} bytes at any depth"
            )
    if depth != tset.queue_depth:
        tset.messages.append(f"blk-mq: reduced tag depth ({depth} -> {tset.queue_depth})")
    round_robin = bool(tset.flags & BlkMqFlag.TAG_RR)
    for i in range(nr_tags_sets):
        name = f"{tset.name}.shared_tags" if tset.shared_tags else f"{tset.name}.tags{i}"
        tset.tags.append(
            declare_tags(
                layout,
                name,
                i,
                tset.queue_depth,
                tset.reserved_tags,
                tset.nr_cpus,
                i * tset.queue_depth,
                round_robin=round_robin,
                generation=tset.generation,
            )
        )
    tset.rq_region = layout.add(f"{tset.name}.rqs", rq_dtype, nr_tags_sets * tset.queue_depth)


def free_tag_set(tset: TagSet) -> None:
    """blk_mq_free_tag_set(): forget the tags; the arena's owner frees the memory."""
    if tset.tag_list:
        raise BlkMqError(f"EBUSY: tag set {tset.name} still has queues: clean them up first")
    tset.tags.clear()
    tset.map.clear()
    tset.rq_region = None


# -- request queues (blk_mq_init_queue) ---------------------------------------------------


def init_queue(
    tset: TagSet,
    layout: Layout,
    index: int,
    name: str,
    *,
    queuedata: Any = None,
    rq_affinity: int = 1,
    nomerges: int = 0,
    async_depth: int = 0,
) -> RequestQueue:
    """blk_mq_init_queue(): ctxs, hctxs and the ctx -> hctx map (blk_mq_map_swqueue),
    declared in ``layout``; a second queue on the set turns on TAG_QUEUE_SHARED.
    ``async_depth`` limits writes to a shallow depth of the tag map, as mq-deadline
    does (its tags then declare it as their min_shallow_depth)."""
    if not tset.tags:
        raise _einval(f"tag set {tset.name} is not allocated")
    if rq_affinity not in (0, 1, 2):
        raise _einval(f"rq_affinity must be 0, 1 or 2, got {rq_affinity}")
    if nomerges not in (0, 1, 2):
        raise _einval(f"nomerges must be 0, 1 or 2, got {nomerges}")
    if not 0 <= async_depth <= tset.queue_depth:
        raise _einval(f"async_depth must be in 0..{tset.queue_depth}, got {async_depth}")
    # A request records its queue and hctx in 16-bit fields whose low byte the hot
    # paths read (blk_mq_structs.REQUEST).
    if not 0 <= index <= 255:
        raise _einval(f"queue index must be in 0..255, got {index}")
    if tset.nr_hw_queues > 256:
        raise _einval(f"nr_hw_queues must be <= 256, got {tset.nr_hw_queues}")
    q = RequestQueue(tset, index, name, queuedata, rq_affinity, nomerges)
    q.async_depth = async_depth
    q.nr_hw_queues = tset.nr_hw_queues
    nr_cpus = tset.nr_cpus
    # blk_mq_map_swqueue(): each ctx's hctx per type; each hctx's cpumask and ctxs.
    q.ctx_hctx = [[map_for(tset.map, cpu, HctxType(t)) for t in HctxType] for cpu in range(nr_cpus)]
    q.hctx_type = [HctxType.DEFAULT] * q.nr_hw_queues
    masks: list[set[int]] = [set() for _ in range(q.nr_hw_queues)]
    for t, qmap in enumerate(tset.map):
        if not qmap.nr_queues:
            continue
        for h, cpus in enumerate(queue_cpumasks(qmap, q.nr_hw_queues)):
            if cpus:
                masks[h].update(cpus)
                q.hctx_type[h] = HctxType(t)
    q.hctx_cpus = [sorted(m) for m in masks]
    q.hctx_ctxs = [sorted(m) for m in masks]
    for h, ctxs in enumerate(q.hctx_ctxs):
        if len(ctxs) > MAX_CTX_PER_HCTX:
            raise _einval(f"hctx {h} has {len(ctxs)} ctxs, at most {MAX_CTX_PER_HCTX}")
    prefix = f"{name}"
    q.header = layout.add(f"{prefix}.queue", QUEUE)
    q.hctx_region = layout.add(f"{prefix}.hctx", HCTX, q.nr_hw_queues)
    depth = tset.queue_depth
    pool = len(tset.tags) * depth
    q.dispatch = [
        declare_rq_list(
            layout, f"{prefix}.hctx{h}.dispatch", depth if not tset.shared_tags else pool
        )
        for h in range(q.nr_hw_queues)
    ]
    q.ctx_lists = []
    for cpu in range(nr_cpus):
        lists: list[RqListSpec | None] = []
        for t in range(HCTX_MAX_TYPES):
            tmap = tset.map[t] if t < tset.nr_maps else None
            if tmap is None or not tmap.nr_queues:
                lists.append(None)  # aliases DEFAULT
            else:
                lists.append(declare_rq_list(layout, f"{prefix}.cpu{cpu}.rq_list{t}", pool))
        q.ctx_lists.append(lists)
    q.requeue_list = declare_rq_list(layout, f"{prefix}.requeue_list", pool)
    for h in range(q.nr_hw_queues):  # blk_mq_init_hctx(): ->init_hctx for each hctx
        try:
            tset.ops.init_hctx(q, h)
        except Exception as exc:
            raise BlkMqError(f"EFAULT: {name}: init_hctx failed for hctx {h}: {exc}") from exc
    # blk_mq_add_queue_tag_set(): a second user makes the set shared.
    tset.tag_list.append(q)
    if len(tset.tag_list) > 1:
        tset.flags |= BlkMqFlag.TAG_QUEUE_SHARED
    return q


def init_sq_queue(
    ops: BlkMqOps, queue_depth: int, layout: Layout, topology: Topology, name: str = "sq0"
) -> RequestQueue:
    """blk_mq_init_sq_queue(): a tag set of one hw queue and a queue on it."""
    tset = TagSet(ops=ops, nr_hw_queues=1, queue_depth=queue_depth, name=f"{name}.set")
    alloc_tag_set(tset, layout, topology)
    return init_queue(tset, layout, 0, name)


def cleanup_queue(q: RequestQueue) -> None:
    """blk_cleanup_queue(): detach from the tag set; the last-but-one user leaving
    turns TAG_QUEUE_SHARED off again."""
    tset = q.tag_set
    if q in tset.tag_list:
        tset.tag_list.remove(q)
    if len(tset.tag_list) <= 1:
        tset.flags &= ~BlkMqFlag.TAG_QUEUE_SHARED


def init_shared(arena: Arena, queues: list[RequestQueue], seed: int = 0) -> None:
    """Owner only: initialise every tag set and queue in the arena."""
    seen: set[int] = set()
    for q in queues:
        tset = q.tag_set
        if id(tset) not in seen:
            seen.add(id(tset))
            # blk_mq_set_min_shallow_depth(): the scheduler's shallowest write limit.
            shallow = min(
                (x.async_depth for x in queues if x.tag_set is tset and x.async_depth),
                default=UINT_MAX,
            )
            for i, spec in enumerate(tset.tags):
                init_tags(arena, spec, seed + 2 * i, shallow)
            v = arena.view(tset.rq_region)  # type: ignore[arg-type]
            v[:] = np.zeros(1, v.dtype)
            for rq_id in range(len(v)):
                tset.ops.init_request(rq_id)
            del v
        v = arena.view(q.header)
        flags = 0
        if q.rq_affinity >= 1:
            flags |= 1 << QueueFlag.SAME_COMP
        if q.rq_affinity == 2:
            flags |= 1 << QueueFlag.SAME_FORCE
        v["queue_flags"] = flags
        del v
        for list_spec in [*q.dispatch, q.requeue_list, *(s for ls in q.ctx_lists for s in ls)]:
            if list_spec is not None:
                RqList.init(arena, list_spec)

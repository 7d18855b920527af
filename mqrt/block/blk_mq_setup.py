"""Tag sets and request queues: the setup half of ``block/blk-mq.c``.

Runs in the owner, before the CPU workers are forked, as the kernel's alloc/init phase:
:func:`alloc_tag_set` validates a tag set, maps CPUs to hardware queues, allocates its
request pool (calling ``->init_request`` for every request) and *declares* its tags
and the pool's place in a :class:`~mqrt.lib.shm.Layout`; :func:`init_queue` declares a
request queue's hctxs, ctxs and lists on it (calling ``->init_hctx`` for every hctx);
:func:`init_shared` initialises all of it in the arena once the arena exists, moving
each pool there with what the driver wrote in it.  The data path that then runs on
each CPU is :mod:`mqrt.block.blk_mq`.  Tear-down is :func:`cleanup_queue` (drained
queues only; ``->exit_hctx``) then :func:`free_tag_set` (``->exit_request``).

Errors are :class:`~mqrt.block.blk_mq_structs.BlkMqError` naming what the kernel would
return (-EINVAL, -ENOMEM, -EBUSY, -EEXIST) and the field at fault; none of these
paths lets another exception out (a driver's op raising anything but MemoryError is a
driver bug, and propagates).

Deviations from Linux
    * The request pool is allocated before the arena exists: the owner holds it in an
      anonymous mapping (:class:`~mqrt.block.blk_mq_structs.RqPool`) from
      ``alloc_tag_set`` until ``init_shared`` copies it into the arena.
    * The memory limit is emulated (``TagSet.pool_limit_bytes``, by default a quarter
      of /dev/shm's free space); a real allocation failure counts the same.
    * Queue ids come from an ida of the layout (one per run), not a system-wide one,
      so a run's queues are numbered 0, 1, ... and index per-CPU tables; a queue
      driven through a queue table of its own (nvme's admin_q) numbers from its own
      ida (``init_queue(..., id_space=...)``).
    * Every emulated CPU is on NUMA node 0 (``numa_node`` of a mapped hctx).

Shared tags (BLK_MQ_F_TAG_HCTX_SHARED) follow ``TagSet.shared_tag_model``: "6.x"
allocates one tags and one request pool of queue_depth for the set
(``set->shared_tags``, Linux 5.16+); "5.10" allocates a tags and a pool of
queue_depth per hctx, as without the flag, then points their bitmaps at the set's
(blk_mq_init_shared_sbitmap()), so 4 hctxs of depth 64 have 256 requests on 64 tags,
and the depth halving on a failed allocation counts every hctx's pool.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from mqrt.block.blk_mq_cpumap import HCTX_MAX_TYPES, HctxType, QueueMap, Topology, map_queues
from mqrt.block.blk_mq_map import map_swqueue, publish_map
from mqrt.block.blk_mq_structs import (
    CTX_MAP_SHIFT,
    HCTX,
    MQ_MAP,
    QUEUE,
    QUEUE_OFF_FREEZE_WQ,
    RQ_ALLOCATED,
    RQ_NO_TAG,
    RQ_OFF_INTERNAL_TAG,
    RQ_OFF_TAG,
    RQ_U16_LIMIT,
    SHARED_TAG_MODELS,
    BlkMqError,
    HwCtxSpec,
    RequestQueue,
    RqList,
    RqListSpec,
    RqPool,
    TagSet,
    declare_rq_list,
    request_dtype,
)
from mqrt.block.blk_mq_tag import BLK_MQ_TAG_MIN, declare_tags, init_tags, share_sbitmap
from mqrt.block.blk_mq_types import (
    BLK_MQ_MAX_DEPTH,
    BLK_MQ_NO_HCTX_IDX,
    BLKDEV_DEFAULT_RQ,
    QUEUE_FLAG_MQ_DEFAULT,
    BlkMqFlag,
    BlkMqOps,
    QueueFlag,
)
from mqrt.block.elevator import ElevatorError, elevator_init, elevator_init_mq
from mqrt.block.mq_deadline import DeadlineData, async_depth_for
from mqrt.lib.percpu_ref import PercpuRef
from mqrt.lib.sbitmap import UINT_MAX, Sbitmap
from mqrt.lib.shm import Arena, Layout
from mqrt.lib.wait import WaitQueue

#: The layout's id space for request queues (the kernel's blk_queue_ida).
QUEUE_IDA = "blk_queue"

# -- errors ---------------------------------------------------------------------------------


if TYPE_CHECKING:
    from mqrt.block.blk_mq import Pools


def _einval(msg: str) -> BlkMqError:
    return BlkMqError(f"EINVAL: {msg}")


def errno_name(err: int) -> str:
    """``-ENOMEM`` (or ``ENOMEM``) as its name, e.g. for a driver op's return value."""
    return errno.errorcode.get(abs(err), f"errno {abs(err)}")


def _call_op(fn: Callable[..., Any], *args: Any) -> int:
    """Call a driver's set-up op: its return value (0 or -errno); a MemoryError
    raised inside it is -ENOMEM (BlkMqOps's failure convention)."""
    try:
        ret = fn(*args)
    except MemoryError:
        return -errno.ENOMEM
    return int(ret or 0)


# -- tag sets (blk_mq_alloc_tag_set) -------------------------------------------------------


def _default_pool_limit() -> int:
    """How many bytes a request pool may take: a quarter of /dev/shm's free space."""
    import os

    try:
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize // 4
    except OSError:
        return 1 << 30


def alloc_tag_set(tset: TagSet, layout: Layout, topology: Topology) -> TagSet:
    """blk_mq_alloc_tag_set(): validate, map CPUs to hardware queues, allocate the
    request pool (->init_request for each request) and declare the tags and the
    pool in ``layout``.  Raises :class:`BlkMqError` where the kernel returns -EINVAL
    or -ENOMEM (the set is then left unallocated); capped values are noted in
    ``tset.messages``."""
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
    if tset.shared_tag_model not in SHARED_TAG_MODELS:
        raise _einval(
            f"shared_tag_model must be one of {', '.join(SHARED_TAG_MODELS)}, "
            f"got {tset.shared_tag_model!r}"
        )
    if f"{tset.name}.rqs" in layout.regions:
        raise BlkMqError(f"EEXIST: a tag set named {tset.name} is already declared")
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
    if tset.nr_hw_queues > RQ_U16_LIMIT:  # a request's hctx field is 16 bits
        raise _einval(f"nr_hw_queues must be <= {RQ_U16_LIMIT}, got {tset.nr_hw_queues}")
    if tset.max_hw_queues:
        if tset.nr_maps != 1:
            raise _einval(
                f"max_hw_queues needs a single queue map (nr_maps 1), got nr_maps {tset.nr_maps}"
            )
        if not tset.nr_hw_queues <= tset.max_hw_queues <= nr_cpus:
            raise _einval(
                f"max_hw_queues must be in {tset.nr_hw_queues}..{nr_cpus} (nr_hw_queues.."
                f"nr_cpu_ids), got {tset.max_hw_queues}"
            )
    tset.nr_cpus = nr_cpus
    tset.topology = topology
    tset.map = [QueueMap(nr_queues=tset.nr_hw_queues) for _ in range(tset.nr_maps)]
    try:
        update_queue_map(tset)
        _alloc_map_and_rqs(tset, layout)
    except BlkMqError:
        tset.map = []  # out_free_mq_map
        raise
    tset.map_region = layout.add(f"{tset.name}.mq_map", MQ_MAP)
    tset.map_cpus = layout.add(f"{tset.name}.mq_map.cpus", "<i4", nr_cpus)
    return tset


def update_queue_map(tset: TagSet) -> None:
    """blk_mq_update_queue_map(): the driver's ->map_queues on maps cleared first
    (blk_mq_clear_mq_map(): every CPU to hctx 0), or the default map.  A map the
    driver refuses or leaves unusable is -EINVAL."""
    if tset.nr_maps == 1:
        tset.map[HctxType.DEFAULT].nr_queues = tset.nr_hw_queues
    name = tset.ops.name
    if tset.ops.map_queues is not None:
        for qmap in tset.map:
            qmap.mq_map[:] = [0] * tset.nr_cpus
        try:
            tset.ops.map_queues(tset)
        except ValueError as exc:  # a QueueMap or map_queues() refusing the driver's values
            raise _einval(f"{name}: ->map_queues: {exc}") from None
    else:
        if tset.nr_maps > 1:
            raise _einval(f"{name}: nr_maps > 1 needs ops.map_queues")
        map_queues(tset.map[HctxType.DEFAULT], tset.topology)
    if tset.map[HctxType.DEFAULT].nr_queues < 1:
        raise _einval(f"{name}: map DEFAULT has no queues (every CPU needs a DEFAULT hctx)")
    for i, qmap in enumerate(tset.map):
        if qmap.nr_queues and len(qmap.mq_map) != tset.nr_cpus:
            raise _einval(
                f"{name}: map {HctxType(i).name} maps {len(qmap.mq_map)} CPUs, not {tset.nr_cpus}"
            )
        for cpu, hctx in enumerate(qmap.mq_map):
            if not 0 <= hctx < tset.nr_hw_queues:
                raise _einval(
                    f"{name}: map {HctxType(i).name} sends CPU {cpu} to hctx {hctx}, "
                    f"outside 0..{tset.nr_hw_queues - 1}"
                )


def _tags_hctx_idx(tset: TagSet, i: int) -> int:
    """The hctx_idx ->init_request and ->exit_request get for the requests of
    ``tset.tags[i]``: BLK_MQ_NO_HCTX_IDX for 6.x shared tags (they serve every
    hctx); hctx ``i`` otherwise (5.10's shared sbitmap included)."""
    return BLK_MQ_NO_HCTX_IDX if tset.single_tags else i


def _hw_queue_to_node(tset: TagSet, hctx_idx: int) -> int:
    """blk_mq_hw_queue_to_node() on the DEFAULT map, or the set's node: every
    emulated CPU is on node 0."""
    if hctx_idx != BLK_MQ_NO_HCTX_IDX and hctx_idx in tset.map[HctxType.DEFAULT].mq_map:
        return 0
    return tset.numa_node


def _alloc_map_and_rqs(tset: TagSet, layout: Layout) -> None:
    """blk_mq_alloc_map_and_requests(): allocate every hctx's requests (or the 6.x
    shared tags'), halving the depth while an allocation fails, then declare the tags
    and the pool's region in ``layout``.  With 5.10's shared sbitmap every hctx has
    requests of its own, so the halving counts nr_hw_queues pools, and the set's
    bitmaps are declared at the depth it ended at (blk_mq_init_shared_sbitmap() runs
    after blk_mq_alloc_map_and_requests())."""
    limit = tset.pool_limit_bytes if tset.pool_limit_bytes is not None else _default_pool_limit()
    rq_dtype = request_dtype(tset.cmd_size)
    nr_tags_sets = 1 if tset.single_tags else tset.nr_declared_hctxs
    depth = tset.queue_depth
    while True:
        pool, why = _alloc_rq_maps(tset, rq_dtype, nr_tags_sets, limit)
        if pool is not None:
            break
        tset.queue_depth >>= 1
        if tset.queue_depth < tset.reserved_tags + BLK_MQ_TAG_MIN:
            tset.queue_depth = depth
            raise BlkMqError(f"ENOMEM: blk-mq: failed to allocate request map: {why}")
    if depth != tset.queue_depth:
        tset.messages.append(f"blk-mq: reduced tag depth ({depth} -> {tset.queue_depth})")
    round_robin = bool(tset.flags & BlkMqFlag.TAG_RR)
    shared = None
    if tset.shared_sbitmap:  # blk_mq_init_shared_sbitmap()
        shared = declare_tags(
            layout,
            f"{tset.name}.shared_sbitmap",
            0,
            tset.queue_depth,
            tset.reserved_tags,
            tset.nr_cpus,
            0,
            round_robin=round_robin,
            generation=tset.generation,
        )
    tset.shared_sbitmap_tags = shared
    for i in range(nr_tags_sets):
        if shared is not None:
            tset.tags.append(share_sbitmap(shared, i, i * tset.queue_depth))
            continue
        name = f"{tset.name}.shared_tags" if tset.single_tags else f"{tset.name}.tags{i}"
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
    tset.rq_pool = pool


def _alloc_rq_maps(
    tset: TagSet, rq_dtype: np.dtype, nr_tags_sets: int, limit: int
) -> tuple[RqPool | None, str]:
    """__blk_mq_alloc_rq_maps() at the set's current depth: the pool, or None and
    why an allocation failed (what was allocated is freed again, ->exit_request
    included)."""
    depth = tset.queue_depth
    if depth - tset.reserved_tags < BLK_MQ_TAG_MIN:
        # blk_mq_init_tags(): no bitmap_tags of depth - reserved_tags can be allocated.
        capped = " (capped at BLK_MQ_MAX_DEPTH)" if depth == BLK_MQ_MAX_DEPTH else ""
        return None, f"{tset.reserved_tags} reserved tags leave no tag at depth {depth}{capped}"
    hctx_bytes = rq_dtype.itemsize * depth
    fit = min(nr_tags_sets, limit // hctx_bytes)  # hctxs whose requests fit the limit
    no_room = (
        f"{nr_tags_sets} x {depth} {rq_dtype.itemsize}-byte requests do not fit "
        f"{limit} bytes at any depth"
    )
    if not fit:
        return None, no_room
    try:
        pool = RqPool(f"{tset.name}.rqs", rq_dtype, fit * depth)
    except (MemoryError, OSError) as exc:  # mmap: ENOMEM
        return None, f"{fit * hctx_bytes} bytes of requests: {exc}"
    for i in range(nr_tags_sets):
        why = no_room if i >= fit else _alloc_rqs(tset, pool, i, depth)
        if why:
            for j in reversed(range(i)):  # out_unwind
                _free_rqs(tset, pool, j, depth)
            pool.release()
            return None, why
    return pool, ""


def _alloc_rqs(tset: TagSet, pool: RqPool, i: int, depth: int) -> str:
    """blk_mq_alloc_rqs() + blk_mq_init_request() for ``tset.tags[i]``'s requests:
    ->init_request on each, then MQ_RQ_IDLE.  On a failure the requests done so far
    are freed (->exit_request) and the reason returned; "" on success."""
    init = tset.ops.init_request
    if init is None:
        return ""  # the pool is zero-filled: every request IDLE
    hctx_idx = _tags_hctx_idx(tset, i)
    node = _hw_queue_to_node(tset, hctx_idx)
    first = i * depth
    for tag in range(depth):
        rq = pool.request(first + tag, tag)
        ret = _call_op(init, tset, rq, hctx_idx, node)
        if ret:
            _free_rqs(tset, pool, i, tag)
            return (
                f"{tset.ops.name}: init_request failed for request {tag} of tags {i} "
                f"at depth {depth} ({errno_name(ret)})"
            )
        pool.atomic.set(rq.base, 0)  # WRITE_ONCE(rq->state, MQ_RQ_IDLE)
    return ""


def _free_rqs(tset: TagSet, pool: RqPool, i: int, nr: int) -> None:
    """blk_mq_free_rqs(): ->exit_request for the first ``nr`` requests of
    ``tset.tags[i]`` (every one that was initialised)."""
    exit_request = tset.ops.exit_request
    if exit_request is None:
        return
    hctx_idx = _tags_hctx_idx(tset, i)
    first = i * tset.queue_depth
    for tag in range(nr):
        exit_request(tset, pool.request(first + tag, tag), hctx_idx)


def _free_map_and_rqs(tset: TagSet, i: int) -> None:
    """blk_mq_free_map_and_requests(): free ``tset.tags[i]`` and its requests.  Their
    memory stays in the layout (a declared layout does not shrink); nothing uses it."""
    if tset.tags[i] is None:
        return
    if tset.rq_pool is not None:
        _free_rqs(tset, tset.rq_pool, i, tset.queue_depth)
    tset.tags[i] = None


def free_tag_set(tset: TagSet) -> None:
    """blk_mq_free_tag_set(): free every tags and its requests (->exit_request for
    each) and the maps.  The arena's owner frees the memory itself.

    A set that still has queues is -EBUSY.  The seed's tear-down order (the tag set
    first, then blk_cleanup_queue()) works in the kernel only by luck: the queue's
    hctxs still point at the freed ``set->tags``, and blk_cleanup_queue() drains the
    queue and calls ->exit_hctx through the freed set, a use-after-free.  Here the
    queues must be cleaned up first."""
    if tset.tag_list:
        names = ", ".join(q.name for q in tset.tag_list)
        raise BlkMqError(
            f"EBUSY: tag set {tset.name} still has queues ({names}): cleanup_queue() them "
            "first (their hctxs use the set's tags and ops)"
        )
    for i in range(len(tset.tags)):
        _free_map_and_rqs(tset, i)
    if tset.rq_pool is not None:
        tset.rq_pool.release()
    tset.tags.clear()
    tset.shared_sbitmap_tags = None
    tset.map.clear()
    tset.rq_region = None
    tset.rq_pool = None


# -- request queues (blk_mq_init_queue) ---------------------------------------------------


def init_queue(
    tset: TagSet,
    layout: Layout,
    name: str,
    *,
    queuedata: Any = None,
    rq_affinity: int = 1,
    nomerges: int = 0,
    async_depth: int = 0,
    id_space: str = QUEUE_IDA,
    elevator: str = "none",
) -> RequestQueue:
    """blk_mq_init_queue(): a queue id (the layout's queue ida), hctxs set up by
    ->init_hctx (unwound with ->exit_hctx if one fails: -ENOMEM), ctxs and the ctx
    -> hctx map (blk_mq_map_swqueue(), which frees the tags and requests of an hctx
    no CPU maps), declared in ``layout``; a second queue on the set turns on
    TAG_QUEUE_SHARED.  ``async_depth`` limits writes to a shallow depth of the tag
    map, as mq-deadline does (its tags then declare it as their min_shallow_depth).
    ``id_space`` names the layout's ida the id comes from: :data:`QUEUE_IDA` for a
    run's queues; a queue that each process drives through a block layer of its own,
    alone in its queue table (nvme's admin_q), takes its id from a space of its own.
    ``elevator``: ``none``, ``mq-deadline`` or ``default`` (elevator_init_mq())."""
    if not tset.tags:
        raise _einval(f"tag set {tset.name} is not allocated")
    if rq_affinity not in (0, 1, 2):
        raise _einval(f"rq_affinity must be 0, 1 or 2, got {rq_affinity}")
    if nomerges not in (0, 1, 2):
        raise _einval(f"nomerges must be 0, 1 or 2, got {nomerges}")
    if not 0 <= async_depth <= tset.queue_depth:
        raise _einval(f"async_depth must be in 0..{tset.queue_depth}, got {async_depth}")
    if f"{name}.queue" in layout.regions:
        raise BlkMqError(f"EEXIST: a queue named {name} is already declared")
    try:
        chosen = elevator_init_mq(tset, elevator)
    except ElevatorError as exc:
        raise _einval(str(exc)) from None
    ida = layout.ida(id_space)
    qid = ida.alloc(0, RQ_U16_LIMIT - 1)  # a request's q field is 16 bits
    if qid < 0:  # blk_alloc_queue(): ida_simple_get() failed
        raise BlkMqError(f"ENOMEM: {name}: no free queue id ({errno_name(qid)})")
    q = RequestQueue(tset, qid, name, queuedata, rq_affinity, nomerges)
    q.ida = ida
    q.async_depth = async_depth
    q.elevator = chosen
    flags = tset.flags & ~BlkMqFlag.TAG_QUEUE_SHARED
    q.hctxs = [
        HwCtxSpec(h, q, HctxType.DEFAULT, [], _hw_queue_to_node(tset, h), flags)
        for h in range(tset.nr_declared_hctxs)
    ]
    map_swqueue(q)
    _init_hctxs(q)
    _declare_queue(q, layout)
    # blk_mq_add_queue_tag_set(): a second user makes the set shared.
    tset.tag_list.append(q)
    if len(tset.tag_list) > 1:
        _update_tag_set_shared(tset, True)
    # blk_mq_map_swqueue(): an hctx no CPU maps gets no tags; its own (not hctx 0's)
    # are freed with their requests.
    for h, hctx in enumerate(q.hctxs[: q.nr_hw_queues]):
        if not hctx.cpumask:
            if h and not tset.single_tags:
                _free_map_and_rqs(tset, h)
            hctx.tags = None
    return q


def _init_hctxs(q: RequestQueue) -> None:
    """blk_mq_realloc_hw_ctxs() -> blk_mq_init_hctx(): hctx->tags, then ->init_hctx
    for each hctx.  If one fails, the ones before it get ->exit_hctx, the queue id is
    given back, and the queue is -ENOMEM (blk_mq_init_allocated_queue())."""
    tset = q.tag_set
    init_hctx = tset.ops.init_hctx
    for h, hctx in enumerate(q.hctxs):
        hctx.tags = tset.tags_for(h)
        if init_hctx is None:
            continue
        ret = _call_op(init_hctx, hctx, tset.driver_data, h)
        if ret:
            exit_hctx = tset.ops.exit_hctx
            if exit_hctx is not None:
                for j in range(h):
                    exit_hctx(q.hctxs[j], j)
            q.ida.free(q.index)
            raise BlkMqError(f"ENOMEM: {q.name}: init_hctx failed for hctx {h} ({errno_name(ret)})")


def _declare_queue(q: RequestQueue, layout: Layout) -> None:
    """The queue's shared structures in ``layout``: its header, the hctxs (with their
    dispatch lists and ctx maps), each CPU's ctx lists, the requeue list."""
    tset = q.tag_set
    name = q.name
    q.header = layout.add(f"{name}.queue", QUEUE)
    q.hctx_region = layout.add(f"{name}.hctx", HCTX, len(q.hctxs))
    depth = tset.queue_depth
    # (or of one hctx's sched tags: the dispatch lists and the requeue list)
    nr_sched = 0 if tset.flags & BlkMqFlag.NO_SCHED else _nr_sched_rqs(tset)
    depth = max(depth, nr_sched)
    # A list holds requests of one hctx's tags (or of 6.x shared tags): at most depth.
    q.dispatch = [
        declare_rq_list(layout, f"{name}.hctx{h}.dispatch", depth) for h in range(len(q.hctxs))
    ]
    for h, hctx in enumerate(q.hctxs):
        # blk_mq_alloc_hctx(): sbitmap_init_node(&hctx->ctx_map, ..., ilog2(8)), sized
        # as blk_mq_map_swqueue()'s sbitmap_resize() leaves it (hctx->nr_ctx bits).
        # a set whose hctx count may change: room for every CPU's ctx
        nr_ctx = tset.nr_cpus if tset.resizable else hctx.nr_ctx
        hctx.ctx_map = Sbitmap.declare(
            layout, f"{name}.hctx{h}.ctx_map", max(1, nr_ctx), 1, shift=CTX_MAP_SHIFT
        )
    q.ctx_lists = []
    for cpu in range(tset.nr_cpus):
        lists: list[RqListSpec | None] = []
        for t in range(HCTX_MAX_TYPES):
            tmap = tset.map[t] if t < tset.nr_maps else None
            if tmap is None or not tmap.nr_queues:
                lists.append(None)  # aliases DEFAULT
            else:
                lists.append(
                    declare_rq_list(layout, f"{name}.cpu{cpu}.rq_list{t}", tset.queue_depth)
                )
        q.ctx_lists.append(lists)
    q.requeue_list = declare_rq_list(
        layout,
        f"{name}.requeue_list",
        max(len(tset.tags) * tset.queue_depth, len(q.hctxs) * nr_sched),
    )
    q.q_usage = PercpuRef.declare(layout, f"{name}.q_usage_counter", tset.nr_cpus)
    if not tset.flags & BlkMqFlag.NO_SCHED:
        # an elevator's data, sched tags and requests (a switch may come)
        _declare_sched(q, layout)


def _nr_sched_rqs(tset: TagSet) -> int:
    """q->nr_requests as blk_mq_init_sched() sets it: the depth of each sched tags."""
    return 2 * min(tset.queue_depth, BLKDEV_DEFAULT_RQ)


def _declare_sched(q: RequestQueue, layout: Layout) -> None:
    """blk_mq_sched_alloc_map_and_rqs() for every hctx up front (the arena cannot
    grow): each hctx's scheduler tags of ``2 * min(queue_depth, BLKDEV_DEFAULT_RQ)``
    (q->nr_requests at blk_mq_init_sched()) and their requests, ->init_request on
    each, numbered in the tag set's id space after its driver pool and the sched
    pools of the set's queues declared before; then mq-deadline's data for them."""
    tset = q.tag_set
    assert tset.rq_region is not None  # an allocated set
    nr = _nr_sched_rqs(tset)
    q.nr_sched_rqs = nr
    q.sched_rq_first = tset.rq_region.count + tset.sched_rqs
    count = len(q.hctxs) * nr  # every hctx the queue may have
    tset.sched_rqs += count
    pool = RqPool(f"{q.name}.sched_rqs", request_dtype(tset.cmd_size), count)
    init = tset.ops.init_request
    for h in range(len(q.hctxs)):
        for t in range(nr):
            rq = pool.request(h * nr + t, t)
            pool.atomic.set32(rq.base + RQ_OFF_TAG, RQ_NO_TAG)
            pool.atomic.set32(rq.base + RQ_OFF_INTERNAL_TAG, t)
            if init is not None:
                ret = _call_op(init, tset, rq, h, _hw_queue_to_node(tset, h))
                if ret:
                    pool.release()
                    raise BlkMqError(
                        f"ENOMEM: {q.name}: init_request failed for sched request {t} of "
                        f"hctx {h} ({errno_name(ret)})"
                    )
        q.sched_tags.append(
            declare_tags(
                layout,
                f"{q.name}.hctx{h}.sched_tags",
                h,
                nr,
                tset.reserved_tags,
                tset.nr_cpus,
                q.sched_rq_first + h * nr,
                generation=tset.generation,
            )
        )
    q.sched_pool = pool
    q.sched_region = layout.add(f"{q.name}.sched_rqs", pool.region.dtype, count)
    q.dd = DeadlineData.declare(layout, q.name, q.sched_rq_first + count)


def init_sq_queue(
    ops: BlkMqOps,
    queue_depth: int,
    set_flags: BlkMqFlag,
    layout: Layout,
    topology: Topology,
    name: str = "sq0",
) -> RequestQueue:
    """blk_mq_init_sq_queue(): a tag set of one hw queue (one map, NUMA_NO_NODE,
    ``set_flags``) and a queue on it; if the queue cannot be set up the set is freed
    again and the error raised."""
    tset = TagSet(
        ops=ops,
        nr_hw_queues=1,
        queue_depth=queue_depth,
        nr_maps=1,
        flags=set_flags,
        name=f"{name}.set",
    )
    alloc_tag_set(tset, layout, topology)
    try:
        return init_queue(tset, layout, name)
    except BlkMqError:
        free_tag_set(tset)
        raise


def requests_in_flight(q: RequestQueue) -> int:
    """How many of ``q``'s requests hold a tag: allocated and not yet ended
    (plugged, on a list, issued, or completed and not freed)."""
    pool = q.tag_set.rq_pool
    if pool is None:
        return 0
    r = pool.region
    v = np.ndarray((r.count,), dtype=r.dtype, buffer=pool.buf, offset=r.offset)
    try:
        return int(np.count_nonzero(((v["state"] & RQ_ALLOCATED) != 0) & (v["q"] == q.index)))
    finally:
        del v


def cleanup_queue(q: RequestQueue) -> None:
    """blk_cleanup_queue(): the queue must be drained; then ->exit_hctx for each hctx
    (blk_mq_exit_queue()), it leaves its tag set (the last-but-one user leaving turns
    TAG_QUEUE_SHARED off again) and gives its id back.  A second call does nothing.

    The kernel marks the queue dying and waits until its requests are done
    (blk_freeze_queue()).  Here the owner calls it when no CPU runs (before the CPUs
    start, or once they stopped), so nothing could finish a request: one still
    holding a tag (:func:`requests_in_flight`) makes it -EBUSY instead of a wait that
    never ends."""
    if q.dying:
        return
    tset = q.tag_set
    busy = requests_in_flight(q)
    if busy:
        raise BlkMqError(
            f"EBUSY: {q.name}: {busy} request(s) still in flight; "
            "the queue can only be cleaned up once they have ended"
        )
    q.dying = True
    exit_hctx = tset.ops.exit_hctx
    if exit_hctx is not None:
        for h, hctx in enumerate(q.hctxs):
            exit_hctx(hctx, h)
    if q in tset.tag_list:
        tset.tag_list.remove(q)
    if len(tset.tag_list) <= 1:  # blk_mq_del_queue_tag_set()
        _update_tag_set_shared(tset, False)
    q.ida.free(q.index)


def _update_tag_set_shared(tset: TagSet, shared: bool) -> None:
    """blk_mq_update_tag_set_shared(): BLK_MQ_F_TAG_QUEUE_SHARED on the set and on
    every hctx of its queues (queue_set_hctx_shared())."""
    flag = BlkMqFlag.TAG_QUEUE_SHARED
    tset.flags = tset.flags | flag if shared else tset.flags & ~flag
    for q in tset.tag_list:
        for hctx in q.hctxs:
            hctx.flags = hctx.flags | flag if shared else hctx.flags & ~flag


def teardown(queues: list[RequestQueue]) -> None:
    """A driver's remove path for a run's queues (null_del_dev(), nvme_remove()):
    cleanup_queue() each, last first, then free_tag_set() each tag set once no
    queue uses it.  Stops at the first error (EBUSY: requests still in flight),
    leaving the rest in place."""
    for q in reversed(queues):
        cleanup_queue(q)
    for tset in {id(q.tag_set): q.tag_set for q in queues}.values():
        if not tset.tag_list and tset.tags:
            free_tag_set(tset)


# -- the arena ------------------------------------------------------------------------------


def init_shared(arena: Arena, queues: list[RequestQueue], seed: int = 0) -> None:
    """Owner only: initialise every tag set and queue in the arena, moving each
    request pool there (with what ->init_request wrote in it).  ``queues`` are a
    run's, in q->id order (the position of a queue is its id: per-CPU tables use
    it)."""
    for pos, q in enumerate(queues):
        if q.index != pos:
            raise _einval(f"{q.name} has id {q.index} at position {pos}: pass queues in id order")
        if q.dying:
            raise _einval(f"{q.name} was cleaned up")
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
            if tset.shared_sbitmap_tags is not None:  # 5.10: the bitmaps every hctx uses
                init_tags(arena, tset.shared_sbitmap_tags, seed, shallow)
            else:
                for i, spec in enumerate(tset.tags):
                    if spec is not None:
                        init_tags(arena, spec, seed + 2 * i, shallow)
            assert tset.rq_pool is not None and tset.rq_region is not None  # allocated
            tset.rq_pool.move_to(arena, tset.rq_region)
            publish_map(arena.atomic, tset, 0)
        v = arena.view(q.header)
        flags = QUEUE_FLAG_MQ_DEFAULT
        if tset.nr_maps > HctxType.POLL and tset.map[HctxType.POLL].nr_queues:
            flags |= 1 << QueueFlag.POLL
        if q.rq_affinity == 0:  # queue/rq_affinity = 0
            flags &= ~(1 << QueueFlag.SAME_COMP)
        if q.rq_affinity == 2:
            flags |= 1 << QueueFlag.SAME_FORCE
        v["queue_flags"] = flags
        del v
        if q.sched_pool is not None:
            assert q.sched_region is not None  # declared with it
            q.sched_pool.move_to(arena, q.sched_region)
            shallow = async_depth_for(q.nr_sched_rqs) if q.elevator == "mq-deadline" else UINT_MAX
            for i, spec in enumerate(q.sched_tags):
                init_tags(arena, spec, seed + 7 + 2 * i, shallow)
        elevator_init(arena, q, q.elevator, q.nr_sched_rqs)
        PercpuRef.init(arena, q.q_usage)
        WaitQueue.init(arena, q.header.addr(0) + QUEUE_OFF_FREEZE_WQ)
        for hctx in q.hctxs:
            assert hctx.ctx_map is not None  # declared by init_queue
            Sbitmap.init(arena, hctx.ctx_map)
        for list_spec in [*q.dispatch, q.requeue_list, *(s for ls in q.ctx_lists for s in ls)]:
            if list_spec is not None:
                RqList.init(arena, list_spec)


def prepare_cpus(arena: Arena, queues: list[RequestQueue]) -> Pools:
    """Owner only, after :func:`init_shared` and before the CPUs fork: what every
    CPU's handles share, made once here and inherited through fork (a CPU's set-up
    is then O(its handles), not O(CPUs x hctxs) address arithmetic each): the
    offsets of every tags bitmap (:func:`mqrt.lib.sbitmap.addresses`), and the
    request pools' accessors by ``id(tag set)`` (:func:`mqrt.block.blk_mq.prepare_pools`;
    the owner releases its own with :func:`mqrt.block.blk_mq.release_pools`)."""
    from mqrt.block.blk_mq import prepare_pools
    from mqrt.lib.sbitmap import addresses

    for q in queues:
        tset = q.tag_set
        for spec in [*tset.tags, tset.shared_sbitmap_tags]:
            if spec is None:
                continue
            addresses(spec.bitmap_tags.sb)
            if spec.breserved_tags is not None:
                addresses(spec.breserved_tags.sb)
    return prepare_pools(arena, queues)

"""A tag set's CPU -> hctx map as its queues and every CPU use it: the
``blk_mq_map_swqueue()`` half of ``block/blk-mq.c`` (Linux 6.1) and the map's copy in
the arena.

The maps themselves (``set->map[]``) are computed by the driver's ``->map_queues`` or
:func:`mqrt.block.blk_mq_cpumap.map_queues`; :func:`map_swqueue` derives a queue's
ctx -> hctx table and each hctx's cpumask and ctxs from them, in the process that
calls it.  Since each process has its own copy of the tag set, a set whose hctx count
changes during a run (:mod:`mqrt.block.blk_mq_update`) keeps its DEFAULT map and
nr_hw_queues in the arena too (:data:`~mqrt.block.blk_mq_structs.MQ_MAP`), under a
generation: :func:`publish_map` writes it, :func:`read_map` reads it.
"""

from __future__ import annotations

from mqrt.block.blk_mq_cpumap import HctxType, map_for, queue_cpumasks
from mqrt.block.blk_mq_structs import RequestQueue, TagSet
from mqrt.lib._atomic import AtomicView


def map_swqueue(q: RequestQueue) -> None:
    """blk_mq_map_swqueue() from the set's maps: each ctx's hctx per type; each
    hctx's cpumask, type and ctxs (by index_hw).  Hctxs past ``nr_hw_queues`` (declared
    for a later blk_mq_update_nr_hw_queues()) map no CPU."""
    tset = q.tag_set
    q.nr_hw_queues = tset.nr_hw_queues
    nr = len(q.hctxs)
    q.ctx_hctx = [
        [map_for(tset.map, cpu, HctxType(t)) for t in HctxType] for cpu in range(tset.nr_cpus)
    ]
    q.hctx_type = [HctxType.DEFAULT] * nr
    masks: list[set[int]] = [set() for _ in range(nr)]
    for t, qmap in enumerate(tset.map):
        if not qmap.nr_queues:
            continue
        for h, cpus in enumerate(queue_cpumasks(qmap, nr)):
            if cpus:
                masks[h].update(cpus)
                q.hctx_type[h] = HctxType(t)
    q.hctx_cpus = [sorted(m) for m in masks]
    q.hctx_ctxs = [sorted(m) for m in masks]
    for h, hctx in enumerate(q.hctxs):
        hctx.type = q.hctx_type[h]
        hctx.cpumask = q.hctx_cpus[h]


def publish_map(a: AtomicView, tset: TagSet, gen: int) -> None:
    """Write the set's DEFAULT map and nr_hw_queues to the arena as generation
    ``gen`` (even): ``map_gen`` odd while the entries change, then ``gen`` with a
    release store, so a CPU that reads ``gen`` (acquire) reads the entries written
    before it (:func:`read_map`)."""
    assert tset.map_region is not None and tset.map_cpus is not None  # alloc_tag_set
    gen_off = tset.map_region.addr(0, "map_gen")
    a.store_release32(gen_off, gen - 1 if gen else 0)
    a.set32(tset.map_region.addr(0, "nr_hw_queues"), tset.nr_hw_queues)
    for cpu, h in enumerate(tset.map[HctxType.DEFAULT].mq_map):
        a.set32(tset.map_cpus.addr(cpu), h)
    a.store_release32(gen_off, gen)


def read_map(a: AtomicView, tset: TagSet) -> int:
    """The set's map as the arena has it, into this process's ``tset`` (nr_hw_queues,
    the DEFAULT map): its generation.  Read between two loads of ``map_gen`` that
    must agree and be even (a seqcount's read side)."""
    assert tset.map_region is not None and tset.map_cpus is not None  # alloc_tag_set
    gen_off = tset.map_region.addr(0, "map_gen")
    nr_off = tset.map_region.addr(0, "nr_hw_queues")
    cpus = tset.map_cpus
    while True:
        gen = a.load_acquire32(gen_off)
        if gen & 1:
            continue  # the writer is between its stores
        nr = a.read32(nr_off)
        mq_map = [a.read32(cpus.addr(cpu)) for cpu in range(tset.nr_cpus)]
        if a.load_acquire32(gen_off) == gen:
            break
    tset.nr_hw_queues = nr
    qmap = tset.map[HctxType.DEFAULT]
    qmap.nr_queues = nr
    qmap.mq_map[:] = mq_map
    return gen

"""Changing a tag set's hardware queue count under load: ``blk_mq_update_nr_hw_queues()``
(``__blk_mq_update_nr_hw_queues()`` of ``block/blk-mq.c``, Linux 6.1).

The sysfs writer (CPU 0's second task) runs it as a generator that yields where the
kernel's caller sleeps, in the kernel's order:

1. a count the set already has (one queue map) changes nothing: no freeze;
2. freeze every queue of the tag set (``set->tag_list``): no request is in flight
   once the freezes end, so none is left on a list of the old map;
3. quiesce them too (one grace period): no hctx run that began under the old map
   is left (see "the map" below);
4. switch their elevators to none, each saved by name (:func:`elevator_switch_none`);
5. ``set->nr_hw_queues = N``, ``blk_mq_update_queue_map()`` (the driver's
   ``->map_queues`` or the default ``blk_mq_map_queues()``),
   ``blk_mq_realloc_hw_ctxs()`` (the hctxs are declared up to the set's
   ``max_hw_queues``: a deactivated one goes idle on its tags), and
   ``blk_mq_map_swqueue()`` for each queue;
6. the elevators back, new instances with their default knobs
   (:func:`elevator_switch_back`); unquiesce, unfreeze.

**The map.** Each process has its own copy of the tag set, its queues and its
handles, so the CPU -> hctx map that every CPU must follow is in the arena
(``MQ_MAP`` of :mod:`mqrt.block.blk_mq_structs`: ``nr_hw_queues``, ``mq_map[cpu]``
and a generation, :func:`mqrt.block.blk_mq_map.publish_map`).  The writer stores
it while the set is frozen and quiesced, the generation last (release).  A CPU
compares the generation with its own where it enters a queue (after the
``q_usage_counter`` reference, so after the last unfreeze) and at the start of an hctx
run (inside the run's RCU read-side section, so after the quiesce's grace period or
waited for by it), and rebuilds its handles when it changed
(:meth:`mqrt.block.blk_mq.BlkMq.sync_map`).  Completions of requests of the old map
all happened before the freeze ended.

Deviations from Linux 6.1: the set is quiesced as well as frozen, as a later
upstream fix does too (with ``none`` as the elevator nothing quiesced the queues, so
a hw queue run could overlap the reallocation of the hctxs); here each CPU's view is
rebuilt from the arena, and the quiesce makes sure no hctx run of the old view
overlaps the new one; hctxs past ``nr_hw_queues`` are declared, with their tags
and requests, and set up by ``->init_hctx`` when the queue is (their ``driver_data``
must be inherited through fork), so the transition calls no driver set-up op; only
sets of one queue map (``nr_maps`` 1) change their count.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from mqrt.block import blk_mq_freeze as freeze
from mqrt.block.blk_mq_map import publish_map
from mqrt.block.blk_mq_setup import update_queue_map
from mqrt.block.blk_mq_structs import _INACTIVE, BlkMqError
from mqrt.block.blk_mq_types import HctxState
from mqrt.block.elevator import elevator_switch
from mqrt.lib.wait import WaitEvent

if TYPE_CHECKING:
    from mqrt.block.blk_mq import BlkMq
    from mqrt.block.blk_mq_structs import Queue

Update = Generator[WaitEvent, None, dict[str, Any]]


def elevator_switch_none(mq: BlkMq, queues: list[Queue]) -> list[str]:
    """blk_mq_elv_switch_none(): each queue's elevator, saved by name, then ``none``
    (the queues are frozen and quiesced: nothing is in an elevator)."""
    return [elevator_switch(x, "none", 0) for x in queues]


def elevator_switch_back(mq: BlkMq, queues: list[Queue], saved: list[str]) -> None:
    """blk_mq_elv_switch_back(): the saved elevators back on their queues, each a new
    instance with its default knobs, as the kernel's."""
    for x, name in zip(queues, saved, strict=True):
        elevator_switch(x, name, x.q.nr_sched_rqs)  # blk_mq_init_sched()'s nr_requests


def stranded(mq: BlkMq, queues: list[Queue]) -> int:
    """Requests on a list of the queues' hctxs or ctxs, and ctxs marked pending:
    what a frozen set must not have (each would be lost to the new map)."""
    n = 0
    for queue in queues:
        for hctx in queue.hctxs:
            n += len(hctx.dispatch) + len(hctx.busy_ctxs())
        n += sum(len(lst) for lst, _index_hw in queue.ctx_lists.values())
    return n


def remap(mq: BlkMq, queues: list[Queue], nr: int) -> int:
    """``set->nr_hw_queues = nr``, blk_mq_update_queue_map(), blk_mq_realloc_hw_ctxs()
    and blk_mq_map_swqueue() on the frozen, quiesced ``queues`` of one tag set; the
    map published in the arena.  A map the driver refuses (BlkMqError) leaves the
    previous count in place, as the kernel's fallback to prev_nr_hw_queues does, and
    the error goes on.  Returns the map's new generation."""
    queue = queues[0]
    tset = queue.tset
    before = tset.nr_hw_queues
    tset.nr_hw_queues = nr
    try:
        update_queue_map(tset)
    except BlkMqError:
        tset.nr_hw_queues = before
        update_queue_map(tset)
        raise
    for x in queues:  # blk_mq_realloc_hw_ctxs(): the hctxs past nr go idle
        for hctx in x.hctxs[nr:before]:
            if x.shared and hctx.tags is not None:
                hctx.tags.tag_idle(hctx.active_off, hctx.active_bit)
    gen = queue.map_gen + 2
    publish_map(mq.a, tset, gen)
    for x in queues:
        mq.remap(x, gen)
    hp = mq.hotplug
    if hp is not None:  # INACTIVE stays only where the new map leaves no online CPU
        a = mq.a
        for x in queues:
            for hctx in x.hctxs:
                if a.read(hctx.state_off) & _INACTIVE and (
                    not hctx.cpumask or any(hp.online(c) for c in hctx.cpumask)
                ):
                    a.clear_bit(hctx.state_off, HctxState.INACTIVE)
    return gen


def update_nr_hw_queues(mq: BlkMq, queue: Queue, nr: int, clock: Callable[[], int]) -> Update:
    """blk_mq_update_nr_hw_queues() on ``queue``'s tag set: its report (the queues,
    the count before and after, how long the freezes waited for the I/O in flight,
    how long the remap took, requests found on a list while frozen)."""
    tset = queue.tset
    if not tset.resizable:
        raise BlkMqError(
            f"EINVAL: {tset.name}: nr_hw_queues cannot change (no max_hw_queues declared)"
        )
    if not 1 <= nr <= tset.max_hw_queues:
        raise BlkMqError(f"EINVAL: {tset.name}: nr_hw_queues takes 1..{tset.max_hw_queues}")
    mq.sync_map(queue)  # the writer is the only one to change it: stable
    queues = freeze.tagset_queues(mq, queue)
    report: dict[str, Any] = {"queues": len(queues), "nr_hw_queues_before": tset.nr_hw_queues}
    if nr == tset.nr_hw_queues:  # one queue map and the same count: nothing to do
        report["nr_hw_queues"] = nr
        return report
    frozen: list[Queue] = []
    quiesced: list[Queue] = []
    t0 = clock()
    try:
        for x in queues:  # blk_mq_freeze_queue() on each of set->tag_list
            frozen.append(x)
            yield from freeze.freeze_queue_start(mq, x)
        for x in queues:
            yield from freeze.freeze_queue_wait(x)
        report["freeze_wait_ns"] = clock() - t0
        try:
            for x in queues:
                quiesced.append(x)
                freeze.quiesce_queue_nowait(mq, x)
            yield from freeze.wait_quiesce_done()
            saved = elevator_switch_none(mq, queues)
            try:  # a map the driver refuses keeps the old count, and the elevators
                t1 = clock()
                report["stranded"] = stranded(mq, queues)
                report["map_gen"] = remap(mq, queues, nr)
                report["remap_ns"] = clock() - t1
            finally:
                elevator_switch_back(mq, queues, saved)
            report["elevators"] = saved
        finally:
            freeze.unquiesce_tagset(mq, quiesced)
    finally:
        for x in frozen:
            freeze.unfreeze_queue(mq, x)
    report["nr_hw_queues"] = tset.nr_hw_queues
    return report

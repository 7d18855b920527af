"""Port of ``block/blk-mq-sched.c``: who decides what an hctx run dispatches, and
the elevator's part of insert and merge.

The dispatch list (``hctx->dispatch``, requests a driver refused before) always goes
first, marking SCHED_RESTART so the next completion reruns the queue.  Then, with an
elevator (mq-deadline, :mod:`mqrt.block.elevator`), requests the elevator hands out
(``__blk_mq_do_dispatch_sched``: while it has work, up to ``nr_requests`` a round, one
while the hctx is busy); without one, while the hctx is busy one request at a time
round robin over the ctxs (``blk_mq_do_dispatch_ctx``), otherwise every pending ctx's
list at once (``blk_mq_flush_busy_ctxs``).  ``blk_mq_dispatch_rq_list`` itself is in
:mod:`mqrt.block.blk_mq`, as in the kernel.

A request the elevator hands out takes its driver tag in ``dispatch_rq_list``
(``blk_mq_get_driver_tag``, after its budget); one that finds none waits on the
dispatch list (see :mod:`mqrt.block.elevator`).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from mqrt.block.blk_mq_structs import (
    RQ_EXTENT,
    RQ_OFF_OP,
    RQ_OFF_SECTOR,
    RQ_U16_CPU,
    RQ_U16_HCTX,
)
from mqrt.block.blk_mq_types import HctxState
from mqrt.block.mq_deadline import ElvMerge
from mqrt.lib import rcu

if TYPE_CHECKING:
    from mqrt.block.blk_mq import BlkMq
    from mqrt.block.blk_mq_structs import HwCtx, Queue


def dispatch_requests(mq: BlkMq, hctx: HwCtx) -> None:
    """__blk_mq_run_hw_queue(): :func:`sched_dispatch_requests` inside an RCU
    read-side section (hctx_lock()), so that once blk_mq_quiesce_queue() has set
    QUIESCED and waited for a grace period no dispatch is left running."""
    reader = rcu.reader
    reader.lock()
    try:
        sched_dispatch_requests(mq, hctx)
    finally:
        reader.unlock()


def sched_dispatch_requests(mq: BlkMq, hctx: HwCtx) -> None:
    """blk_mq_sched_dispatch_requests() with no elevator: the dispatch list first
    (marking SCHED_RESTART), then one ctx at a time while the hctx is busy, else
    every busy ctx at once."""
    if hctx.stopped() or hctx.queue.quiesced():
        return
    queue = hctx.queue
    if mq.a.read32(queue.map_gen_off) != queue.map_gen:
        mq.sync_map(queue)  # inside the run's RCU section: the map is stable
        if not hctx.cpumask:
            return  # no CPU maps it any more; its lists were empty when it lost them
    mq.stats["hctx_runs"] += 1
    hctx.stats["run"] += 1
    rq_list = hctx.dispatch.take() if not hctx.dispatch.empty() else []
    if rq_list:
        mq.a.set_bit(hctx.state_off, HctxState.SCHED_RESTART)  # mark_restart_hctx
        if not mq.dispatch_rq_list(hctx, rq_list):
            return
        need_dispatch = True
    else:
        need_dispatch = bool(hctx.dispatch_busy)
    if hctx.queue.elevator():
        do_dispatch_sched(mq, hctx)
        return
    if need_dispatch:
        do_dispatch_ctx(mq, hctx)
        return
    rq_list = flush_busy_ctxs(mq, hctx)
    if rq_list:
        mq.dispatch_rq_list(hctx, rq_list)


def flush_busy_ctxs(mq: BlkMq, hctx: HwCtx, max_per_ctx: int = -1) -> list[int]:
    """blk_mq_flush_busy_ctxs(): splice every pending ctx's list."""
    out: list[int] = []
    for index_hw in hctx.busy_ctxs():
        # The pending bit is cleared under the ctx's lock once its list is empty.
        out += hctx.ctx_lists[index_hw].take(max_per_ctx, partial(hctx.clear_pending, index_hw))
    return out


def do_dispatch_ctx(mq: BlkMq, hctx: HwCtx) -> None:
    """blk_mq_do_dispatch_ctx(): one request at a time, round robin over the ctxs
    from ``dispatch_from``; stop at the first the driver refuses (dispatch_rq_list
    has put it on ``hctx->dispatch`` and arranged the rerun)."""
    nr_ctx = len(hctx.ctx_lists)
    while True:
        rq_id = -1
        start = hctx.dispatch_from
        for index_hw in sorted(hctx.busy_ctxs(), key=lambda i: (i < start, i)):
            got = hctx.ctx_lists[index_hw].take(1, partial(hctx.clear_pending, index_hw))

            if got:
                rq_id = got[0]
                hctx.dispatch_from = (index_hw + 1) % nr_ctx  # round robin for fairness
                break
        if rq_id < 0 or not mq.dispatch_rq_list(hctx, [rq_id]):
            return


# -- with an elevator -------------------------------------------------------------------


def do_dispatch_sched(mq: BlkMq, hctx: HwCtx) -> None:
    """blk_mq_do_dispatch_sched(): rounds of __blk_mq_do_dispatch_sched() while they
    dispatch.  A round takes requests from the elevator while it has work and the
    dispatch list stays empty (something refused there goes first), up to
    ``nr_requests`` (1 while the hctx is busy); the elevator is the queue's, so a
    request may belong to another hctx of the queue, and each hctx's requests go to
    ``dispatch_rq_list`` on their own hctx, in the elevator's order."""
    queue = hctx.queue
    dd = queue.dd
    assert dd is not None  # an elevator is set only on a queue with its data
    buf16 = mq.buf16
    pool = mq.rqs[queue.index]
    clock = mq.clock
    while True:
        if not dd.has_work() or not hctx.dispatch.empty():
            return
        max_dispatch = 1 if hctx.dispatch_busy else dd.nr_requests()
        got = dd.dispatch_batch(clock(), max_dispatch)  # one hold of dd->lock
        if not got:
            return
        by_hctx: dict[int, list[int]] = {}
        for rq_id in got:
            h = buf16[(pool[rq_id].base >> 1) + RQ_U16_HCTX]
            by_hctx.setdefault(h, []).append(rq_id)
        # blk_mq_dispatch_hctx_list() for each hctx's requests, every one of them
        # (a refused hctx keeps the rest of its own on its dispatch list)
        done = [mq.dispatch_rq_list(queue.hctxs[h], rq_list) for h, rq_list in by_hctx.items()]
        if not all(done):
            return


def elv_insert_requests(mq: BlkMq, queue: Queue, rq_ids: list[int]) -> None:
    """blk_mq_sched_insert_requests() -> dd_insert_requests(): a flushed plug's
    requests of one queue, allocated with its elevator, in one hold of dd->lock."""
    dd = queue.dd
    assert dd is not None
    buf, buf16, pool = mq.buf, mq.buf16, mq.rq_base[queue.index]
    rqs = []
    for rq_id in rq_ids:
        base = pool[rq_id]
        sector, nr_sectors, _bios, _segs = RQ_EXTENT.unpack_from(buf, base + RQ_OFF_SECTOR)
        rqs.append((rq_id, buf[base + RQ_OFF_OP], sector, nr_sectors))
        queue.hctxs[buf16[(base >> 1) + RQ_U16_HCTX]].stats["queued"] += 1
    dd.insert_requests(rqs, False, mq.clock())


def elv_insert(mq: BlkMq, queue: Queue, rq_id: int, base: int, at_head: bool) -> None:
    """The elevator's insert (dd_insert_request()) of a request allocated with it:
    at the head of its dispatch list (a requeue), else by sector and deadline."""
    dd = queue.dd
    assert dd is not None  # RQF_ELV: allocated while the queue had an elevator
    buf = mq.buf
    sector, nr_sectors, _bios, _segs = RQ_EXTENT.unpack_from(buf, base + RQ_OFF_SECTOR)
    dd.insert(rq_id, buf[base + RQ_OFF_OP], sector, nr_sectors, at_head, mq.clock())
    queue.hctxs[mq.buf16[(base >> 1) + RQ_U16_HCTX]].stats["queued"] += 1


def elv_bio_merge(
    mq: BlkMq, queue: Queue, op: int, sector: int, nr_sectors: int, start_ns: int
) -> bool:
    """blk_mq_sched_bio_merge() -> dd_bio_merge(): under dd->lock, a request the
    elevator holds that ends where the bio starts (or starts where it ends) takes
    it (:meth:`~mqrt.block.blk_mq.BlkMq.bio_attempt_merge`: same op, the limits) and
    moves in the sort order if its start moved (dd_request_merged()).  Only a request
    this CPU submitted (its merged bios' chain is kept by its submitter)."""
    dd = queue.dd
    assert dd is not None
    pool = mq.rq_base[queue.index]
    buf16, cpu = mq.buf16, mq.cpu

    def mine(rq_id: int) -> bool:  # elv_bio_merge_ok(), and our chain's rule
        return buf16[(pool[rq_id] >> 1) + RQ_U16_CPU] == cpu

    dd.lock()
    try:
        kind, rq_id = dd.find_merge(op, sector, nr_sectors, mine)
        if kind == ElvMerge.NO_MERGE:
            return False
        if not mq.bio_attempt_merge(queue, rq_id, op, sector, nr_sectors, start_ns):
            return False
        new_sector, new_sectors, _bios, _segs = RQ_EXTENT.unpack_from(
            mq.buf, pool[rq_id] + RQ_OFF_SECTOR
        )
        dd.request_merged(rq_id, new_sector, new_sectors)
    finally:
        dd.unlock()
    mq.stats["elv_merges"] += 1
    return True

"""Port of ``block/blk-mq-sched.c`` for the ``none`` elevator: who decides what an
hctx run dispatches.

The dispatch list (``hctx->dispatch``, requests a driver refused before) always goes
first, marking SCHED_RESTART so the next completion reruns the queue; then, while the
hctx is busy, one request at a time round robin over the ctxs
(``blk_mq_do_dispatch_ctx``), otherwise every pending ctx's list at once
(``blk_mq_flush_busy_ctxs``).  ``blk_mq_dispatch_rq_list`` itself is in
:mod:`mqrt.block.blk_mq`, as in the kernel.

Deviations from Linux: no elevator, so no sched tags and no ``->dispatch_request``.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from mqrt.block.blk_mq_types import HctxState
from mqrt.lib import rcu

if TYPE_CHECKING:
    from mqrt.block.blk_mq import BlkMq
    from mqrt.block.blk_mq_structs import HwCtx


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

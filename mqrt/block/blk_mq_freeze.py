"""A request queue's transitions: freeze and quiesce (``blk_freeze_queue_start()``,
``blk_mq_freeze_queue_wait()``, ``blk_mq_unfreeze_queue()``,
``blk_mq_quiesce_queue()``, ``blk_mq_unquiesce_queue()``,
``blk_mq_quiesce_tagset()`` of ``block/blk-mq.c``, Linux 6.1).

The task that runs them is the sysfs writer (on CPU 0, beside that CPU's own task):
each is a generator that yields :class:`mqrt.lib.wait.WaitEvent` where the kernel's
caller sleeps, on the mq_freeze_wq of the queue or the grace period's wait queue.
``mq`` is the :class:`mqrt.block.blk_mq.BlkMq` of the writer's CPU.

*Freeze*: the first freeze kills ``q_usage_counter`` (:mod:`mqrt.lib.percpu_ref`),
lets an expedited grace period pass (:mod:`mqrt.lib.rcu`: every CPU that took a
reference on its own line before the kill has finished) and folds the per-CPU counts;
then the queue's hctxs run, so what waits on the ctx lists is dispatched, and the
freezer sleeps until the last reference is put (the request freed by whatever CPU
ends it wakes it).  New submitters sleep in ``blk_queue_enter()`` (on the same wait
queue) until the last unfreeze brings the counter back.

*Quiesce*: QUIESCED, then a grace period: every dispatch (an RCU read-side section
around the QUIESCED check and ``->queue_rq``, ``hctx_lock()``) that could have missed
the flag has ended, so no ``->queue_rq`` of the queue runs until the unquiesce.
Requests keep queueing meanwhile; the unquiesce runs the hw queues.  Both nest
(``mq_freeze_depth``, ``quiesce_depth``).
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import TYPE_CHECKING

from mqrt.block.blk_mq_types import QueueFlag
from mqrt.lib import rcu
from mqrt.lib.wait import WaitEvent

if TYPE_CHECKING:
    from mqrt.block.blk_mq import BlkMq
    from mqrt.block.blk_mq_structs import Queue

Transition = Generator[WaitEvent, None, None]


def _grace_period() -> Transition:
    reader = rcu.reader
    if not isinstance(reader, rcu.RcuReader):
        raise RuntimeError("a grace period needs the run's RCU state (rcu.install)")
    yield from rcu.synchronize_rcu_expedited(reader)


def freeze_queue_start(mq: BlkMq, queue: Queue) -> Transition:
    """blk_freeze_queue_start(): no new reference; what is queued is dispatched.
    Closed during its grace period (a stop), it gives the freeze up: the counter is
    live again and the submitters that saw it dying are woken."""
    if mq.a.fetch_add32(queue.freeze_depth_off, 1) == 0:
        ref = queue.q_usage
        ref.kill()
        try:
            yield from _grace_period()
        except GeneratorExit:
            ref.revive()
            mq.a.fetch_sub32(queue.freeze_depth_off, 1)
            queue.freeze_wq.wake_up_all()
            raise
        if ref.fold():
            queue.freeze_wq.wake_up_all()
        mq.run_hw_queues(queue, False)


def freeze_queue_wait(queue: Queue) -> Transition:
    """blk_mq_freeze_queue_wait(): until every reference is put."""
    ref = queue.q_usage
    if not ref.is_zero():
        yield WaitEvent(queue.freeze_wq_head, ref.is_zero)


def freeze_queue(mq: BlkMq, queue: Queue) -> Transition:
    """blk_mq_freeze_queue()."""
    yield from freeze_queue_start(mq, queue)
    yield from freeze_queue_wait(queue)


def unfreeze_queue(mq: BlkMq, queue: Queue) -> None:
    """blk_mq_unfreeze_queue(): the last unfreeze brings the counter back and wakes
    the submitters waiting to enter."""
    depth = mq.a.fetch_sub32(queue.freeze_depth_off, 1)
    if depth <= 0:
        raise RuntimeError(f"{queue.q.name}: unfreeze of a queue that is not frozen")
    if depth == 1:
        queue.q_usage.resurrect()
        queue.freeze_wq.wake_up_all()


def frozen(mq: BlkMq, queue: Queue) -> bool:
    return mq.a.read32(queue.freeze_depth_off) > 0


def quiesce_queue_nowait(mq: BlkMq, queue: Queue) -> None:
    """blk_mq_quiesce_queue_nowait(): the flag, without waiting."""
    if mq.a.fetch_add32(queue.quiesce_depth_off, 1) == 0:
        mq.a.set_bit(queue.flags_off, QueueFlag.QUIESCED)


def wait_quiesce_done() -> Transition:
    """blk_mq_wait_quiesce_done(): a grace period, after which no dispatch that could
    have missed QUIESCED is left running."""
    yield from _grace_period()


def quiesce_queue(mq: BlkMq, queue: Queue) -> Transition:
    """blk_mq_quiesce_queue(): once it returns, no ->queue_rq of the queue runs."""
    quiesce_queue_nowait(mq, queue)
    yield from _grace_period()


def unquiesce_queue(mq: BlkMq, queue: Queue) -> None:
    """blk_mq_unquiesce_queue(): the last one clears QUIESCED and runs the hw
    queues (asynchronously, on kblockd)."""
    depth = mq.a.fetch_sub32(queue.quiesce_depth_off, 1)
    if depth <= 0:
        raise RuntimeError(f"{queue.q.name}: unquiesce of a queue that is not quiesced")
    if depth == 1:
        mq.a.clear_bit(queue.flags_off, QueueFlag.QUIESCED)
        mq.run_hw_queues(queue, True)


def quiesce_tagset(mq: BlkMq, queues: Iterable[Queue]) -> Transition:
    """blk_mq_quiesce_tagset(): every queue of the tag set quiesced, with one grace
    period for all of them (blk_mq_wait_quiesce_done())."""
    for queue in queues:
        quiesce_queue_nowait(mq, queue)
    yield from _grace_period()


def unquiesce_tagset(mq: BlkMq, queues: Iterable[Queue]) -> None:
    """blk_mq_unquiesce_tagset()."""
    for queue in queues:
        unquiesce_queue(mq, queue)


def tagset_queues(mq: BlkMq, queue: Queue) -> list[Queue]:
    """The queues of ``queue``'s tag set that this CPU has (set->tag_list)."""
    return [x for x in mq.queues if x.tset is queue.tset]

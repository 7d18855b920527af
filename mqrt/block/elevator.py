"""The elevator core of ``block/elevator.c`` (Linux 6.1): which I/O schedulers exist,
which one a new queue gets, and switching a live queue from one to another.

Two elevators: ``none`` (no scheduler: requests go to the ctx lists or straight to the
driver) and ``mq-deadline`` (:mod:`mqrt.block.mq_deadline`).  A queue's elevator is the
``elevator`` word of its header (:data:`ELV_NONE`, :data:`ELV_MQ_DEADLINE`): every CPU
reads it while it holds a reference on ``q_usage_counter`` (a submitter) or an RCU
read-side section (a dispatcher), and it changes only with the queue frozen (no
request left, no submitter inside) and quiesced (no dispatch running), as
``elevator_switch()`` does it; so no request ever sees two elevators.

mq-deadline's data is declared for every queue of a set that may have an elevator
(not ``BLK_MQ_F_NO_SCHED``) when the queue is declared: the arena cannot grow, so a
switch only initialises it again (``elevator_init``: empty lists, the default knobs).

With an elevator a request has two tags (``blk-mq-sched.c``): at allocation a tag of
its hctx's scheduler tags (``hctx->sched_tags``, ``nr_requests`` deep: ``2 *
min(queue_depth, 128)`` when the elevator is set up), whose request of the queue's
sched pool (``rq->internal_tag``) mq-deadline orders, merges and expires; at dispatch
a driver tag (``blk_mq_get_driver_tag``, ``rq->tag``, ``tags->rqs[tag]``), given back
first when the request ends or goes back to the block layer.  ``async_depth`` is the
shallow depth of the scheduler tags that writes take, ``queue/nr_requests`` resizes
them.  The sched tags and pools are declared for every hctx up front like the data.

Deviations from Linux: the scheduler tags cannot grow past the depth they were
declared with (the kernel reallocates them up to ``MAX_SCHED_RQ``); with
``BLK_MQ_F_TAG_HCTX_SHARED`` each hctx still has scheduler tags of its own (6.1 shares
one per queue).  A bio merges through the elevator only into a request its own CPU
submitted (the merged bios' chain is kept by the request's submitter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mqrt.block.blk_mq_types import BlkMqFlag
from mqrt.block.mq_deadline import DeadlineData
from mqrt.lib.knobs import KnobError

if TYPE_CHECKING:
    from mqrt.block.blk_mq_structs import Queue, TagSet

ELV_NONE, ELV_MQ_DEADLINE = 0, 1
#: The registered elevators (elv_list), by name: their ids in the queue's word.
ELEVATORS: dict[str, int] = {"none": ELV_NONE, "mq-deadline": ELV_MQ_DEADLINE}
ELEVATOR_NAMES = {v: k for k, v in ELEVATORS.items()}
#: What ``--scheduler`` (and a job file's ``ioscheduler=``) takes.
SCHEDULER_CHOICES = (*ELEVATORS, "default")


class ElevatorError(KnobError):
    """An elevator a queue cannot have: one line naming it."""


def elevator_get_default(tset: TagSet) -> str:
    """elevator_get_default(): mq-deadline for a queue of one hardware queue (or of
    tags shared by every hctx), unless the set asks for none by default
    (``BLK_MQ_F_NO_SCHED_BY_DEFAULT``); none for a multi-queue device."""
    if tset.flags & BlkMqFlag.NO_SCHED_BY_DEFAULT:
        return "none"
    if tset.nr_hw_queues != 1 and not tset.flags & BlkMqFlag.TAG_HCTX_SHARED:
        return "none"
    return "mq-deadline"


def elevator_init_mq(tset: TagSet, choice: str) -> str:
    """elevator_init_mq(): the elevator a new queue of ``tset`` gets for ``choice``
    (``none``, ``mq-deadline``, or ``default``: the kernel's own choice); a
    ``BLK_MQ_F_NO_SCHED`` set's queues get none whatever was asked."""
    if choice not in SCHEDULER_CHOICES:
        raise ElevatorError(
            f"scheduler: must be one of {', '.join(SCHEDULER_CHOICES)}, got {choice!r}"
        )
    if tset.flags & BlkMqFlag.NO_SCHED:
        return "none"
    return elevator_get_default(tset) if choice == "default" else choice


def check_mode(choice: str, mode: str) -> None:
    """mq-deadline is a blk-mq elevator: ``--mode sq`` (one queue_lock, no elevator)
    and ``--mode raw`` (no block layer) refuse it."""
    if choice == "mq-deadline" and mode != "mq":
        raise ElevatorError(
            f"scheduler: mq-deadline needs --mode mq (--mode {mode} has no elevator)"
        )


def elevator_init(arena: Any, queue_spec: Any, name: str, nr_requests: int) -> None:
    """The owner, before the CPUs fork: the queue's elevator word and its
    mq-deadline data (dd_init_sched(), dd_depth_updated() for ``nr_requests``)."""
    dd = queue_spec.dd
    if name != "none" and dd is None:
        raise ElevatorError(f"scheduler: {queue_spec.name} takes no elevator (NO_SCHED)")
    if dd is not None:  # no lock taken: no other process exists yet
        DeadlineData.init(arena, dd, nr_requests)
    arena.atomic.set32(queue_spec.header.addr(0, "elevator"), ELEVATORS[name])


def _min_shallow_depth(queue: Queue, depth: int) -> None:
    """sbitmap_queue_min_shallow_depth() of the scheduler tags (dd_depth_updated()
    declares its async_depth to them), never raised: a smaller one stays."""
    for hctx in queue.hctxs:
        tags = hctx.sched_tags
        if tags is not None and depth < tags.bitmap_tags.min_shallow_depth:
            tags.bitmap_tags.set_min_shallow_depth(depth)


def resize_sched_tags(queue: Queue, nr: int) -> None:
    """blk_mq_update_nr_requests() with an elevator: each hctx's scheduler tags to
    ``nr`` (the depth they were declared with at most)."""
    for hctx in queue.hctxs:
        tags = hctx.sched_tags
        if tags is None:
            continue
        if nr <= tags.nr_reserved_tags or nr > tags.nr_tags:
            raise ElevatorError(
                f"nr_requests: must be in {tags.nr_reserved_tags + 1}..{tags.nr_tags} with "
                f"an elevator (its scheduler tags), got {nr}"
            )
        tags.bitmap_tags.resize(nr - tags.nr_reserved_tags)


def depth_updated(queue: Queue, nr_requests: int) -> None:
    """dd_depth_updated() for a new ``nr_requests`` (blk_mq_update_nr_requests()):
    ``async_depth`` from it, declared to the tags as their min_shallow_depth."""
    assert queue.dd is not None
    _min_shallow_depth(queue, queue.dd.depth_updated(nr_requests))


def store_iosched(queue: Queue, name: str, text: str) -> None:
    """A write to ``queue/iosched/<name>`` of a queue whose elevator is mq-deadline
    (the attribute exists only then); a new ``async_depth`` is declared to the tags
    as their min_shallow_depth, so no wake-up is missed below it."""
    dd = queue.dd
    if dd is None or queue.elevator() != ELV_MQ_DEADLINE:
        raise ElevatorError(
            f"queue/iosched/{name}: {queue.q.name} has no mq-deadline (its elevator is "
            f"{ELEVATOR_NAMES[queue.elevator()]})"
        )
    dd.store_knob(name, text)
    if name == "async_depth":
        _min_shallow_depth(queue, int(dd.show_knob(name)))


def elevator_switch(queue: Queue, name: str, nr_requests: int) -> str:
    """elevator_switch() with the queue frozen and quiesced (the caller's): exit the
    old elevator, init the new one (an mq-deadline starts empty with its default
    knobs and ``nr_requests`` scheduler tags: none is held, the queue is frozen),
    publish its id.  Returns the old one's name."""
    old = ELEVATOR_NAMES[queue.elevator()]
    if name == old:
        return old
    dd = queue.dd
    if dd is None:
        raise ElevatorError(f"queue/scheduler: {queue.q.name} takes no elevator (NO_SCHED)")
    if old == "mq-deadline":
        problems = dd.check()
        if problems:
            raise ElevatorError(f"queue/scheduler: {queue.q.name}: {problems[0]}")
    if name == "mq-deadline":  # blk_mq_init_sched(): nr_requests sched tags, empty
        dd.reinit()
        resize_sched_tags(queue, nr_requests)
        depth_updated(queue, nr_requests)
    queue.a.set32(queue.elevator_off, ELEVATORS[name])
    return old

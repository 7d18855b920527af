"""The request queue's sysfs attributes that a run may write while it goes: the
user-space block/blk-sysfs.c (Linux 6.6).

An attribute has a name as it appears under ``/sys/block/<dev>/`` (``queue/nr_requests``)
or a verb (an action with an optional argument), and three parts:

* ``parse(text)``: the value as the user wrote it -> a typed value, or a
  :class:`SysfsError` naming the attribute and the values it takes;
* ``check(value, queue)``: what needs the run's configuration (the queue's tag depth,
  ...), done when the run is built, before any process starts;
* ``store(ctx, q, value)``: the write itself, a generator run by the sysfs writer
  task on CPU 0 (``workers/kthread.py``).  It may yield :class:`Wait` (sleep on a
  shared wait queue until a condition holds; the CPU's own task keeps running
  meanwhile) or :class:`Sleep` (a timer); what it returns is the transition's
  report, fields of its own (numbers are summarised per attribute).

The store runs in the CPU process with that CPU's :class:`~mqrt.block.blk_mq.BlkMq`
(``ctx.mq``) and the writer's own waiter slot (``ctx.waiters``).  A store whose
writer is stopped mid-way gets ``GeneratorExit`` at its current yield: a ``finally``
there undoes a half-done transition.

:data:`ATTRIBUTES` is the registry: :func:`register` adds one.  Queue attributes
(``per_queue``) are written to one queue (``nullb0/queue/nr_requests=32``) or, without
a device, to every queue of the run in turn; tag set attributes (``per_tag_set``:
``nr_hw_queues``) once per tag set, the device naming the set by one of its queues
(``nullb1/nr_hw_queues=2``); the others take no device.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from mqrt.block import blk_mq_cpuhp
from mqrt.block import blk_mq_freeze as freeze
from mqrt.block.blk_mq_structs import RQ_OFF_IO_START, RQ_U16_Q, BlkMqError
from mqrt.block.blk_mq_update import update_nr_hw_queues
from mqrt.block.elevator import (
    ELEVATOR_NAMES,
    ELEVATORS,
    ElevatorError,
    elevator_switch,
    store_iosched,
)
from mqrt.block.mq_deadline import KNOBS as DD_KNOBS
from mqrt.lib.knobs import Knob, KnobError
from mqrt.lib.wait import WaitEvent


class SysfsError(ValueError):
    """A value an attribute refuses: one line naming the attribute."""


#: Sleep on a shared wait queue until a condition holds (``wait_event()``): the
#: block layer's transitions (:mod:`mqrt.block.blk_mq_freeze`) and grace periods
#: (:mod:`mqrt.lib.rcu`) yield it; the writer prepares to wait, looks at the condition,
#: and is parked until a wake-up (or its CPU's next loop) finds it true.
Wait = WaitEvent


@dataclass(frozen=True, slots=True)
class Sleep:
    """Resume after ``ns`` nanoseconds (``msleep()``; a timer of the writer's CPU)."""

    ns: int


#: Report fields that count what a transition must never see (a reference taken or a
#: request started while the queue was frozen or quiesced): each is 0 on correct code,
#: and the report sums them per attribute as ``violations``.
VIOLATIONS = frozenset({"refs_while_frozen", "started_while_frozen", "started_while_quiesced"})

#: What a store yields, and the generator it is.
Step = Wait | Sleep
Store = Generator[Step, None, dict[str, Any]]


@dataclass(frozen=True)
class QueueInfo:
    """What validation knows of a queue of the run before any process starts."""

    name: str  #: as the run names it: nullb0, nvme0n1, ...
    index: int  #: its position in the run's queues (the requests' ``q``)
    nr_tags: int  #: the tag set's queue_depth (reserved tags included)
    nr_reserved_tags: int = 0
    tag_set: str = ""  #: its tag set's name (queues that share one name the same)
    #: the most hw queues its tag set may have (0: the count cannot change)
    max_hw_queues: int = 0


@dataclass
class StoreCtx:
    """What a store runs with, in the writer's CPU process."""

    mq: Any  #: that CPU's BlkMq
    waiters: Any  #: the writer's Waiters (its own slot): for WaitQueue(ctx.waiters, head)
    cpu: Any  #: the CPU (mqrt.block.blk_mq_structs.CpuSys)
    clock: Callable[[], int]  #: time.monotonic_ns


@dataclass(frozen=True)
class Attribute:
    name: str  #: ``queue/nr_requests``, or a verb's name (``freeze``)
    help: str  #: one line: what it takes
    parse: Callable[[str | None], Any]  #: value text (None: no ``=VALUE``) -> typed
    store: Callable[[StoreCtx, int, Any], Store]  #: q is -1 for an attribute of no queue
    check: Callable[[Any, QueueInfo], None] | None = None  #: SysfsError if it does not fit
    per_queue: bool = True  #: written per queue; False: of the whole run (no DEV)
    verb: bool = False  #: an action: ``=ARG`` optional
    #: named with a number where the name has ``N`` (``cpuN/online``: ``cpu3/online``);
    #: the typed value is then (number, parsed value)
    numbered: bool = False
    #: checked against the run's number of CPUs (SysfsError if it does not fit)
    check_cpus: Callable[[Any, int], None] | None = None
    #: written once per tag set (DEV names the set by one of its queues; without DEV,
    #: every tag set of the run in turn)
    per_tag_set: bool = False


#: name -> attribute, in registration order.
ATTRIBUTES: dict[str, Attribute] = {}


def register(attr: Attribute) -> Attribute:
    if attr.name in ATTRIBUTES:
        raise ValueError(f"sysfs attribute {attr.name!r} registered twice")
    ATTRIBUTES[attr.name] = attr
    return attr


def known() -> str:
    """The registered names, for error messages."""
    return ", ".join(ATTRIBUTES)


_NUMBERED = re.compile(r"^([a-z_]+)(\d+)/(.+)$")


def split_numbered(name: str) -> tuple[str, int | None]:
    """``cpu3/online`` -> (``cpuN/online``, 3) for a numbered attribute; any other
    name -> (name, None)."""
    m = _NUMBERED.match(name)
    if m is not None:
        key = f"{m.group(1)}N/{m.group(3)}"
        attr = ATTRIBUTES.get(key)
        if attr is not None and attr.numbered:
            return key, int(m.group(2))
    return name, None


def lookup(name: str) -> Attribute:
    attr = ATTRIBUTES.get(name)
    if attr is None:
        raise SysfsError(f"unknown attribute {name!r} (known: {known()})")
    return attr


# -- queue/nr_requests ---------------------------------------------------------------------------


def parse_count(name: str, text: str | None) -> int:
    """An integer >= 1, or a SysfsError naming the attribute."""
    try:
        nr = int(text or "")
    except ValueError:
        nr = 0
    if nr < 1:
        raise SysfsError(f"{name}: must be an integer >= 1, got {text!r}")
    return nr


def queue_requests_parse(text: str | None) -> int:
    return parse_count("queue/nr_requests", text)


def queue_requests_check(nr: int, queue: QueueInfo) -> None:
    lo, hi = queue.nr_reserved_tags + 1, queue.nr_tags
    if not lo <= nr <= hi:
        raise SysfsError(
            f"queue/nr_requests: {queue.name} takes {lo}..{hi} (its tag depth), got {nr}"
        )


def nr_requests(mq: Any, q: int) -> int:
    """The queue's nr_requests as its first mapped hctx's tag bitmap says (shared
    memory: what every CPU allocates from): its scheduler tags with an elevator."""
    queue = mq.queues[q]
    for hctx in queue.hctxs:
        tags = hctx.sched_tags if queue.elevator() else hctx.tags
        if tags is not None:
            return int(tags.bitmap_tags.sb.depth) + tags.nr_reserved_tags
    return 0


def _frozen_quiesced(
    ctx: StoreCtx, q: int, change: Callable[[], object]
) -> Generator[Step, None, dict[str, Any]]:
    """``change()`` with the queue frozen (timed: :func:`_frozen`) and quiesced, both
    undone however it ends; its BlkMqError (an ElevatorError) is the store's
    SysfsError."""
    mq = ctx.mq
    queue = mq.queues[q]
    report: dict[str, Any] = {}
    yield from _frozen(ctx, queue, report)
    try:
        freeze.quiesce_queue_nowait(mq, queue)
        try:
            yield from freeze.wait_quiesce_done()
            change()
        except (BlkMqError, ElevatorError) as exc:
            raise SysfsError(str(exc)) from None
        finally:
            freeze.unquiesce_queue(mq, queue)
    finally:
        freeze.unfreeze_queue(mq, queue)
    return report


def queue_requests_store(ctx: StoreCtx, q: int, nr: int) -> Store:
    """queue_requests_store() -> blk_mq_update_nr_requests(): with the queue frozen and
    quiesced, each tags' bitmap resized (sbitmap_queue_resize, which recomputes
    wake_batch), and the elevator told (dd_depth_updated())."""
    before = nr_requests(ctx.mq, q)
    report = yield from _frozen_quiesced(ctx, q, lambda: ctx.mq.update_nr_requests(q, nr))
    return {**report, "nr_requests_before": before, "nr_requests": nr_requests(ctx.mq, q)}


def queue_requests_unfrozen_store(ctx: StoreCtx, q: int, nr: int) -> Store:
    """The resize of ``queue/nr_requests`` alone, neither frozen nor quiesced: it meets
    tag gets, frees and wake-ups in flight (the race catalogue's resizes, and the
    kernel's own wake_batch updates as queues go active and idle, which no freeze
    covers)."""
    before = nr_requests(ctx.mq, q)
    try:
        ctx.mq.update_nr_requests(q, nr)
    except (BlkMqError, ElevatorError) as exc:
        raise SysfsError(str(exc)) from None
    return {"nr_requests_before": before, "nr_requests": nr_requests(ctx.mq, q)}
    yield  # a generator: this store never sleeps


register(
    Attribute(
        name="queue/nr_requests",
        help="queue/nr_requests=N: the tags allocatable, 1..the tag set's queue depth "
        "(the queue frozen and quiesced around the resize)",
        parse=queue_requests_parse,
        check=queue_requests_check,
        store=queue_requests_store,
    )
)
register(
    Attribute(
        name="debug/nr_requests_unfrozen",
        help="debug/nr_requests_unfrozen=N: queue/nr_requests's resize without the freeze "
        "(it meets the I/O in flight)",
        parse=queue_requests_parse,
        check=queue_requests_check,
        store=queue_requests_unfrozen_store,
    )
)


# -- queue/scheduler and queue/iosched/* --------------------------------------------------------


def queue_scheduler_parse(text: str | None) -> str:
    if text not in ELEVATORS:
        raise SysfsError(f"queue/scheduler: must be one of {', '.join(ELEVATORS)}, got {text!r}")
    return text


def queue_scheduler_store(ctx: StoreCtx, q: int, name: str) -> Store:
    """elv_iosched_store() -> elevator_change(): nothing to do for the elevator the
    queue has; otherwise, frozen and quiesced, the old one exits and the new one is
    set up (:func:`~mqrt.block.elevator.elevator_switch`)."""
    queue = ctx.mq.queues[q]
    before = ELEVATOR_NAMES[queue.elevator()]
    if before == name:
        return {"scheduler_before": before, "scheduler": name}
    nr = queue.q.nr_sched_rqs  # blk_mq_init_sched()'s q->nr_requests
    report = yield from _frozen_quiesced(ctx, q, lambda: elevator_switch(queue, name, nr))
    return {**report, "scheduler_before": before, "scheduler": name}


register(
    Attribute(
        name="queue/scheduler",
        help="queue/scheduler=none|mq-deadline: switch the queue's I/O scheduler (frozen "
        "and quiesced around the switch; mq-deadline starts with its default knobs)",
        parse=queue_scheduler_parse,
        store=queue_scheduler_store,
    )
)


def _iosched_attribute(knob: Knob) -> Attribute:
    attr = f"queue/iosched/{knob.name}"

    def parse(text: str | None) -> str:
        try:
            knob.parse((text or "").strip())
        except KnobError as exc:
            raise SysfsError(f"queue/iosched/{exc}") from None
        return (text or "").strip()

    def store(ctx: StoreCtx, q: int, text: str) -> Store:
        """deadline_*_store(): the knob of the queue's mq-deadline, which it must have
        when the write comes (the attribute exists only then)."""
        queue = ctx.mq.queues[q]
        try:
            before = queue.dd.show_knob(knob.name).strip() if queue.dd is not None else ""
            store_iosched(queue, knob.name, text)
        except ElevatorError as exc:
            raise SysfsError(str(exc)) from None
        return {f"{knob.name}_before": before, knob.name: queue.dd.show_knob(knob.name).strip()}
        yield  # a generator: this store never sleeps

    return Attribute(
        name=attr,
        help=f"{attr}=N: mq-deadline's {knob.help} (a queue whose scheduler is mq-deadline)",
        parse=parse,
        store=store,
    )


for _knob in DD_KNOBS.values():
    register(_iosched_attribute(_knob))


# -- verbs: freeze and quiesce -------------------------------------------------------------------


def hold_parse(name: str) -> Callable[[str | None], int]:
    def parse(text: str | None) -> int:
        """``VERB`` (no hold) or ``VERB=TIME`` (how long to hold it: 10ms, 0.5s)."""
        if text is None:
            return 0
        ns = parse_duration_ns(text)
        if ns is None or ns > MAX_HOLD_NS:
            raise SysfsError(
                f"{name}: the hold must be a time up to 60s (e.g. 10ms, 0.5s, 250us), got {text!r}"
            )
        return ns

    return parse


#: The longest hold of a verb's transition.
MAX_HOLD_NS = 60 * 10**9
_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(s|ms|us|ns)?$")
_DURATION_UNIT_NS = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1, None: 10**9}


def parse_duration_ns(text: str) -> int | None:
    """``2s``, ``2.5s``, ``500ms``, ``250us``, ``2`` (seconds) -> ns; None if not a time."""
    m = _DURATION.match(text.strip())
    if m is None:
        return None
    return round(float(m.group(1)) * _DURATION_UNIT_NS[m.group(2)])


def _frozen(ctx: StoreCtx, queue: Any, report: dict[str, Any]) -> Generator[Step, None, None]:
    """blk_mq_freeze_queue(), timed: the references held when it began (requests in
    flight and bios entering), the grace period, and how long it waited for them."""
    mq = ctx.mq
    clock = ctx.clock
    report["in_flight"] = max(0, queue.q_usage.outstanding() - 1)
    t0 = clock()
    yield from freeze.freeze_queue_start(mq, queue)
    t1 = clock()
    try:
        yield from freeze.freeze_queue_wait(queue)
    except BaseException:
        freeze.unfreeze_queue(mq, queue)
        raise
    report["grace_period_ns"] = t1 - t0
    report["freeze_wait_ns"] = clock() - t0


def started_between(mq: Any, q: int, t0: int, t1: int) -> int:
    """Requests of queue ``q`` whose last start (``io_start_time_ns``: every
    ->queue_rq that took one stamps it) falls in [t0, t1]: what a frozen or quiesced
    queue must not have."""
    a = mq.a
    buf16 = mq.buf16
    n = 0
    for rq in mq.rqs[q]:
        if buf16[(rq.base >> 1) + RQ_U16_Q] == q and t0 <= a.read(rq.base + RQ_OFF_IO_START) <= t1:
            n += 1
    return n


def freeze_store(ctx: StoreCtx, q: int, hold_ns: int) -> Store:
    """blk_mq_freeze_queue(), hold, blk_mq_unfreeze_queue(): submitters wait while the
    queue is frozen.  The report says how long the freeze waited for the I/O in flight,
    and checks the frozen stretch: no reference taken (the counter still at zero) and no
    request started."""
    mq = ctx.mq
    queue = mq.queues[q]
    report: dict[str, Any] = {}
    yield from _frozen(ctx, queue, report)
    frozen_at = ctx.clock()
    try:
        if hold_ns:
            yield Sleep(hold_ns)
        report["refs_while_frozen"] = queue.q_usage.outstanding()
        report["started_while_frozen"] = started_between(mq, q, frozen_at, ctx.clock())
    finally:
        freeze.unfreeze_queue(mq, queue)
    return report


def _quiesce_store(tagset: bool) -> Callable[[StoreCtx, int, int], Store]:
    def store(ctx: StoreCtx, q: int, hold_ns: int) -> Store:
        mq = ctx.mq
        queue = mq.queues[q]
        queues = freeze.tagset_queues(mq, queue) if tagset else [queue]
        t0 = ctx.clock()
        for x in queues:
            freeze.quiesce_queue_nowait(mq, x)
        report: dict[str, Any] = {"queues": len(queues)}
        try:  # unquiesced however it ends (a stop closes the store at a yield)
            yield from freeze.wait_quiesce_done()
            quiesced_at = ctx.clock()
            report["grace_period_ns"] = quiesced_at - t0
            if hold_ns:
                yield Sleep(hold_ns)
            now = ctx.clock()
            report["started_while_quiesced"] = sum(
                started_between(mq, x.index, quiesced_at, now) for x in queues
            )
        finally:
            freeze.unquiesce_tagset(mq, queues)
        return report

    store.__doc__ = (
        "blk_mq_quiesce_tagset(): every queue of the tag set"
        if tagset
        else "blk_mq_quiesce_queue()"
    ) + " quiesced (no ->queue_rq once it returns), held, then unquiesced and run."
    return store


register(
    Attribute(
        name="freeze",
        help="freeze[=HOLD]: freeze the queue (wait for its I/O in flight), hold it "
        "frozen HOLD (e.g. 10ms), unfreeze",
        parse=hold_parse("freeze"),
        store=freeze_store,
        verb=True,
    )
)
register(
    Attribute(
        name="quiesce",
        help="quiesce[=HOLD]: quiesce the queue (no ->queue_rq), hold HOLD, unquiesce",
        parse=hold_parse("quiesce"),
        store=_quiesce_store(tagset=False),
        verb=True,
    )
)
register(
    Attribute(
        name="quiesce_tagset",
        help="quiesce_tagset[=HOLD]: quiesce every queue of the queue's tag set with one "
        "grace period, hold HOLD, unquiesce them",
        parse=hold_parse("quiesce_tagset"),
        store=_quiesce_store(tagset=True),
        verb=True,
    )
)


# -- cpuN/online: CPU hotplug ------------------------------------------------------------------

#: The attribute's registered name (``cpu3/online`` in a write).
CPU_ONLINE = "cpuN/online"


def cpu_online_parse(text: str | None) -> int:
    if text is None or text.strip() not in ("0", "1"):
        raise SysfsError(f"cpuN/online: must be 0 (offline) or 1 (online), got {text!r}")
    return int(text)


def cpu_online_check(value: tuple[int, int], nr_cpus: int) -> None:
    cpu, _online = value
    if cpu == 0:
        raise SysfsError(
            "cpu0/online: CPU 0 is the boot CPU (it runs the sysfs writer) and cannot go offline"
        )
    if nr_cpus < 2:
        raise SysfsError(f"cpu{cpu}/online: this run has one CPU, CPU 0, which stays online")
    if not 1 <= cpu < nr_cpus:
        raise SysfsError(f"cpu{cpu}/online: this run has CPUs 1..{nr_cpus - 1} to take offline")


def cpu_online_store(ctx: StoreCtx, q: int, value: tuple[int, int]) -> Store:
    """Take a CPU down or bring it up (:mod:`mqrt.block.blk_mq_cpuhp`)."""
    cpu, online = value
    return (yield from blk_mq_cpuhp.store_online(ctx.mq, ctx.clock, Sleep, cpu, bool(online)))


# -- nr_hw_queues ---------------------------------------------------------------------------------


def nr_hw_queues_parse(text: str | None) -> int:
    return parse_count("nr_hw_queues", text)


def nr_hw_queues_check(nr: int, queue: QueueInfo) -> None:
    if not queue.max_hw_queues:
        raise SysfsError(f"nr_hw_queues: {queue.name}'s tag set cannot change its hw queue count")
    if not 1 <= nr <= queue.max_hw_queues:
        raise SysfsError(
            f"nr_hw_queues: {queue.name}'s tag set takes 1..{queue.max_hw_queues} "
            f"(its max_hw_queues: nullb's --max_hw_queues, nvme's I/O queues), got {nr}"
        )


def nr_hw_queues_store(ctx: StoreCtx, q: int, nr: int) -> Store:
    """blk_mq_update_nr_hw_queues() on the tag set of queue ``q``
    (:mod:`mqrt.block.blk_mq_update`)."""
    try:
        return (yield from update_nr_hw_queues(ctx.mq, ctx.mq.queues[q], nr, ctx.clock))
    except BlkMqError as exc:
        raise SysfsError(str(exc)) from None


register(
    Attribute(
        name=CPU_ONLINE,
        help="cpuN/online=0|1: take CPU N (not CPU 0) offline, or bring it back online "
        "(its task moves to another CPU meanwhile)",
        parse=cpu_online_parse,
        store=cpu_online_store,
        per_queue=False,
        numbered=True,
        check_cpus=cpu_online_check,
    )
)


register(
    Attribute(
        name="nr_hw_queues",
        help="nr_hw_queues=N: the tag set's hw queue count, 1..its max_hw_queues (every "
        "queue of the set frozen, CPUs remapped: blk_mq_update_nr_hw_queues)",
        parse=nr_hw_queues_parse,
        check=nr_hw_queues_check,
        store=nr_hw_queues_store,
        per_tag_set=True,
    )
)


# -- the timeline: writes at given times of a run ------------------------------------------------


@dataclass(frozen=True)
class TimedWrite:
    """One ``--at`` or ``--every`` of a run: when, what, to which queues.  Times are ns
    after the run's common start (t0)."""

    text: str  #: as given, for reports: ``2s:nullb0/queue/nr_requests=32``
    kind: str  #: "at" or "every"
    at_ns: int  #: --at: when; --every: its first tick (FROM)
    period_ns: int  #: --every: the period (0 for --at)
    until_ns: int  #: --every: no tick at or after this (-1: until the run's deadline)
    dev: str | None  #: the queue named, None: every queue (or an attribute of no queue)
    attr: str
    value: Any  #: typed by the attribute's parse
    value_text: str | None
    #: where it was given, for errors: ``--at``, ``jobs.fio:3: every``, ``timeline``
    source: str = "at"
    #: the queues written, each in turn: (index, name); set when the run is built
    #: (:func:`bind`); ((-1, ""),) for an attribute of no queue
    targets: tuple[tuple[int, str], ...] = ()


def bind(writes: list[TimedWrite], queues: list[QueueInfo], nr_cpus: int = 0) -> list[TimedWrite]:
    """Each write with its target queues, checked against them (SysfsError naming the
    write: a device that is not a queue of the run, a value out of the queue's range)
    and, given ``nr_cpus``, against the run's CPUs."""
    import dataclasses

    by_name = {q.name: q for q in queues}
    out = []
    for w in writes:
        attr = lookup(w.attr)
        if attr.check_cpus is not None and nr_cpus:
            attr.check_cpus(w.value, nr_cpus)
        if not attr.per_queue:
            out.append(dataclasses.replace(w, targets=((-1, ""),)))
            continue
        if w.dev is None:
            targets = list(queues)
        elif w.dev in by_name:
            targets = [by_name[w.dev]]
        else:
            raise SysfsError(
                f"{w.dev!r} is not a queue of this run (its queues: {', '.join(by_name) or 'none'})"
            )
        if attr.per_tag_set:  # the first queue of each set named
            targets = list({q.tag_set or q.name: q for q in reversed(targets)}.values())[::-1]
        if attr.check is not None:
            for q in targets:
                attr.check(w.value, q)
        out.append(dataclasses.replace(w, targets=tuple((q.index, q.name) for q in targets)))
    return out

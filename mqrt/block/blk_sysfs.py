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
a device, to every queue of the run in turn; the others take no device.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from mqrt.block.blk_mq_structs import BlkMqError


class SysfsError(ValueError):
    """A value an attribute refuses: one line naming the attribute."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep on the wait queue whose head is at arena offset ``head_off`` until
    ``cond()`` is true (``wait_event()``): the writer prepares to wait, looks at the
    condition, and is parked until a wake-up (or its CPU's next loop) finds it true."""

    head_off: int
    cond: Callable[[], bool]


@dataclass(frozen=True, slots=True)
class Sleep:
    """Resume after ``ns`` nanoseconds (``msleep()``; a timer of the writer's CPU)."""

    ns: int


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


def lookup(name: str) -> Attribute:
    attr = ATTRIBUTES.get(name)
    if attr is None:
        raise SysfsError(f"unknown attribute {name!r} (known: {known()})")
    return attr


# -- queue/nr_requests ---------------------------------------------------------------------------


def queue_requests_parse(text: str | None) -> int:
    try:
        nr = int(text or "")
    except ValueError:
        raise SysfsError(f"queue/nr_requests: must be an integer >= 1, got {text!r}") from None
    if nr < 1:
        raise SysfsError(f"queue/nr_requests: must be an integer >= 1, got {text!r}")
    return nr


def queue_requests_check(nr: int, queue: QueueInfo) -> None:
    lo, hi = queue.nr_reserved_tags + 1, queue.nr_tags
    if not lo <= nr <= hi:
        raise SysfsError(
            f"queue/nr_requests: {queue.name} takes {lo}..{hi} (its tag depth), got {nr}"
        )


def nr_requests(mq: Any, q: int) -> int:
    """The queue's nr_requests as its first mapped hctx's tag bitmap says (shared
    memory: what every CPU allocates from)."""
    for hctx in mq.queues[q].hctxs:
        tags = hctx.tags
        if tags is not None:
            return int(tags.bitmap_tags.sb.depth) + tags.nr_reserved_tags
    return 0


def queue_requests_store(ctx: StoreCtx, q: int, nr: int) -> Store:
    """queue_requests_store() -> blk_mq_update_nr_requests(): each tags' bitmap resized
    (sbitmap_queue_resize, which recomputes wake_batch).  The kernel freezes and
    quiesces the queue around it; this store does not (the resize runs under load)."""
    before = nr_requests(ctx.mq, q)
    try:
        ctx.mq.update_nr_requests(q, nr)
    except BlkMqError as exc:
        raise SysfsError(str(exc)) from None
    return {"nr_requests_before": before, "nr_requests": nr_requests(ctx.mq, q)}
    yield  # a generator: this store never sleeps


register(
    Attribute(
        name="queue/nr_requests",
        help="queue/nr_requests=N: the tags allocatable, 1..the tag set's queue depth",
        parse=queue_requests_parse,
        check=queue_requests_check,
        store=queue_requests_store,
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


def bind(writes: list[TimedWrite], queues: list[QueueInfo]) -> list[TimedWrite]:
    """Each write with its target queues, checked against them (SysfsError naming the
    write: a device that is not a queue of the run, a value out of the queue's range)."""
    import dataclasses

    by_name = {q.name: q for q in queues}
    out = []
    for w in writes:
        attr = lookup(w.attr)
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
        if attr.check is not None:
            for q in targets:
                attr.check(w.value, q)
        out.append(dataclasses.replace(w, targets=tuple((q.index, q.name) for q in targets)))
    return out

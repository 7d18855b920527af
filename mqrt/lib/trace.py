"""The event trace: per-CPU rings of fixed-size binary records in shared memory, cheap
enough to leave on, dumped with msgpack when a run fails and read back as one merged,
time-ordered text view (the race reproducer's flight recorder).

Kernel counterpart: the ``block:`` tracepoints and blktrace's per-CPU relay buffers
(``kernel/trace/blktrace.c``), shrunk to what a shared-tag race needs: who took,
freed, slept on and woke which tag, which request generation, on which CPU, when.

Record (``RECORD``, 32 bytes, little-endian, naturally aligned)
    =======  ====  =====  ======================================================
    offset   size  type   field
    =======  ====  =====  ======================================================
    0        8     u64    ``t_ns``: ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one
                          clock for every process on the host)
    8        2     u16    ``cpu``: the emulated CPU that wrote the record
    10       2     u16    ``ev``: an :class:`Ev` value (0: reserved)
    12       2     u16    ``hctx``: hardware queue index
    14       2     u16    ``q``: request queue index
    16       4     i32    ``tag``: the tag (driver tag), -1 for none
    20       4     u32    ``gen``: request generation (low 32 bits)
    24       8     i64    ``arg``: event-specific (see :class:`Ev`)
    =======  ====  =====  ======================================================

    Two records per cache line.  Out-of-range fields are truncated to their width
    like a C assignment (a generation wider than 32 bits keeps its low bits); a
    non-integer field is written as 0 and then raises ``TypeError``, so a bad call
    still leaves a valid, published record behind and never a torn one.

Shared memory (:class:`TraceSpec`, declared in a :class:`~mqrt.lib.shm.Layout`)
    ``<name>.head``: ``nr_cpus`` headers, each on its own cache line, holding ``head``
    (u64): how many records that CPU has ever written.  ``<name>.records``:
    ``nr_cpus`` rings of ``entries`` records (a power of two, default 4096, so 128 KiB
    per CPU), ring ``c`` at ``records + c * entries * 32``; record number ``p`` of a
    CPU lives in slot ``p & (entries - 1)``.

Ordering (single writer per ring, lock-free readers: a seqlock in reverse)
    Writer (the CPU itself, and only it): plain stores of record ``p`` into its slot,
    then ``head = p + 1`` with a release store, so a reader that sees ``head`` also
    sees every record below it.  The reader's rule below also needs the converse:
    the stores of record ``p + 1`` must not become visible before ``head = p + 1``
    (the ``smp_wmb()`` after a seqcount write).  x86-64 keeps stores in program order
    (TSO), so the release store suffices there; on weakly ordered CPUs (arm64) the
    tracer publishes with ``xchg`` instead, a fully ordered atomic that is both
    barriers, for ~30 ns more (:data:`HEAD_NEEDS_BARRIER`, ``barrier=``).

    Reader (the runtime, after or during a run; :func:`read_ring`):
    ``h1 = load_acquire(head)``; copy the whole ring; ``fence()``;
    ``h2 = load_acquire(head)``.  Records ``< h1`` were complete before the copy.
    While copying, the writer may have written records ``h1 .. h2`` (``h2`` possibly
    half-way), each overwriting the slot of the record ``entries`` older, so the
    records that can be trusted are ``max(0, h2 - entries + 1) <= p < h1``: the
    newest ``min(h1, entries)`` minus those the writer may have overwritten, and
    always minus the oldest slot when the ring has wrapped (the writer may be inside
    ``emit()`` for record ``h2``).  A reader that knows no writer is inside ``emit()``
    (the CPUs stopped or exited) passes ``quiescent=True`` and, if ``head`` did not
    move during the copy, keeps all ``min(head, entries)`` records.  A tear is
    therefore never returned; what is lost is the records overwritten while the
    copy ran (read again for more).  A CPU SIGKILLed inside ``emit()`` may leave
    its next slot, the ring's oldest, half-written: read such a ring without
    ``quiescent``.

    Time order across CPUs (:func:`read_all`) is the clock's: records are merged by
    ``t_ns`` with a stable sort, so one CPU's records keep their ring (program)
    order even on equal timestamps.  Across CPUs the order is only as good as the
    stamps: the time is taken inside ``emit()``, not at the instant the traced
    operation took effect, so a CPU delayed between an operation and its
    ``emit()`` (preempted, or an INJECT window) can stamp a cause after another
    CPU's record of its effect.  Read cross-CPU events less than a few µs apart
    (more on an oversubscribed host) as concurrent; within one CPU the order is
    exact.

    ``emit()`` is not re-entrant and a ring has one writer: one :class:`Tracer` per
    CPU, never called from a Python signal handler.

Cost (``tracer.emit(ev, tag, gen, hctx, q, arg)`` with six positional arguments,
timeit, best of 5 x 200k calls; CPython 3.11.7, x86-64, 2-vCPU VM; ``mqrt microbench
--case trace.emit`` measures the data path's ``if trace.on: trace.emit(...)``)
    =========================  ========  =========================================
    tracer                     ns/event  where it goes
    =========================  ========  =========================================
    ``Tracer`` (x86: release)  ~100      the C ``TraceWriter.emit``: the call and
                                         six int conversions ~60, the clock ~25
                                         (vDSO), the 32-byte store and the head
    ``Tracer(barrier=True)``   ~105      ``xchg`` instead of the release store
    ``NullTracer``             ~52       a method call that does nothing
    =========================  ========  =========================================

    The same record written from Python (``struct.pack_into`` ~140,
    ``time.monotonic_ns`` ~65, the head store and the call) cost ~500 ns; at five
    events per I/O (get, dispatch, IRQ, complete, end) that was ~2.5 µs against an
    I/O's own ~9 µs, which is why the writer is C.  Hot callers should still hoist
    ``Ev.X`` into a module constant and test ``trace.on`` before computing arguments.
"""

from __future__ import annotations

import enum
import platform
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import msgpack
import numpy as np

from mqrt.lib._atomic import TraceWriter, fence
from mqrt.lib.shm import Arena, Layout, Region, cacheline_struct


class Ev(enum.IntEnum):
    """Trace events, named after the kernel code they stand for.

    The values are part of the dump format: append new members, never renumber.
    0 is reserved (an unwritten slot).  ``arg`` is 0 unless stated.
    """

    TAG_GET = 1  #: blk_mq_get_tag() got ``tag``
    TAG_GET_FAIL = 2  #: a get found no free tag, before sleeping or failing (arg: 1 if nowait)
    TAG_PUT = 3  #: blk_mq_put_tag(): ``tag`` freed back to the sbitmap
    TAG_SLEEP = 4  #: the task sleeps on a wait queue for a tag (arg: wait queue index)
    TAG_WAKE = 5  #: the sleeping task was woken (arg: wait queue index)
    WAKE_UP = 6  #: a waker (sbitmap_queue_wake_up) woke ``arg`` waiters
    DISPATCH = 7  #: ->queue_rq() called for the request
    ISSUE_BUSY = 8  #: ->queue_rq() returned BLK_STS_RESOURCE / DEV_RESOURCE (arg: status)
    COMPLETE = 9  #: blk_mq_complete_request() won the IN_FLIGHT -> COMPLETE transition
    END = 10  #: blk_mq_end_request(): the request ended, its tag is freed
    IRQ = 11  #: an interrupt handler ran (arg: CQEs reaped)
    IPI = 12  #: a completion IPI was sent (arg: target CPU)
    REQUEUE = 13  #: the request was requeued
    TIMEOUT = 14  #: the timeout handler ran for the request (arg: its verdict)
    TAG_BUSY = 15  #: __blk_mq_tag_busy(): a queue became active (arg: active users)
    TAG_IDLE = 16  #: __blk_mq_tag_idle(): a queue went idle (arg: active users)
    WAKE_BATCH = 17  #: sbitmap_queue wake_batch recalculated (arg: the new batch)
    INJECT = 18  #: a window-widening delay (mqrt.lib.inject) was taken (arg: µs)
    MARK = 19  #: free use (tests, ad-hoc instrumentation)


#: How ``arg`` is shown for events where it means something; any other event shows
#: ``arg=N`` when it is not 0.  Add entries for new events.
ARG_FORMATS: dict[int, str] = {
    Ev.TAG_SLEEP: "wq={}",
    Ev.TAG_WAKE: "wq={}",
    Ev.WAKE_UP: "woke={}",
    Ev.ISSUE_BUSY: "status={}",
    Ev.IRQ: "cqes={}",
    Ev.IPI: "to=cpu{}",
    Ev.TIMEOUT: "verdict={}",
    Ev.TAG_BUSY: "users={}",
    Ev.TAG_IDLE: "users={}",
    Ev.WAKE_BATCH: "wake_batch={}",
    Ev.INJECT: "delay={}us",
}

#: The record as stored: see the table in the module docstring.
RECORD = struct.Struct("<QHHHHiIq")
#: The same record as a numpy dtype, for :meth:`~mqrt.lib.shm.Arena.view` and debugging.
RECORD_DTYPE = np.dtype(
    [
        ("t_ns", "<u8"),
        ("cpu", "<u2"),
        ("ev", "<u2"),
        ("hctx", "<u2"),
        ("q", "<u2"),
        ("tag", "<i4"),
        ("gen", "<u4"),
        ("arg", "<i8"),
    ]
)
RECORD_SIZE = RECORD.size
assert RECORD_SIZE == 32 == RECORD_DTYPE.itemsize

#: One header per CPU ring, on its own cache line: written by that CPU only.
TRACE_HEADER = cacheline_struct([("head", "<u8")])

DEFAULT_ENTRIES = 4096

#: Whether the head store must also order the *next* record's stores after it (see
#: "Ordering" in the module docstring): not on x86-64 (TSO), yes on aarch64 (the
#: architectures mqrt.lib._atomic builds for).
HEAD_NEEDS_BARRIER = platform.machine().lower() not in {"x86_64", "amd64"}

#: Format name and version written into every dump.
DUMP_FORMAT = "mqrt-trace"
DUMP_VERSION = 1


class Record(NamedTuple):
    """One decoded record (a plain tuple, in the order of :data:`RECORD`)."""

    t_ns: int
    cpu: int
    ev: int
    hctx: int
    q: int
    tag: int
    gen: int
    arg: int


FIELDS: tuple[str, ...] = Record._fields


class TraceError(ValueError):
    """A trace declared, attached or read with the wrong geometry."""


@dataclass(frozen=True)
class TraceSpec:
    """Where the trace rings live in the arena; picklable, data only."""

    name: str
    nr_cpus: int
    entries: int  #: records per CPU ring, a power of two
    header: Region  #: ``nr_cpus`` x :data:`TRACE_HEADER`
    records: Region  #: ``nr_cpus * entries`` x :data:`RECORD_DTYPE`

    @classmethod
    def declare(
        cls, layout: Layout, nr_cpus: int, entries: int = DEFAULT_ENTRIES, name: str = "trace"
    ) -> TraceSpec:
        """Reserve one ring of ``entries`` records per CPU in ``layout``."""
        if not 1 <= nr_cpus <= 0xFFFF:
            raise TraceError(f"{name}: nr_cpus must be 1..65535, got {nr_cpus}")
        if entries < 2 or entries & (entries - 1):
            raise TraceError(f"{name}: entries must be a power of two >= 2, got {entries}")
        header = layout.add(f"{name}.head", TRACE_HEADER, nr_cpus)
        records = layout.add(f"{name}.records", RECORD_DTYPE, nr_cpus * entries)
        return cls(name, nr_cpus, entries, header, records)

    def head_offset(self, cpu: int) -> int:
        """Absolute offset of ``cpu``'s ``head`` word."""
        return self.header.addr(cpu, "head")

    def ring_offset(self, cpu: int) -> int:
        """Absolute offset of slot 0 of ``cpu``'s ring."""
        if not 0 <= cpu < self.nr_cpus:
            raise IndexError(f"{self.name}: cpu {cpu} out of range 0..{self.nr_cpus - 1}")
        return self.records.offset + cpu * self.entries * RECORD_SIZE


# -- writing -------------------------------------------------------------------------


class EmitFn(Protocol):
    """The signature of :attr:`Tracer.emit` and :meth:`NullTracer.emit`."""

    def __call__(
        self, ev: int, tag: int = -1, gen: int = 0, hctx: int = 0, q: int = 0, arg: int = 0
    ) -> None: ...


class Tracer:
    """The writer of one CPU's ring.

    ``emit(ev, tag=-1, gen=0, hctx=0, q=0, arg=0)`` appends one record; it is the
    bound ``emit`` of a C :class:`~mqrt.lib._atomic.TraceWriter` (the record store, the
    clock and the head store in one call), kept as an instance attribute so hot
    callers fetch it once.  Create one per CPU, in the process that is that CPU, after
    attaching the arena; it continues after the records already in the ring.
    """

    enabled = True

    def __init__(
        self, arena: Arena, spec: TraceSpec, cpu: int, *, barrier: bool = HEAD_NEEDS_BARRIER
    ) -> None:
        if sys.byteorder != "little":
            raise TraceError("the trace writer stores records in native order: little-endian only")
        self.spec = spec
        self.cpu = cpu
        self._atomic = arena.atomic
        self._head_off = spec.head_offset(cpu)
        self._writer = TraceWriter(
            arena.atomic,
            spec.ring_offset(cpu),
            spec.entries,
            self._head_off,
            cpu,
            arena.atomic.read(self._head_off),
            barrier,
        )
        self.emit: EmitFn = self._writer.emit

    @property
    def head(self) -> int:
        """Records this CPU has written so far (what readers see)."""
        return self._atomic.load_acquire(self._head_off)

    def __repr__(self) -> str:
        return f"Tracer(cpu={self.cpu}, head={self.head}, entries={self.spec.entries})"


class NullTracer:
    """A tracer that records nothing: same interface, ``emit`` is a no-op method."""

    enabled = False

    def __init__(self, cpu: int = 0) -> None:
        self.cpu = cpu

    def emit(
        self, ev: int, tag: int = -1, gen: int = 0, hctx: int = 0, q: int = 0, arg: int = 0
    ) -> None:
        return None

    @property
    def head(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"NullTracer(cpu={self.cpu})"


#: A shared disabled tracer for code that has none.
NULL_TRACER = NullTracer()


# -- reading -------------------------------------------------------------------------


def read_ring(arena: Arena, spec: TraceSpec, cpu: int, *, quiescent: bool = False) -> list[Record]:
    """The newest records of ``cpu``'s ring that are certainly whole, oldest first.

    Safe while the CPU is writing (see "Ordering" in the module docstring).  With
    ``quiescent=True`` the caller promises that no writer is inside ``emit()``, and
    the oldest slot of a wrapped ring is kept when the head did not move.
    """
    a = arena.atomic
    head_off = spec.head_offset(cpu)
    start = spec.ring_offset(cpu)
    entries = spec.entries
    h1 = a.load_acquire(head_off)
    blob = bytes(arena.buf[start : start + entries * RECORD_SIZE])
    fence()  # the copy's loads before the second look at head (smp_rmb)
    h2 = a.load_acquire(head_off)
    if quiescent and h2 == h1:
        lo = max(0, h1 - entries)
    else:
        lo = max(0, h2 - entries + 1)
    if lo >= h1:
        return []
    first = (lo & (entries - 1)) * RECORD_SIZE
    ordered = blob[first:] + blob[:first]
    return [Record._make(r) for r in RECORD.iter_unpack(ordered[: (h1 - lo) * RECORD_SIZE])]


def _merge(per_cpu: Iterable[list[Record]]) -> list[Record]:
    merged = [r for records in per_cpu for r in records]
    merged.sort(key=lambda r: r.t_ns)  # stable: a CPU's equal timestamps keep ring order
    return merged


def read_all(arena: Arena, spec: TraceSpec, *, quiescent: bool = False) -> list[Record]:
    """Every CPU's ring (:func:`read_ring`), merged into one list ordered by time."""
    return _merge(read_ring(arena, spec, c, quiescent=quiescent) for c in range(spec.nr_cpus))


def last_events(records: Iterable[Sequence[int]], n_per_cpu: int) -> list[Record]:
    """The last ``n_per_cpu`` records of each CPU, in the order given (time order for
    the output of :func:`read_all`)."""
    recs = [r if isinstance(r, Record) else Record._make(r) for r in records]
    if n_per_cpu <= 0:
        return []
    left: dict[int, int] = {}
    keep: list[Record] = []
    for r in reversed(recs):
        seen = left.get(r.cpu, 0)
        if seen < n_per_cpu:
            left[r.cpu] = seen + 1
            keep.append(r)
    keep.reverse()
    return keep


# -- dumps ---------------------------------------------------------------------------


class TraceDump(NamedTuple):
    """A dump read back by :func:`load_msgpack`."""

    meta: dict[str, Any]
    records: list[Record]
    #: event value -> name, as known by the mqrt that wrote the dump
    names: dict[int, str]


def event_names() -> dict[int, str]:
    """Event value -> name for every :class:`Ev`."""
    return {int(e): e.name for e in Ev}


def dump_msgpack(
    records: Iterable[Sequence[int]], path: str | Path, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write ``records`` and ``meta`` (msgpack-able: run options, seed, the failure)
    to ``path``; event names go along so any mqrt can render the dump."""
    doc = {
        "format": DUMP_FORMAT,
        "version": DUMP_VERSION,
        "fields": list(FIELDS),
        "events": event_names(),
        "meta": dict(meta or {}),
        "records": [list(r) for r in records],
    }
    path = Path(path)
    path.write_bytes(msgpack.packb(doc, use_bin_type=True))
    return path


def load_msgpack(path: str | Path) -> TraceDump:
    """Read a dump written by :func:`dump_msgpack`."""
    doc = msgpack.unpackb(Path(path).read_bytes(), raw=False, strict_map_key=False)
    if not isinstance(doc, dict) or doc.get("format") != DUMP_FORMAT:
        raise TraceError(f"{path}: not an mqrt trace dump")
    if doc.get("version") != DUMP_VERSION:
        raise TraceError(
            f"{path}: trace dump version {doc.get('version')}, this mqrt reads {DUMP_VERSION}"
        )
    if tuple(doc["fields"]) != FIELDS:
        raise TraceError(f"{path}: unexpected record fields {doc['fields']}")
    names = {int(k): str(v) for k, v in doc["events"].items()}
    return TraceDump(doc["meta"], [Record._make(r) for r in doc["records"]], names)


# -- text view -----------------------------------------------------------------------


def _arg_text(ev: int, arg: int) -> str:
    fmt = ARG_FORMATS.get(ev)
    if fmt is not None:
        return fmt.format(arg)
    return f"arg={arg}" if arg else ""


def format_records(
    records: Iterable[Sequence[int]],
    *,
    names: Mapping[int, str] | None = None,
    t0_ns: int | None = None,
) -> str:
    """A time-ordered text view, one aligned line per record::

        +    0.000 us  cpu0  TAG_GET     q0  hctx0  tag=17  gen=3
        +   12.345 us  cpu1  WAKE_UP     q0  hctx0  tag=-   gen=-  woke=4

    Timestamps are µs relative to ``t0_ns`` (default: the earliest record).  Records
    are sorted by time (stably) first, so per-CPU lists may be passed as they are.
    """
    rows = _merge([[r if isinstance(r, Record) else Record._make(r) for r in records]])
    if not rows:
        return "(no trace events)"
    names = event_names() if names is None else names
    t0 = rows[0].t_ns if t0_ns is None else t0_ns
    cols = [
        (
            f"{(r.t_ns - t0) / 1000:.3f}",
            f"cpu{r.cpu}",
            names.get(r.ev, f"EV{r.ev}"),
            f"q{r.q}",
            f"hctx{r.hctx}",
            "tag=-" if r.tag < 0 else f"tag={r.tag}",
            "gen=-" if r.tag < 0 and r.gen == 0 else f"gen={r.gen}",
            _arg_text(r.ev, r.arg),
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cols) for i in range(len(cols[0]))]
    lines = []
    for c in cols:
        parts = [f"+{c[0].rjust(widths[0])} us"]
        parts += [c[i].ljust(widths[i]) for i in range(1, len(c))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def render_dump(path: str | Path) -> str:
    """A dump as text: a summary and its metadata as ``#`` lines, then the events."""
    dump = load_msgpack(path)
    recs = dump.records
    cpus = sorted({r.cpu for r in recs})
    span = (max(r.t_ns for r in recs) - min(r.t_ns for r in recs)) / 1000 if recs else 0.0
    head = [
        f"# mqrt trace {Path(path).name}: {len(recs)} events, "
        f"cpus {','.join(map(str, cpus)) or '-'}, {span:.3f} us"
    ]
    head += [f"# {k}: {v}" for k, v in dump.meta.items()]
    return "\n".join([*head, format_records(recs, names=dump.names)])


# -- this process's tracer -----------------------------------------------------------------

#: True while this process has a tracer installed; the hot paths test it first:
#: ``if trace.on: trace.emit(Ev.X, ...)``.
on = False
#: This process's ``emit`` (a no-op until :func:`install`).
emit: EmitFn = NULL_TRACER.emit


def install(tracer: Tracer | None) -> None:
    """Make ``tracer`` this process's tracer (None: trace nothing)."""
    global on, emit
    on = tracer is not None
    emit = tracer.emit if tracer is not None else NULL_TRACER.emit

"""Contention accounting per lock class, in the spirit of the kernel's lock_stat
(``kernel/locking/lockdep.c`` with ``CONFIG_LOCK_STAT``, ``/proc/lock_stat`` of
``kernel/locking/lockdep_proc.c``; ``Documentation/locking/lockstat.rst``).

Every contended shared structure of mqrt belongs to a :class:`LockClass`: a bit
spinlock (``spin_lock(a, off, cls)`` in :mod:`mqrt.lib.wait`), a bitmap word whose
find-and-set can lose a race (the C ``find_and_set_zero_bit(_at)`` count their own lost
races), or a cmpxchg retry loop (the ring's reservation, the sbitmap's batch get and
wake-up counters).  As in lock_stat, the statistics are per class, not per instance:
every ctx list lock of every queue is ``ctx.lock``.

What is counted, per CPU and per class (:data:`FIELDS`):

``contentions``
    acquisitions that had to wait: a first test_and_set_bit_lock that found the lock
    taken, a find-and-set that lost a race for its bit at least once, a cmpxchg that
    failed at least once (lock_stat's *contentions*)
``acquisitions``
    every acquisition: spin locks and cmpxchg loops counted in a process-local list and
    published with :func:`publish` (the CPU's live counters' cadence, and at its end);
    for the tag words the tags taken, by the C call itself (a batch get: the tags of
    its cmpxchg, :func:`acquired`) (lock_stat's *acquisitions*)
``wait_ns``, ``wait_max_ns``
    time from the first failed try to the acquisition (CLOCK_MONOTONIC, read only on
    the contended branch), summed and the longest (lock_stat's *waittime-total* and
    *waittime-max*)
``retries``
    failed tries: the spins of a bit spinlock, the races a find-and-set lost, the
    failed cmpxchgs (mqrt's own; lock_stat has no such column)
``yields``
    ``sched_yield()`` calls while spinning on a bit lock (mqrt's own)

An uncontended acquisition costs no clock read and no shared store: only the branch
taken when the first try failed counts contentions and time (for a spin lock a plain
function call more, for the C calls a pointer test).  Acquisitions cost one
process-local list increment (a bit spinlock, a batch get) or one store to the CPU's
own line from C (a tag word).

Memory ordering: one block of counters per CPU (:data:`LOCK_STAT`, its own cache
lines), written only by that CPU's process (its task, its interrupts, its sysfs writer
task: one process) with plain relaxed loads and stores -- read-add-store of its own
words on the contended branch, stores of process-local counts in :func:`publish`.
Readers (the runtime's report, ``mqrt inspect``) read the blocks with relaxed loads,
without a lock: a value may be a moment late, and a class's fields may be read from
different moments (wait_ns before the contention it belongs to is counted), which a
report over a whole run does not mind.

Not counted: the fully ordered RMW counters (``nr_active``, ``ws_active``,
``q_usage_counter``, ...): a fetch_add never retries, and lock_stat does not count
atomics either; hold times (lock_stat's *holdtime-**), *con-bounces* and *acq-bounces*
(mqrt cannot tell which host core last held a line), and *waittime-min*.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from mqrt.lib._atomic import AtomicView
from mqrt.lib.shm import Arena, Layout, Region, cacheline_struct


class LockClass(enum.IntEnum):
    """The lock classes: one per kind of contended structure (its lock_stat name in
    :data:`CLASS_NAMES`)."""

    UNCLASSIFIED = 0  #: a spin_lock() whose caller named no class
    TAGS_BITMAP = 1  #: driver tag words: lost find-and-set races, failed batch cmpxchg
    SCHED_TAGS_BITMAP = 2  #: the same on an elevator's sched tags
    TAGS_SWAP_LOCK = 3  #: an sbitmap word's swap_lock (the deferred-clear fold)
    SBQ_WAKE_CNT = 4  #: sbitmap_queue wake-up counters (wakeup_cnt, wait_cnt): cmpxchg
    TAGS_LOCK = 5  #: tags->lock (active queues, wake_batch)
    WAIT_QUEUE_LOCK = 6  #: wait_queue_head->lock (tag sleeps, freeze, hotplug, rcu)
    CTX_LOCK = 7  #: ctx->lock: a ctx's rq_lists
    HCTX_LOCK = 8  #: hctx->lock: hctx->dispatch
    REQUEUE_LOCK = 9  #: q->requeue_lock: q->requeue_list
    DD_LOCK = 10  #: mq-deadline's dd->lock
    QUEUE_LOCK = 11  #: q->queue_lock: the sq mode's one lock
    NVME_SQ_LOCK = 12  #: nvmeq->sq_lock
    NVME_CQ_LOCK = 13  #: nvmeq->cq_poll_lock (the reaping CPUs' CQ head)
    RING_TAIL = 14  #: an MPSC ring's tail: the reservation cmpxchg


#: The class names as a lock_stat report prints them.
CLASS_NAMES: Mapping[LockClass, str] = {
    LockClass.UNCLASSIFIED: "unclassified",
    LockClass.TAGS_BITMAP: "tags.bitmap",
    LockClass.SCHED_TAGS_BITMAP: "sched_tags.bitmap",
    LockClass.TAGS_SWAP_LOCK: "tags.swap_lock",
    LockClass.SBQ_WAKE_CNT: "sbq.wake_cnt",
    LockClass.TAGS_LOCK: "tags->lock",
    LockClass.WAIT_QUEUE_LOCK: "wait_queue.lock",
    LockClass.CTX_LOCK: "ctx.lock",
    LockClass.HCTX_LOCK: "hctx.lock",
    LockClass.REQUEUE_LOCK: "q->requeue_lock",
    LockClass.DD_LOCK: "dd.lock",
    LockClass.QUEUE_LOCK: "q->queue_lock",
    LockClass.NVME_SQ_LOCK: "nvme.sq_lock",
    LockClass.NVME_CQ_LOCK: "nvme.cq_lock",
    LockClass.RING_TAIL: "ring.tail",
}
NR_CLASSES = len(LockClass)

#: The counters of one class, in this order (the C calls write the first five by
#: index: keep ``LS_*`` in ``_atomic.c`` in step).
FIELDS = ("contentions", "acquisitions", "wait_ns", "wait_max_ns", "retries", "yields")
CONTENTIONS, ACQUISITIONS, WAIT_NS, WAIT_MAX_NS, RETRIES, YIELDS = range(len(FIELDS))
NR_FIELDS = len(FIELDS)
#: Bytes from one class's counters to the next.
CLASS_STRIDE = 8 * NR_FIELDS
#: Classes whose acquisitions the C calls count in the arena themselves (a tag word's
#: find-and-set); :func:`publish` leaves them alone.
C_COUNTED = frozenset({LockClass.TAGS_BITMAP, LockClass.SCHED_TAGS_BITMAP})

#: One CPU's block: every class's counters, u64 each, on lines of their own.
#:   0x00  NR_CLASSES * NR_FIELDS * 8  counters[class][field]  (that CPU only)
LOCK_STAT = cacheline_struct([("counters", np.dtype(("<u8", (NR_CLASSES, NR_FIELDS))))])

#: The clock of the wait times (CLOCK_MONOTONIC, as the C side reads it).
clock = time.monotonic_ns

# -- this process's counters ----------------------------------------------------------

#: Acquisitions counted in this process since :func:`install`, by class (process-local;
#: the list object is never replaced, so a module that bound it keeps counting here).
acq: list[int] = [0] * NR_CLASSES
_a: AtomicView | None = None
_base = -1


def declare(layout: Layout, nr_cpus: int, name: str = "lock_stat") -> Region:
    """Reserve one block of counters per CPU (zero in a new arena)."""
    return layout.add(name, LOCK_STAT, nr_cpus)


def install(a: AtomicView, region: Region, cpu: int) -> None:
    """Count this process's contentions in CPU ``cpu``'s block of ``region`` from now
    on (its counters start at 0).  Call it before building the handles that cache
    :func:`stat_off` (a CPU's block-layer handles)."""
    global _a, _base
    base = region.addr(cpu, "counters")
    for i in range(NR_CLASSES * NR_FIELDS):
        a.set(base + 8 * i, 0)
    acq[:] = [0] * NR_CLASSES
    _a, _base = a, base


def uninstall() -> None:
    """Stop counting in the arena (contentions are then not counted at all)."""
    global _a, _base
    _a, _base = None, -1


def installed() -> bool:
    return _a is not None


def stat_off(cls: int) -> int:
    """The offset of this process's counters of class ``cls`` (for the C calls'
    ``stat_off``), or -1 when nothing is installed."""
    return -1 if _base < 0 else _base + cls * CLASS_STRIDE


def contended(cls: int, wait_ns: int, retries: int, yields: int = 0) -> None:
    """Count one contended acquisition of class ``cls``: it waited ``wait_ns`` and
    failed ``retries`` tries (``yields`` of them gave the core up).  Called only on the
    contended branch; nothing happens in a process that installed no counters."""
    a = _a
    if a is None:
        return
    off = _base + cls * CLASS_STRIDE
    a.set(off, a.read(off) + 1)
    a.set(off + 8 * WAIT_NS, a.read(off + 8 * WAIT_NS) + wait_ns)
    if wait_ns > a.read(off + 8 * WAIT_MAX_NS):
        a.set(off + 8 * WAIT_MAX_NS, wait_ns)
    a.set(off + 8 * RETRIES, a.read(off + 8 * RETRIES) + retries)
    if yields:
        a.set(off + 8 * YIELDS, a.read(off + 8 * YIELDS) + yields)


def acquired(cls: int, n: int = 1) -> None:
    """Count ``n`` acquisitions of a class C counts itself (:data:`C_COUNTED`), in the
    arena at once (read-add-store of this process's own word): the tags a batch get
    took off a word."""
    a = _a
    if a is not None:
        off = _base + cls * CLASS_STRIDE + 8 * ACQUISITIONS
        a.set(off, a.read(off) + n)


def publish() -> None:
    """Store this process's acquisition counts (:data:`acq`) in its block (plain
    stores of process-local values), but the classes C counts itself."""
    a = _a
    if a is None:
        return
    for cls in LockClass:
        if cls not in C_COUNTED:
            a.set(_base + cls * CLASS_STRIDE + 8 * ACQUISITIONS, acq[cls])


# -- readers --------------------------------------------------------------------------


def read(arena: Arena, region: Region) -> np.ndarray:
    """Every CPU's counters, a copy: ``[cpu, class, field]`` (relaxed reads of words
    their CPUs may be writing: each a moment late at most)."""
    return np.array(arena.view(region)["counters"], dtype=np.uint64)


def summary(counters: np.ndarray) -> dict[str, dict[str, Any]]:
    """The report's ``lock_stat`` object: per class (by lock_stat name, every class),
    ``contentions``, ``acquisitions``, ``wait_ns``, ``wait_max_ns``, ``wait_avg_ns``
    (per contention), ``retries``, ``yields`` and ``contentions_per_cpu``."""
    out: dict[str, dict[str, Any]] = {}
    for cls in LockClass:
        per_cpu = counters[:, cls, :]
        tot = per_cpu.sum(axis=0)
        con = int(tot[CONTENTIONS])
        out[CLASS_NAMES[cls]] = {
            "contentions": con,
            "acquisitions": int(tot[ACQUISITIONS]),
            "wait_ns": int(tot[WAIT_NS]),
            "wait_max_ns": int(per_cpu[:, WAIT_MAX_NS].max(initial=0)),
            "wait_avg_ns": int(tot[WAIT_NS]) // con if con else 0,
            "retries": int(tot[RETRIES]),
            "yields": int(tot[YIELDS]),
            "contentions_per_cpu": [int(v) for v in per_cpu[:, CONTENTIONS]],
        }
    return out


def live(counters: np.ndarray) -> dict[str, Any]:
    """A live view for a status line: contentions and wait summed over every CPU and
    class, and the class that waited longest (its name, or "" when nothing waited)."""
    per_class = counters.sum(axis=0)
    top = int(per_class[:, WAIT_NS].argmax())
    return {
        "contentions": int(per_class[:, CONTENTIONS].sum()),
        "wait_ns": int(per_class[:, WAIT_NS].sum()),
        "top": CLASS_NAMES[LockClass(top)] if per_class[top, WAIT_NS] else "",
    }


def _us(ns: int) -> str:
    """lockdep_proc.c's snprint_time(): ns as us with two decimals."""
    return f"{ns // 1000}.{ns % 1000 // 10:02d}"


def format_proc(stats: Mapping[str, Mapping[str, Any]]) -> str:
    """``stats`` (a :func:`summary`) as ``/proc/lock_stat`` prints it (lock_stat
    version 0.4): every class with acquisitions or contentions, most contended first.

    Columns mqrt measures: contentions, waittime-max, waittime-total, waittime-avg,
    acquisitions.  Printed as 0 / 0.00: con-bounces, waittime-min, acq-bounces and the
    four holdtime columns (not measured).  No contention-point lines (mqrt records no
    call sites).  For debugging; the format follows the kernel's.
    """
    rule = "-" * (40 + 1 + 12 * (14 + 1))
    cols = ("class name", "con-bounces", "contentions", "waittime-min", "waittime-max",
            "waittime-total", "waittime-avg", "acq-bounces", "acquisitions",
            "holdtime-min", "holdtime-max", "holdtime-total", "holdtime-avg")  # fmt: skip
    header = f"{cols[0]:>40}" + "".join(f" {c:>14}" for c in cols[1:])
    lines = ["lock_stat version 0.4", rule, header, rule, ""]
    rows = sorted(
        ((name, s) for name, s in stats.items() if s["contentions"] or s["acquisitions"]),
        key=lambda r: -int(r[1]["contentions"]),
    )
    zero = _us(0)
    for name, s in rows:
        con = int(s["contentions"])
        wait = int(s["wait_ns"])
        line = f"{name[:38]:>40}:{0:>14} {con:>14}"
        line += f" {zero:>14} {_us(int(s['wait_max_ns'])):>14} {_us(wait):>14}"
        line += f" {_us(wait // con if con else 0):>14}"
        line += f" {0:>14} {int(s['acquisitions']):>14}"
        line += f" {zero:>14} {zero:>14} {zero:>14} {zero:>14}"
        lines.append(line)
    return "\n".join(lines) + "\n"

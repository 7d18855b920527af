"""Port of ``lib/percpu-refcount.c``: a reference count that costs one store to a
line of the taking CPU's own while it is live, and that can be killed, drained to
zero and brought back (what a request queue's ``q_usage_counter`` is).

Two modes, as in the kernel (Linux 6.1):

* **per-CPU**: ``flags`` is 0.  A get adds to the calling CPU's counter, a put
  subtracts from the putting CPU's (which may be another CPU than the getter's: only
  the sum of the per-CPU counters means anything).  Each per-CPU counter is written by
  its CPU only, on a line of its own.
* **atomic**: ``flags`` has ``ATOMIC`` (and ``DEAD`` once killed).  Gets and puts go
  to the shared ``count``; the put that takes it to zero is told so (the release).

Switching to atomic needs a grace period: a CPU that read ``flags`` as 0 just before
the kill may still add to its counter, and the counters are folded into ``count``
only once every CPU has passed a quiescent state (:mod:`mqrt.lib.rcu`).  Until the
fold ``count`` carries ``PERCPU_COUNT_BIAS``, so the atomic puts of those stragglers
never take it to zero by mistake.  The get and put below contain no point where an
interrupt (and so the grace period's IPI) can be taken: like the kernel's, they are
RCU read-side sections by construction.

The count of references held, whatever the mode::

    outstanding = count + sum(per-CPU) - (BIAS while not folded)

Ownership and ordering (the rows of docs/ARCHITECTURE.md):

* ``flags``: set by the killer (fetch_or, a full barrier), cleared by the
  resurrector (store_release, after the counters are zero) or by a killer that gives
  up before the fold (``revive``: store_release; the per-CPU counters were never
  moved, so a get that saw the dying flag and one that did not both stay counted);
  every get and put loads it plainly inside its read-side section.  The grace
  period between the kill and the fold is what orders a straggler's per-CPU add
  before the fold.
* per-CPU ``count``: its CPU only (fetch_add) while ``flags`` is 0; zeroed by the
  folder (xchg), after the grace period, when no CPU writes it any more.
* ``count``: atomic-mode gets and puts, the folder and the resurrector, all fully
  ordered RMWs; the put that returns ``nr`` took it to zero.
* ``switching``: the process that kills and folds (1 from the kill to the fold).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mqrt.lib.shm import Arena, Layout, Region, cacheline_struct

#: Added to ``count`` while the per-CPU counters hold the references (1 << 62 in a
#: signed 64-bit count, as the kernel's ``1LU << (BITS_PER_LONG - 1)`` halved).
PERCPU_COUNT_BIAS = 1 << 62


class RefFlag(enum.IntFlag):
    """The mode bits (``__PERCPU_REF_ATOMIC``, ``__PERCPU_REF_DEAD``)."""

    ATOMIC = 1
    DEAD = 2


#: The shared part: its mode and the atomic count, each on its own line.
PERCPU_REF = cacheline_struct(
    [("flags", "<u8")],
    [("count", "<i8"), ("switching", "<u8")],
)
#: One per CPU, a line each: written by that CPU only.
PERCPU_COUNT = cacheline_struct([("count", "<i8")])

_U64 = 1 << 64


def _signed(v: int) -> int:
    return v - _U64 if v >> 63 else v


@dataclass(frozen=True)
class PercpuRefSpec:
    name: str
    header: Region
    percpu: Region  #: ``nr_cpus`` counters

    @property
    def nr_cpus(self) -> int:
        return self.percpu.count


class PercpuRef:
    """One process's handle on a percpu_ref, writing the per-CPU counter of ``cpu``."""

    @staticmethod
    def declare(layout: Layout, name: str, nr_cpus: int) -> PercpuRefSpec:
        return PercpuRefSpec(
            name,
            layout.add(f"{name}.ref", PERCPU_REF),
            layout.add(f"{name}.percpu", PERCPU_COUNT, max(1, nr_cpus)),
        )

    @staticmethod
    def init(arena: Arena, spec: PercpuRefSpec) -> None:
        """percpu_ref_init(): live, per-CPU, holding the initial reference."""
        a = arena.atomic
        o = spec.header.offsets()
        a.set(o.flags, 0)
        a.set(o.count, PERCPU_COUNT_BIAS + 1)
        a.set(o.switching, 0)
        for cpu in range(spec.nr_cpus):
            a.set(spec.percpu.addr(cpu, "count"), 0)

    def __init__(self, arena: Arena, spec: PercpuRefSpec, cpu: int):
        self.spec = spec
        self.a = arena.atomic
        o = spec.header.offsets()
        self.flags_off = o.flags
        self.count_off = o.count
        self.switching_off = o.switching
        #: this CPU's counter
        self.mine = spec.percpu.addr(cpu, "count")
        self._percpu = [spec.percpu.addr(c, "count") for c in range(spec.nr_cpus)]

    # -- every CPU -----------------------------------------------------------------------

    def tryget_live(self, nr: int = 1) -> bool:
        """percpu_ref_tryget_live() (of ``nr`` references): False once killed."""
        a = self.a
        if a.percpu_add(self.flags_off, self.mine, nr):  # per-CPU mode: one C step
            return True
        flags = a.read(self.flags_off)
        if not flags:  # back to per-CPU meanwhile
            return self.tryget_live(nr)
        if flags & RefFlag.DEAD:
            return False
        a.fetch_add(self.count_off, nr)  # atomic and live: never at zero here
        return True

    def put(self, nr: int = 1) -> bool:
        """percpu_ref_put_many(): True if this put took the count to zero (the
        caller runs the release)."""
        a = self.a
        if a.percpu_add(self.flags_off, self.mine, -nr % _U64):  # per-CPU mode
            return False
        return _signed(a.fetch_sub(self.count_off, nr)) == nr

    def is_dying(self) -> bool:
        """percpu_ref_is_dying()."""
        return bool(self.a.read(self.flags_off) & RefFlag.DEAD)

    # -- the process that kills and brings it back (one at a time) ---------------------

    def kill(self) -> None:
        """percpu_ref_kill(), first half: no new reference from now on.  The caller
        lets a grace period pass, then calls :meth:`fold`."""
        a = self.a
        a.set(self.switching_off, 1)
        a.fetch_or(self.flags_off, RefFlag.ATOMIC | RefFlag.DEAD)

    def revive(self) -> None:
        """Undo :meth:`kill` before the fold (a freeze given up mid grace period):
        nothing was moved out of the per-CPU counters, so they still hold every
        reference, and per-CPU mode simply resumes."""
        a = self.a
        a.store_release(self.flags_off, 0)
        a.set(self.switching_off, 0)

    def fold(self) -> bool:
        """After the grace period: move the per-CPU counts into ``count`` (zeroing
        them) and drop the initial reference; True if nothing else is held."""
        a = self.a
        total = 0
        for off in self._percpu:
            total += _signed(a.xchg(off, 0))
        a.fetch_add(self.count_off, (total - PERCPU_COUNT_BIAS) % _U64)
        a.set(self.switching_off, 0)
        return _signed(a.fetch_sub(self.count_off, 1)) == 1

    def is_zero(self) -> bool:
        """percpu_ref_is_zero(): folded, and no reference left."""
        a = self.a
        return (
            bool(a.read(self.flags_off) & RefFlag.ATOMIC)
            and not a.read(self.switching_off)
            and _signed(a.read(self.count_off)) == 0
        )

    def resurrect(self) -> None:
        """percpu_ref_resurrect(): live again with the initial reference, back to
        per-CPU mode.  Only after :meth:`fold` (the per-CPU counters are zero)."""
        a = self.a
        assert not a.read(self.switching_off), "resurrect before the fold"
        a.fetch_add(self.count_off, PERCPU_COUNT_BIAS + 1)
        a.store_release(self.flags_off, 0)

    def outstanding(self) -> int:
        """How many references are held (a snapshot, exact when nothing moves)."""
        a = self.a
        flags = a.read(self.flags_off)
        count = _signed(a.read(self.count_off))
        total = sum(_signed(a.read(off)) for off in self._percpu)
        if not flags or a.read(self.switching_off):
            count -= PERCPU_COUNT_BIAS
        return count + total

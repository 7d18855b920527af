"""Read-copy-update across processes: read-side sections that cost a counter, and
expedited grace periods driven by IPIs (``kernel/rcu/tree_exp.h`` in spirit).

A reader marks its section with :meth:`RcuReader.lock` / :meth:`RcuReader.unlock`:
a process-local nesting count, nothing shared.  A CPU worker takes interrupts only
where it waits (its event loop, a sleep for a tag) or, in a race run, in an
injected window nested in the task's work; so code with no such point inside is a
read-side section by construction, as preempt-disabled code is in the kernel (the
per-CPU reference counts of :mod:`mqrt.lib.percpu_ref`), and code that may take
interrupts inside (a hardware queue's dispatch, which may spin in an injected
window) marks its section.

A grace period (:func:`synchronize_rcu_expedited`, a generator its task yields
from) numbers itself in ``exp_seq``, sets ``exp_pending`` to the number of online
CPUs and sends an ``rcu`` IPI to every other online CPU.  A CPU reports a quiescent
state (:meth:`RcuReader.report_qs`) when it takes that IPI outside any read-side
section, or, if the IPI nested in one, when the outermost section ends (the kernel's
deferred quiescent state); its own CPU reports the same way.  The last report wakes
the waiter.  So when the grace period ends, every read-side section that began
before it started has ended, and every section that begins after a CPU's report
sees whatever the updater stored before it started the grace period.

Ownership and ordering (the rows of docs/ARCHITECTURE.md):

* ``exp_seq``: the updater starting a grace period (xchg, a full barrier, after its
  own stores and after setting ``exp_pending``); reporting CPUs load_acquire it, so
  a report follows the start and the reporter's later reads see the updater's
  earlier stores.
* ``exp_pending``: set by the updater, fetch_sub32 by each reporting CPU once per
  grace period (fully ordered); the one that takes it to 0 wakes ``exp_wq``.
* per-CPU ``exp_seen``: that CPU (or, with no IPI to send, the updater for it): the
  last grace period it reported for.
* per-CPU ``online``: the process that brings the CPU up or down, while no grace
  period runs (both are the one writer task's).
* ``exp_lock``: an updater (test_and_set_bit_lock, held for the whole grace period;
  another updater sleeps on ``exp_wq`` until it is clear).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

from mqrt.lib.shm import Arena, Layout, Region, cacheline_struct, field_offset
from mqrt.lib.wait import WAIT_QUEUE_HEAD, Waiters, WaitEvent, WaitQueue

RCU_STATE = cacheline_struct(
    [("exp_lock", "<u8")],
    [("exp_seq", "<u8"), ("exp_pending", "<i4")],
    [("exp_wq", WAIT_QUEUE_HEAD)],
    [("gps", "<u8")],  # grace periods completed (statistics)
)
RCU_DATA = cacheline_struct([("exp_seen", "<u8"), ("online", "<u4")])

_EXP_WQ = field_offset(RCU_STATE, "exp_wq")


@dataclass(frozen=True)
class RcuSpec:
    state: Region
    percpu: Region

    @property
    def nr_cpus(self) -> int:
        return self.percpu.count


def declare(layout: Layout, nr_cpus: int) -> RcuSpec:
    return RcuSpec(layout.add("rcu", RCU_STATE), layout.add("rcu.data", RCU_DATA, max(1, nr_cpus)))


def init(arena: Arena, spec: RcuSpec) -> None:
    """Owner only: no grace period, every CPU online."""
    a = arena.atomic
    o = spec.state.offsets()
    a.set(o.exp_lock, 0)
    a.set(o.exp_seq, 0)
    a.set32(o.exp_pending, 0)
    a.set(o.gps, 0)
    WaitQueue.init(arena, o.exp_wq)
    for cpu in range(spec.nr_cpus):
        d = spec.percpu.offsets(cpu)
        a.set(d.exp_seen, 0)
        a.set32(d.online, 1)


class RcuNesting:
    """A process's read-side nesting, before (or without) the shared RCU state: a
    process that never takes part in a grace period (the owner) still marks its
    sections."""

    def __init__(self) -> None:
        self.nesting = 0  #: rcu_read_lock() depth (process-local)
        self.deferred = False  #: a quiescent state asked for while inside a section

    def lock(self) -> None:
        """rcu_read_lock()."""
        self.nesting += 1

    def unlock(self) -> None:
        """rcu_read_unlock(): the outermost end reports a deferred quiescent state."""
        self.nesting -= 1
        if not self.nesting and self.deferred:
            self.deferred = False
            self.report_qs()

    def note_qs(self) -> None:
        """A grace period asked this CPU for a quiescent state (its ``rcu`` IPI):
        report now, or at the end of the section the IPI nested in."""
        if self.nesting:
            self.deferred = True
        else:
            self.report_qs()

    def report_qs(self) -> None:
        """Nothing to report without the shared state."""


#: This process's reader (:func:`install` replaces it in a CPU worker).
reader: RcuNesting = RcuNesting()


def install(r: RcuNesting) -> None:
    global reader
    reader = r


class RcuReader(RcuNesting):
    """This process's side of RCU: its read-side nesting and its reports.

    ``send_ipi(cpu)`` asks another CPU for a quiescent state (the CPU worker's
    ``rcu`` IPI); without it (one process playing every CPU, as the in-process rig
    does) nothing else can be inside a section, and a grace period needs only this
    process's own report."""

    def __init__(
        self,
        arena: Arena,
        spec: RcuSpec,
        cpu: int,
        waiters: Waiters,
        send_ipi: Callable[[int], None] | None = None,
    ):
        super().__init__()
        self.a = arena.atomic
        self.spec = spec
        self.cpu = cpu
        self.send_ipi = send_ipi
        o = spec.state.offsets()
        self._lock = o.exp_lock
        self._seq = o.exp_seq
        self._pending = o.exp_pending
        self._gps = o.gps
        self._wq_head = spec.state.addr(0) + _EXP_WQ
        self._wq = WaitQueue(waiters, self._wq_head)
        self._seen = [spec.percpu.addr(c, "exp_seen") for c in range(spec.nr_cpus)]
        self._online = [spec.percpu.addr(c, "online") for c in range(spec.nr_cpus)]

    # -- quiescent states -----------------------------------------------------------

    def report_qs(self) -> None:
        """rcu_report_exp_rdp(): once per grace period; the last report wakes the
        updater."""
        a = self.a
        seq = a.load_acquire(self._seq)
        seen = self._seen[self.cpu]
        if not seq or a.read(seen) == seq:
            return
        a.set(seen, seq)
        if a.fetch_sub32(self._pending, 1) == 1:
            self._wq.wake_up_all()

    def online_cpus(self) -> list[int]:
        a = self.a
        return [c for c, off in enumerate(self._online) if a.read32(off)]

    def set_online(self, cpu: int, online: bool) -> None:
        """CPU hotplug: a CPU leaving stops counting in grace periods."""
        self.a.set32(self._online[cpu], int(online))

    def grace_periods(self) -> int:
        return self.a.read(self._gps)


def synchronize_rcu_expedited(rcu: RcuReader) -> Generator[WaitEvent, None, None]:
    """synchronize_rcu_expedited(), for a task written as a generator: it yields
    :class:`WaitEvent` s (on ``exp_wq``) and returns once every online CPU reported a
    quiescent state after the grace period began.  One grace period at a time: a
    second caller sleeps until the first is done (the kernel's exp_mutex)."""
    a = rcu.a
    lock = rcu._lock
    while a.test_and_set_bit_lock(lock, 0):
        yield WaitEvent(rcu._wq_head, lambda: not a.test_bit(lock, 0))
    try:
        cpus = rcu.online_cpus()
        a.set32(rcu._pending, len(cpus))
        seq = a.read(rcu._seq) + 1
        a.xchg(rcu._seq, seq)  # full barrier: the caller's stores, then the new number
        if rcu.cpu in cpus:
            rcu.note_qs()  # this CPU: now, or at the end of the section it is in
        send = rcu.send_ipi
        for cpu in cpus:
            if cpu != rcu.cpu:
                if send is None:  # one process plays every CPU: none is inside a section
                    _report_for(rcu, cpu, seq)
                else:
                    send(cpu)
        pending = rcu._pending
        if a.read32(pending):
            yield WaitEvent(rcu._wq_head, lambda: not a.read32(pending))
        a.fetch_add(rcu._gps, 1)
    finally:
        a.clear_bit_unlock(lock, 0)
        rcu._wq.wake_up_all()  # a caller waiting for its turn


def _report_for(rcu: RcuReader, cpu: int, seq: int) -> None:
    a = rcu.a
    if a.read(rcu._seen[cpu]) != seq:
        a.set(rcu._seen[cpu], seq)
        if a.fetch_sub32(rcu._pending, 1) == 1:
            rcu._wq.wake_up_all()

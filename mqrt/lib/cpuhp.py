"""CPU hotplug of an emulated CPU: the online and active masks in shared memory and
the state machine that takes a CPU down and brings it up (``kernel/cpu.c`` in spirit).

The states a CPU goes through, with the kernel's names:

* **teardown** (:func:`cpu_down`): the CPU leaves ``cpu_active_mask`` and the task
  that runs on it is given another CPU (``sched_cpu_deactivate()``: the scheduler
  pushes tasks off an inactive CPU); the *offline* callbacks run (the AP states,
  blk-mq's ``blk_mq_hctx_notify_offline()`` among them); the writer waits until the
  task left (``sched_cpu_wait_empty()``); the CPU leaves ``cpu_online_mask``
  (``takedown_cpu()``); the *dead* callbacks run (the BP states, blk-mq's
  ``blk_mq_hctx_notify_dead()``).
* **bringup** (:func:`cpu_up`): the CPU joins ``cpu_online_mask``, the *online*
  callbacks run (``blk_mq_hctx_notify_online()``), it joins ``cpu_active_mask`` and
  its task comes home.

An emulated CPU is a process, and it keeps running while offline: its event loop
still takes the interrupts and IPIs sent to it and its fio task still submits, but
the task submits *as if on its target CPU* (:attr:`CpuhpState.target`), as a task the
scheduler moved would.  The task learns its target between two batches of
submissions (or when a tag it took belongs to an INACTIVE hctx) and says where it
now runs in ``on_cpu``; the writer's wait for that is a wait on the hotplug wait
queue, which the task wakes.  Grace periods still count an offline CPU (its process
still runs read-side sections).

Ownership and ordering (the rows of docs/ARCHITECTURE.md):

* per-CPU ``online``, ``active``, ``target``: the sysfs writer (the one task that
  makes transitions), plain stores; ``nr_offline`` with a fully ordered RMW after
  them.  Readers (every CPU) load them plainly: a CPU that reads a stale ``online``
  sends an IPI or kblockd run to a CPU whose process still runs, so nothing is lost.
* per-CPU ``on_cpu``: the task of that CPU, a store_release, then a wake-up of
  ``wq``; the writer load_acquires it in its wait condition.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mqrt.lib.shm import Arena, Layout, Region, cacheline_struct, field_offset
from mqrt.lib.wait import WAIT_QUEUE_HEAD, Waiters, WaitEvent, WaitQueue

CPUHP_STATE = cacheline_struct(
    [("nr_offline", "<u4"), ("transitions", "<u4")],
    [("wq", WAIT_QUEUE_HEAD)],
)
CPUHP_CPU = cacheline_struct(
    [("online", "<u4"), ("active", "<u4"), ("target", "<u4"), ("on_cpu", "<u4")]
)

_WQ = field_offset(CPUHP_STATE, "wq")

#: The boot CPU: never taken offline (it runs the sysfs writer).
BOOT_CPU = 0
#: ``on_cpu`` of a task that submits no more (its run ended).
TASK_GONE = 0xFFFFFFFF


@dataclass(frozen=True)
class CpuhpSpec:
    state: Region
    percpu: Region

    @property
    def nr_cpus(self) -> int:
        return self.percpu.count


def declare(layout: Layout, nr_cpus: int) -> CpuhpSpec:
    return CpuhpSpec(
        layout.add("cpuhp", CPUHP_STATE), layout.add("cpuhp.cpu", CPUHP_CPU, max(1, nr_cpus))
    )


def init(arena: Arena, spec: CpuhpSpec) -> None:
    """Owner only: every CPU online and active, every task at home."""
    a = arena.atomic
    o = spec.state.offsets()
    a.set32(o.nr_offline, 0)
    a.set32(o.transitions, 0)
    WaitQueue.init(arena, o.wq)
    for cpu in range(spec.nr_cpus):
        d = spec.percpu.offsets(cpu)
        a.set32(d.online, 1)
        a.set32(d.active, 1)
        a.set32(d.target, cpu)
        a.set32(d.on_cpu, cpu)


class CpuhpState:
    """One process's handle on the hotplug state.  ``waiters``: the process's slot,
    to sleep on (the writer) or only to wake (a CPU's task)."""

    def __init__(self, arena: Arena, spec: CpuhpSpec, waiters: Waiters | None = None):
        self.a = arena.atomic
        self.spec = spec
        self.nr_cpus = spec.nr_cpus
        o = spec.state.offsets()
        self._nr_offline = o.nr_offline
        self._transitions = o.transitions
        self.wq_head = spec.state.addr(0) + _WQ
        self.wq = WaitQueue(waiters, self.wq_head) if waiters is not None else None
        rows = [spec.percpu.offsets(c) for c in range(spec.nr_cpus)]
        self._online = [r.online for r in rows]
        self._active = [r.active for r in rows]
        self._target = [r.target for r in rows]
        self._on_cpu = [r.on_cpu for r in rows]

    # -- the masks ---------------------------------------------------------------------

    def nr_offline(self) -> int:
        """How many CPUs are offline (0: every look at the mask can be skipped)."""
        return self.a.read32(self._nr_offline)

    def online(self, cpu: int) -> bool:
        """cpu_online()."""
        return bool(self.a.read32(self._online[cpu]))

    def active(self, cpu: int) -> bool:
        """cpu_active()."""
        return bool(self.a.read32(self._active[cpu]))

    def online_cpus(self) -> list[int]:
        read = self.a.read32
        return [c for c, off in enumerate(self._online) if read(off)]

    def transitions(self) -> int:
        return self.a.read32(self._transitions)

    # -- the tasks -------------------------------------------------------------------

    def target(self, cpu: int) -> int:
        """Where the task of ``cpu`` runs: ``cpu`` itself, or an online CPU."""
        return self.a.read32(self._target[cpu]) if self.nr_cpus > cpu else cpu

    def on_cpu(self, cpu: int) -> int:
        """Where the task of ``cpu`` said it runs."""
        return self.a.load_acquire32(self._on_cpu[cpu])

    def moved(self, cpu: int, where: int) -> None:
        """The task of ``cpu`` now runs on ``where``: say so, wake the writer."""
        self.a.store_release32(self._on_cpu[cpu], where)
        if self.wq is not None:
            self.wq.wake_up_all()

    def task_exit(self, cpu: int) -> None:
        """The task of ``cpu`` submits no more (the run's end): it counts as wherever
        a move puts it."""
        self.moved(cpu, TASK_GONE)

    def settled(self, cpus: Sequence[int]) -> bool:
        """Every task of ``cpus`` runs where its target says (or is gone)."""
        return all(self.on_cpu(c) in (self.target(c), TASK_GONE) for c in cpus)

    def pick_target(self, leaving: int) -> int:
        """The CPU the tasks on ``leaving`` move to: the next active CPU after it (the
        boot CPU is always active)."""
        read = self.a.read32
        n = self.nr_cpus
        for i in range(1, n):
            c = (leaving + i) % n
            if read(self._active[c]):
                return c
        return BOOT_CPU

    # -- the writer's stores ---------------------------------------------------------

    def _set(self, offs: list[int], cpu: int, value: int) -> None:
        self.a.set32(offs[cpu], value)


class HotplugCallbacks(Protocol):
    """A subsystem's hotplug states (``cpuhp_setup_state_multi()``)."""

    def offline(self, cpu: int) -> Generator[Any, None, dict[str, Any]]: ...
    def dead(self, cpu: int) -> dict[str, Any]: ...
    def online(self, cpu: int) -> dict[str, Any]: ...


Step = Any  #: what a callback yields: the sysfs writer's Wait or Sleep


def cpu_down(
    hp: CpuhpState, cpu: int, callbacks: Sequence[HotplugCallbacks], clock: Callable[[], int]
) -> Generator[Step, None, dict[str, Any]]:
    """_cpu_down(): deactivate and move its tasks, the offline callbacks, wait for the
    tasks to leave, out of the online mask, the dead callbacks.  Returns the
    callbacks' reports merged, with ``migrate_wait_ns`` and ``target``."""
    a = hp.a
    if cpu == BOOT_CPU:
        raise ValueError("the boot CPU cannot go offline")
    report: dict[str, Any] = {}
    hp._set(hp._active, cpu, 0)
    target = hp.pick_target(cpu)
    moved = [c for c in range(hp.nr_cpus) if c == cpu or hp.target(c) == cpu]
    for c in moved:
        hp._set(hp._target, c, target)
    a.fetch_add32(hp._transitions, 1)  # a full barrier: the targets before the callbacks
    report["target"] = target
    try:
        for cb in callbacks:
            report.update((yield from cb.offline(cpu)))
        t0 = clock()
        if not hp.settled(moved):
            yield WaitEvent(hp.wq_head, lambda: hp.settled(moved))
        report["migrate_wait_ns"] = clock() - t0
    except BaseException:
        # stopped half-way (the run ends): back up as cpuhp's rollback does
        for cb in callbacks:
            cb.online(cpu)
        hp._set(hp._target, cpu, cpu)
        hp._set(hp._active, cpu, 1)
        a.fetch_add32(hp._transitions, 1)
        raise
    hp._set(hp._online, cpu, 0)
    a.fetch_add32(hp._nr_offline, 1)
    for cb in reversed(callbacks):
        report.update(cb.dead(cpu))
    return report


def cpu_up(hp: CpuhpState, cpu: int, callbacks: Sequence[HotplugCallbacks]) -> dict[str, Any]:
    """_cpu_up(): into the online mask, the online callbacks, active again; its own
    task comes home (the tasks of other CPUs stay where they are)."""
    a = hp.a
    hp._set(hp._online, cpu, 1)
    a.fetch_sub32(hp._nr_offline, 1)
    report: dict[str, Any] = {}
    for cb in callbacks:
        report.update(cb.online(cpu))
    hp._set(hp._target, cpu, cpu)
    hp._set(hp._active, cpu, 1)
    a.fetch_add32(hp._transitions, 1)
    return report

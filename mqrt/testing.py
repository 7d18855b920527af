"""The in-process blk-mq rig: the real block layer in the caller's process, stepped
by hand.

:class:`Rig` builds one real arena holding a driver's tag sets and request queues
(real tags on real atomics, the request pool, wait queues) and one :class:`BlkMq`
per emulated CPU, all in the calling process.  Each CPU's services (softirqs,
hrtimers, completion IPIs, kblockd, requeue work) are a :class:`ScriptedCpu` that
only records what blk-mq asks for; nothing runs until the caller says so
(:meth:`ScriptedCpu.run_softirqs`, :meth:`ScriptedCpu.run_kblockd`, ...).
:class:`ScriptOps` is a driver whose ``->queue_rq`` answers from a script.

This is public API for tests and benchmarks: the deterministic interleaving tests
use it to decide which request is busy and when kblockd runs, and
``mqrt microbench``'s in-process data-path cases (``blk_mq.io``) measure a CPU's
work per I/O with it, without an event loop.  Behaviour across processes runs on
real CPU workers (:mod:`mqrt.runtime.owner`).
"""

from __future__ import annotations

import heapq
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from mqrt.block.blk_mq import BlkMq
from mqrt.block.blk_mq_cpumap import Topology
from mqrt.block.blk_mq_setup import init_shared, teardown
from mqrt.block.blk_mq_structs import HwCtxSpec, Request, RequestQueue, TagSet
from mqrt.block.blk_mq_types import BlkMqOps, BlkStatus, EhRet
from mqrt.lib import cpuhp, rcu
from mqrt.lib.shm import Arena, Layout
from mqrt.lib.wait import Waiters


class ScriptedCpu:
    """A :class:`~mqrt.block.blk_mq_structs.CpuSys` for one CPU in the caller's
    process: it records what blk-mq asks for and runs nothing until the caller says so.

    Softirqs queue in :attr:`softirqs` (run by :meth:`run_softirqs`), hrtimers in
    :attr:`timers` (never fired), local kblockd runs in :attr:`runs` (run by
    :meth:`run_kblockd`), another CPU's in :attr:`remote_runs`, completion IPIs in
    :attr:`ipis`, requeue kicks in :attr:`requeue_kicks` (run by
    :meth:`run_requeue`) and finished bios in :attr:`done`.  It cannot sleep: a tag
    wait fails the test (use ``nowait`` or free tags first).
    """

    def __init__(self, cpu: int = 0):
        self.cpu = cpu
        self.softirqs: deque = deque()
        self.timers: list = []
        self._seq = 0
        self.runs: dict[tuple[int, int], int] = {}  # (q, hctx) -> delay asked
        self.remote_runs: list[tuple[int, int, int, int]] = []
        self.ipis: list[tuple[int, int, int, int]] = []
        self.requeue_kicks: list[int] = []
        self.done: list[tuple[int, int, tuple]] = []  # (cpu, q, info)
        self.mq: BlkMq | None = None

    def raise_softirq(self, fn, a, b):
        self.softirqs.append((fn, a, b))

    def add_timer(self, expires_ns, fn, *args):
        self._seq += 1
        heapq.heappush(self.timers, (expires_ns, self._seq, fn, args))

    def ipi_complete(self, cpu, q, rq_id, gen):
        self.ipis.append((cpu, q, rq_id, gen))

    def kblockd_run(self, cpu, q, hctx, delay_ns):
        if cpu == self.cpu:
            self.runs[(q, hctx)] = delay_ns
        else:
            self.remote_runs.append((cpu, q, hctx, delay_ns))

    def kick_requeue(self, q):
        self.requeue_kicks.append(q)

    def bio_done(self, cpu, q, info):
        self.done.append((cpu, q, info))

    def schedule(self):
        raise AssertionError("the rig's CPU cannot sleep: use nowait or free tags first")

    def idle_wait(self):
        raise AssertionError("the rig's CPU cannot wait: complete, fire or run what it waits for")

    # -- the caller drives these ------------------------------------------------------

    def run_softirqs(self) -> int:
        """Run the raised softirqs, including any they raise; how many ran."""
        n = 0
        while self.softirqs:
            fn, a, b = self.softirqs.popleft()
            fn(a, b)
            n += 1
        return n

    def run_kblockd(self) -> int:
        """Run the hctxs kblockd was asked to run on this CPU (delays ignored); how many."""
        runs, self.runs = self.runs, {}
        for q, h in runs:
            self.mq.run_work(q, h)  # type: ignore[union-attr]
        return len(runs)

    def run_requeue(self) -> None:
        """Run the requeue work of every queue that was kicked, once each."""
        kicks, self.requeue_kicks = self.requeue_kicks, []
        for q in dict.fromkeys(kicks):
            self.mq.requeue_work(q)  # type: ignore[union-attr]


class Rig:
    """The block layer of ``nr_cpus`` emulated CPUs in this process.

    ``setup(layout, topology)`` declares the driver's tag sets and queues and returns
    ``(ops, queues)``, as a driver's ``setup`` does for the runtime; the rig adds the
    waiter table, creates and initialises the arena, and makes one :class:`BlkMq`
    (:attr:`mqs`) and one :class:`ScriptedCpu` (:attr:`cpus`) per CPU of ``on_cpus``
    (default: every CPU; a subset keeps a rig of many CPUs cheap), in that order.  The
    driver is bound to CPU ``cpu``.  :meth:`close` releases everything (the arena is
    unlinked).  With ``hotplug`` the rig has CPU hotplug's state
    (:mod:`mqrt.lib.cpuhp`: :attr:`hotplug`) and every CPU's block layer follows it.
    """

    def __init__(
        self,
        setup: Callable[[Layout, Topology], tuple[BlkMqOps, list[RequestQueue]]],
        nr_cpus: int = 1,
        cpu: int = 0,
        on_cpus: Sequence[int] | None = None,
        hotplug: bool = False,
    ):
        self.layout = Layout()
        self.topology = Topology.emulated(nr_cpus)
        self.ops, self.queues = setup(self.layout, self.topology)
        self.wspec = Waiters.declare(self.layout, nr_cpus)
        self.rcu_spec = rcu.declare(self.layout, nr_cpus)
        self.cpuhp_spec = cpuhp.declare(self.layout, nr_cpus) if hotplug else None
        self.arena = Arena.create(self.layout)
        init_shared(self.arena, self.queues)
        self.ops.init_shared(self.arena)
        Waiters.init(self.arena, self.wspec)
        rcu.init(self.arena, self.rcu_spec)
        if self.cpuhp_spec is not None:
            cpuhp.init(self.arena, self.cpuhp_spec)
        self.eventfds = Waiters.create_eventfds(self.wspec)
        # One process plays every CPU: a grace period needs no IPI (none of the others
        # can be inside a read-side section while this one runs).
        self._rcu = rcu.RcuReader(
            self.arena, self.rcu_spec, cpu, Waiters(self.arena, self.wspec, self.eventfds, None)
        )
        rcu.install(self._rcu)
        self.cpus: list[ScriptedCpu] = []
        self.mqs: list[BlkMq] = []
        on_cpus = list(range(nr_cpus)) if on_cpus is None else list(on_cpus)
        for c in on_cpus:
            sys_ = ScriptedCpu(c)
            mq = BlkMq(
                self.arena, Waiters(self.arena, self.wspec, self.eventfds, c), c, self.queues, sys_
            )
            sys_.mq = mq
            if self.cpuhp_spec is not None:
                mq.hotplug = cpuhp.CpuhpState(self.arena, self.cpuhp_spec, mq.waiters)
            self.cpus.append(sys_)
            self.mqs.append(mq)
        self.ops.bind(self.arena, self.mqs[on_cpus.index(cpu)], cpu)
        #: CPU hotplug's state as the first CPU sees it (None without ``hotplug``)
        self.hotplug = self.mqs[0].hotplug

    @property
    def mq(self) -> BlkMq:
        """The first CPU's block layer (CPU 0's by default)."""
        return self.mqs[0]

    @property
    def sys(self) -> ScriptedCpu:
        """The first CPU's services."""
        return self.cpus[0]

    def teardown(self) -> None:
        """The driver's remove path on the rig's queues (while the arena is still
        there): :func:`~mqrt.block.blk_mq_setup.teardown`."""
        teardown(self.queues)

    def close(self) -> None:
        if rcu.reader is self._rcu:  # the latest rig's: gone with its arena
            rcu.install(rcu.RcuNesting())
        for mq in self.mqs:
            mq.close()
        for fd in self.eventfds:
            os.close(fd)
        self.arena.close()


class ScriptOps(BlkMqOps):
    """A driver whose ops answer from scripts.

    ``->queue_rq`` consumes ``script``, a list of statuses, one per call (then OK); a
    request it accepts is started and kept in :attr:`started` for the caller to
    complete; ``->timeout`` completes the request with ``BLK_STS_TIMEOUT`` and
    records its id in :attr:`timed_out`.

    The set-up and tear-down ops are recorded in order in :attr:`lifecycle` as
    ``(op, hctx_idx, tag)`` (``tag`` -1 for the hctx ops); ``->init_hctx`` and
    ``->init_request`` return the next errno of ``init_hctx_script`` /
    ``init_request_script`` (0 once a script is used up), and ``->init_hctx`` sets
    the hctx's ``driver_data`` to ``("script", hctx_idx)``."""

    name = "script"

    def __init__(
        self,
        script: list[int] | None = None,
        *,
        init_hctx_script: list[int] | None = None,
        init_request_script: list[int] | None = None,
    ):
        self.script = list(script or [])
        self.init_hctx_script = list(init_hctx_script or [])
        self.init_request_script = list(init_request_script or [])
        self.started: list[Any] = []
        self.timed_out: list[int] = []
        self.calls = 0
        self.last_flags: list[bool] = []
        self.lifecycle: list[tuple[str, int, int]] = []

    def queue_rq(self, mq, hctx, rq, last):
        self.calls += 1
        self.last_flags.append(last)
        if self.script:
            status = self.script.pop(0)
            if status:
                return status
        mq.start_request(rq)
        self.started.append(rq)
        return 0

    def timeout(self, mq, rq, gen):
        self.timed_out.append(rq.id)
        mq.complete_request(rq, gen, status=BlkStatus.TIMEOUT)
        return EhRet.DONE

    def init_hctx(self, hctx: HwCtxSpec, driver_data: Any, hctx_idx: int) -> int:
        self.lifecycle.append(("init_hctx", hctx_idx, -1))
        ret = self.init_hctx_script.pop(0) if self.init_hctx_script else 0
        if not ret:
            hctx.driver_data = ("script", hctx_idx)
        return ret

    def exit_hctx(self, hctx: HwCtxSpec, hctx_idx: int) -> None:
        self.lifecycle.append(("exit_hctx", hctx_idx, -1))

    def init_request(self, tset: TagSet, rq: Request, hctx_idx: int, numa_node: int) -> int:
        self.lifecycle.append(("init_request", hctx_idx, rq.tag))
        return self.init_request_script.pop(0) if self.init_request_script else 0

    def exit_request(self, tset: TagSet, rq: Request, hctx_idx: int) -> None:
        self.lifecycle.append(("exit_request", hctx_idx, rq.tag))

    def calls_of(self, op: str) -> list[tuple[int, int]]:
        """The (hctx_idx, tag) of every recorded call of ``op``."""
        return [(h, t) for name, h, t in self.lifecycle if name == op]

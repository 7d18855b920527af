"""An in-process rig for the block layer: one real arena, real tags, requests and
wait queues, and CPUs whose interrupts, timers and kblockd runs are driven step by
step by the caller instead of by worker processes.

Used by the deterministic interleaving tests (which request is busy, when a timer
fires, when kblockd runs) and by ``mqrt microbench``'s in-process data-path cases;
the multi-process behaviour runs on real workers (:mod:`mqrt.runtime.owner`).
"""

from __future__ import annotations

import heapq
import os
from collections import deque
from collections.abc import Callable

from mqrt.block.blk_mq import BlkMq
from mqrt.block.blk_mq_cpumap import Topology
from mqrt.block.blk_mq_setup import init_shared
from mqrt.block.blk_mq_structs import RequestQueue
from mqrt.block.blk_mq_types import BlkMqOps
from mqrt.lib.shm import Arena, Layout
from mqrt.lib.wait import Waiters


class ScriptedCpu:
    """CpuSys for one CPU in the caller's process: nothing runs until the caller says so."""

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
        n = 0
        while self.softirqs:
            fn, a, b = self.softirqs.popleft()
            fn(a, b)
            n += 1
        return n

    def fire_timers(self) -> int:
        n = 0
        while self.timers:
            _, _, fn, args = heapq.heappop(self.timers)
            fn(*args)
            n += 1
        return n

    def run_kblockd(self) -> int:
        runs, self.runs = self.runs, {}
        for q, h in runs:
            self.mq.run_work(q, h)  # type: ignore[union-attr]
        return len(runs)

    def run_requeue(self) -> None:
        kicks, self.requeue_kicks = self.requeue_kicks, []
        for q in dict.fromkeys(kicks):
            self.mq.requeue_work(q)  # type: ignore[union-attr]


class Rig:
    """Layout -> arena -> BlkMq on CPU ``cpu`` of ``nr_cpus``; close() when done."""

    def __init__(
        self,
        setup: Callable[[Layout, Topology], tuple[BlkMqOps, list[RequestQueue]]],
        nr_cpus: int = 1,
        cpu: int = 0,
    ):
        self.layout = Layout()
        self.topology = Topology.emulated(nr_cpus)
        self.ops, self.queues = setup(self.layout, self.topology)
        self.wspec = Waiters.declare(self.layout, nr_cpus)
        self.arena = Arena.create(self.layout)
        init_shared(self.arena, self.queues)
        self.ops.init_shared(self.arena)
        Waiters.init(self.arena, self.wspec)
        self.eventfds = Waiters.create_eventfds(self.wspec)
        self.cpus: list[ScriptedCpu] = []
        self.mqs: list[BlkMq] = []
        for c in range(nr_cpus):
            sys_ = ScriptedCpu(c)
            mq = BlkMq(
                self.arena, Waiters(self.arena, self.wspec, self.eventfds, c), c, self.queues, sys_
            )
            sys_.mq = mq
            self.cpus.append(sys_)
            self.mqs.append(mq)
        self.ops.bind(self.arena, self.mqs[cpu], cpu)

    @property
    def mq(self) -> BlkMq:
        return self.mqs[0]

    @property
    def sys(self) -> ScriptedCpu:
        return self.cpus[0]

    def close(self) -> None:
        for mq in self.mqs:
            mq.close()
        for fd in self.eventfds:
            os.close(fd)
        self.arena.close()

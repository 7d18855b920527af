"""The runtime: builds a run, owns its shared memory, starts the CPUs, collects what
they measured, and cleans up on every path.

::

    runtime (owner)
      | layout <- driver setup (alloc_tag_set: the request pools, ->init_request;
      |           init_queue: ->init_hctx) + waiters + CPU stats
      | arena = Arena.create(layout); init tags, lists; the pools moved in; ops.init_shared
      | eventfds (one per CPU waiter, one for CPU 0's sysfs writer), IPI pipes,
      |   ops.make_fds, control + result pipes
      | the driver's device, if it has one: ops.start_device -> "ready" -> ops.probe
      | fork CPU 0..N-1 (pinned to host cores, wrapping around)
      |          \\-- each: ready -> start -> run -> drain -> drained -> exit -> result
      | mqrt.runtime.manager: ready barrier (all CPUs "ready") -> start at t0 (Phase.RUNNING)
      | one wait point: result pipes + process sentinels (+ a timeout for progress)
      |   a CPU that dies: noticed at once (its sentinel), reported with its role,
      |   CPU and signal; the others are stopped and report what they measured
      | all drained -> exit (Phase.EXIT) -> results -> invariants (checked in the arena)
      \\-- finally: join with a deadline, SIGTERM, SIGKILL; teardown (cleanup_queue,
          free_tag_set: ->exit_hctx, ->exit_request); close fds; unlink arena

The driver is reached only through :class:`~mqrt.block.blk_mq_types.BlkMqOps`; the
children's control messages are those of :mod:`mqrt.lib.wire`.  What a run is given and
what it returns are in :mod:`mqrt.runtime.spec`; how the owner talks to its children and
reaps them, in :mod:`mqrt.runtime.children`.

Every exit path (normal end, a user error, an exception, Ctrl-C, SIGTERM, a child
killed) leaves no process and no ``/dev/shm`` segment behind.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

from mqrt.block import blk_sysfs
from mqrt.block.blk_mq import Pools, release_pools
from mqrt.block.blk_mq_cpumap import Topology, format_cpulist, host_cpus, pin_plan
from mqrt.block.blk_mq_setup import init_shared, prepare_cpus, teardown
from mqrt.block.blk_mq_structs import BlkMqError
from mqrt.block.blk_mq_types import DeviceProcess
from mqrt.block.blk_sysfs import QueueInfo, TimedWrite
from mqrt.lib import cpuhp, inject, lockstat, proc, rcu, signals, wire
from mqrt.lib import wait as wait_mod
from mqrt.lib.shm import Arena, Layout
from mqrt.lib.trace import TraceSpec
from mqrt.lib.wait import Waiters
from mqrt.runtime import manifest
from mqrt.runtime.children import (
    JOIN_TIMEOUT_S,
    READY_TIMEOUT_S,
    exit_name,
    kill,
    reap,
    recv,
    send,
)
from mqrt.runtime.manager import Manager
from mqrt.runtime.spec import RunError, RunResult, RunSpec
from mqrt.runtime.watchdog import Watchdog

_fork = mp.get_context("fork")


@contextlib.contextmanager
def _frozen_gc() -> Iterator[None]:
    """While the CPUs fork: every object the owner has so far is moved out of the
    collector's reach (gc.freeze()).  A child's collections then never walk the
    inherited heap, which would write to (and so copy) every page of it: set-up
    and run time, and memory, of each of hundreds of children.  The owner takes
    its objects back afterwards."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _bind_timeline(writes: list[TimedWrite], queues: list, nr_cpus: int) -> list[TimedWrite]:
    """The timeline's writes with the queues they go to, checked against the queues
    the driver's setup built (the command checked them against its configuration
    already; a difference is a BlkMqError naming the write)."""
    infos = [
        QueueInfo(
            q.name,
            q.index,
            q.tag_set.queue_depth,
            q.tag_set.reserved_tags,
            q.tag_set.name,
            q.tag_set.max_hw_queues,
        )
        for q in queues
    ]
    out = []
    for w in writes:
        try:
            out += blk_sysfs.bind([w], infos, nr_cpus)
        except blk_sysfs.SysfsError as exc:
            raise BlkMqError(f"{w.source}: {w.text!r}: {exc}") from None
    return out


def run(spec: RunSpec) -> RunResult:
    """Run one job on every emulated CPU (and the driver's device process, if it has
    one) and return what they measured."""
    return _Run(spec).run()


class _Run:
    """One run: build, start, drive, collect, clean up."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.n = spec.nr_cpus
        self.t_begin = time.monotonic()
        self.allowed = spec.cpus_allowed or host_cpus()
        if spec.cpus_per_core:
            self.topology = Topology.emulated(spec.nr_cpus, spec.cpus_per_core)
        else:
            self.topology = Topology.host(spec.nr_cpus, self.allowed)
        self.plan_cores = pin_plan(spec.nr_cpus, self.allowed)
        self.messages: list[str] = []
        if spec.nr_cpus > len(self.allowed):
            self.messages.append(
                f"{spec.nr_cpus} emulated CPUs on {len(self.allowed)} host cores "
                f"({format_cpulist(self.allowed)}): pinning wraps around, CPUs share cores"
            )
        self.procs: list[Any] = []  # every child, CPUs first, then the device
        self.fds: list[int] = []
        self.conns: list[Any] = []
        self.dev: DeviceProcess | None = None  # the driver's device process, if any
        self.device_result: dict[str, Any] = {}
        self.device_info: dict[str, Any] = {}
        self.pools: Pools = {}  #: the CPUs' shared request accessors (prepare_cpus)
        self.timeline: list[TimedWrite] | None = None  #: spec.timeline bound to the queues

    def run(self) -> RunResult:
        from mqrt.workers import live
        from mqrt.workers.cpu import CPU_STATS

        spec = self.spec
        layout = Layout()
        self.superblock = manifest.declare(layout)  # offset 0: what an inspector reads first
        self.ops, self.queues, self.dev_bytes = spec.setup(layout, self.topology)
        for q in self.queues:
            self.messages.extend(q.tag_set.messages)
        self.messages = list(dict.fromkeys(self.messages))
        if spec.timeline:
            self.timeline = _bind_timeline(spec.timeline, self.queues, self.n)
        # a slot per CPU, and one for the sysfs writer task of CPU 0 (its slot: n)
        self.wspec = Waiters.declare(layout, self.n + 1)
        self.stats_region = layout.add("cpu_stats", CPU_STATS, self.n)
        self.live_spec = live.declare(layout, self.n, [len(q.hctxs) for q in self.queues])
        self.lock_stat_region = lockstat.declare(layout, self.n)
        self.rcu_spec = rcu.declare(layout, self.n)
        # CPU hotplug's masks: only for a run whose timeline takes CPUs offline
        self.cpuhp_spec = (
            cpuhp.declare(layout, self.n)
            if any(w.attr == blk_sysfs.CPU_ONLINE for w in self.timeline or ())
            else None
        )
        self.trace_spec = (
            TraceSpec.declare(layout, self.n, spec.trace_entries) if spec.trace_entries else None
        )
        # last: the declarations above, for mqrt inspect and mqrt top
        self.manifest_region, self.manifest_blob = manifest.seal(layout, self._manifest(layout))
        # Ctrl-C, SIGTERM, SIGHUP: mqrt.lib.signals (the Manager stops the run on the
        # first; a second one, or one before the CPUs run, unwinds through here)
        with signals.handled(), Arena.create(layout, guard=True) as arena:
            self.arena = arena
            if spec.on_start is not None:
                spec.on_start(f"run {arena.name}: owner pid {os.getpid()}, {self.n} CPUs")
            stopping = False
            try:
                self._init_arena()
                if spec.on_published is not None:
                    spec.on_published(arena.name)
                with signals.forking():
                    self._start_device()
                inject.configure(spec.inject or {}, spec.seed, spec.inject_irqs)
                with signals.forking(), _frozen_gc():
                    self._start_cpus()
                return self._drive()
            except KeyboardInterrupt:
                stopping = True  # the children were not told to exit: do not wait for them
                raise
            finally:
                with signals.shielded():
                    self._cleanup(stopping)

    def _manifest(self, layout: Layout) -> manifest.Manifest:
        import mqrt

        return manifest.Manifest(
            mqrt_version=mqrt.__version__,
            cmdline=list(sys.argv),
            nr_cpus=self.n,
            driver=type(self.ops).__name__,
            layout=layout,
            queues=self.queues,
            waiters=self.wspec,
            cpu_stats=self.stats_region,
            rcu=self.rcu_spec,
            cpuhp=self.cpuhp_spec,
            trace=self.trace_spec,
            extra={"live": self.live_spec, "lock_stat": self.lock_stat_region},
        )

    def _cleanup(self, stopping: bool) -> None:
        inject.configure({})
        reap(self.procs, join_s=0.0 if stopping else JOIN_TIMEOUT_S)
        # The driver's remove path; a run that left requests in flight has
        # reported them (invariants), and its queues stay as they are.
        release_pools(self.pools)  # the owner's own views, before the arena closes
        with contextlib.suppress(BlkMqError):
            teardown(self.queues)
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _init_arena(self) -> None:
        arena, ops = self.arena, self.ops
        init_shared(arena, self.queues, self.spec.seed)
        ops.init_shared(arena)
        Waiters.init(arena, self.wspec)
        rcu.init(arena, self.rcu_spec)
        if self.cpuhp_spec is not None:
            cpuhp.init(arena, self.cpuhp_spec)
        manifest.publish(arena, self.superblock, self.manifest_region, self.manifest_blob, self.n)
        del self.manifest_blob
        self.eventfds = Waiters.create_eventfds(self.wspec)
        self.fds += self.eventfds
        self.fds += ops.make_fds()
        self.ipi_r, self.ipi_w = [], []
        for _ in range(self.n):
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.ipi_r.append(r)
            self.ipi_w.append(w)
        self.fds += self.ipi_r + self.ipi_w

    @property
    def device(self) -> BaseProcess | None:
        """The device process, if the driver has one."""
        return self.dev.process if self.dev is not None else None

    def _start_device(self) -> None:
        """Fork the driver's device (if it has one), wait for it, and let the driver
        probe it."""
        dev = self.ops.start_device(self.arena, None)
        if dev is None:
            return
        p, ctl, res = dev
        self.procs.append(p)
        self.conns += [ctl, res]
        self.dev = dev
        hung = self._device_watch(p)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not wait([res, p.sentinel], timeout=0.1) and time.monotonic() < deadline:
            hung()
        msg = recv(res) if res.poll() else None
        if msg is None:  # it died (its pipe closed), or never said ready
            p.join(1.0)
            how = exit_name(p.exitcode)
            what = f"died: {how}" if p.exitcode is not None else "did not start: still running"
            raise RunError(
                f"device (pid {p.pid}) {what} (before it was ready)",
                dead={"role": "device", "pid": p.pid, "how": how},
            )
        if not isinstance(msg, wire.Ready):
            error = msg.error if isinstance(msg, wire.Error) else None
            raise RunError(f"device (pid {p.pid}) failed to start: {error}")
        previous, wait_mod.long_spin_hook = wait_mod.long_spin_hook, hung
        try:
            self.device_info = self.ops.probe(self.arena)
        except RunError:
            raise  # the device hung while probed (the watch above)
        except RuntimeError as exc:
            raise RunError(f"{exc} (device pid {p.pid}: {exit_name(p.exitcode)})") from None
        finally:
            wait_mod.long_spin_hook = previous

    def _device_watch(self, p: BaseProcess) -> Callable[[], None]:
        """While the owner waits for the device (its start, the driver's probe): a
        check that raises RunError naming a device that died, or that was found
        stopped, spinning or blocked (:mod:`mqrt.runtime.watchdog`: then it is
        killed)."""
        assert p.pid is not None

        def heartbeat() -> tuple[int, str]:
            return self.ops.device_counters(self.arena).get("heartbeat_ns", 0), "starting"

        dog = Watchdog([], lambda i: (0, ""), p.pid, heartbeat)

        def check() -> None:
            if p.exitcode is not None or (dog.due() and not p.is_alive()):
                how = exit_name(p.exitcode)
                raise RunError(
                    f"device (pid {p.pid}) died: {how} (while it was being set up)",
                    dead={"role": "device", "pid": p.pid, "how": how},
                )
            for stall in dog.check([], True):
                kill(p)
                raise RunError(
                    f"device (pid {stall.pid}) hung: {stall.describe()}: killed",
                    dead={"role": "device", "pid": stall.pid, "how": f"hung ({stall.verdict})",
                          "hung": stall.to_dict()},
                )  # fmt: skip

        return check

    def _start_cpus(self) -> None:
        import numpy.random  # noqa: F401  (the jobs' generators: imported once, here)

        from mqrt.lib.sbitmap import SbitmapQueue

        spec, queues, ops = self.spec, self.queues, self.ops
        # what every CPU's handles share, made once and inherited (mqrt.block.blk_mq_setup)
        self.pools = prepare_cpus(self.arena, queues)
        proc.prepare()
        # a watched run counts every tag map's frees (the detectors' evidence); the
        # CPUs inherit the switch through fork
        SbitmapQueue.count_frees = spec.detect
        timeout_cpu = [q.index % self.n for q in queues]
        # the driver's timer (if any) runs on the first CPU of the queue's hctx 0
        timer_cpu = [q.hctx_cpus[0][0] if ops.timer_interval_ns(q.index) else -1 for q in queues]
        self.ctl_w: list[Any] = []
        self.res_r: list[Any] = []
        child_ends: list[Any] = []
        t_fork = time.monotonic()
        # The gate: each CPU waits on it before its set-up, until the last fork
        # (EOF once the owner and every child closed the write end).  The forks
        # then do not queue behind hundreds of set-ups on the same few cores.
        gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
        try:
            self._fork_cpus((gate_r, gate_w), timeout_cpu, timer_cpu, child_ends)
        finally:
            os.close(gate_w)  # the CPUs go
            os.close(gate_r)
        for c in child_ends:
            c.close()
        if spec.on_event is not None:
            spec.on_event(
                f"forked {self.n} CPUs in {(time.monotonic() - t_fork) * 1e3:.0f} ms "
                f"({(time.monotonic() - self.t_begin) * 1e3:.0f} ms into the run)"
            )

    def _fork_cpus(
        self,
        gate: tuple[int, int],
        timeout_cpu: list[int],
        timer_cpu: list[int],
        child_ends: list[Any],
    ) -> None:
        """Fork the CPUs, one after another (each waits at the gate)."""
        from mqrt.workers.cpu import CpuPlan, cpu_main, preempt_points

        spec, queues = self.spec, self.queues
        for cpu in range(self.n):
            c_r, c_w = _fork.Pipe(duplex=False)
            r_r, r_w = _fork.Pipe(duplex=False)
            self.conns += [c_r, c_w, r_r, r_w]
            child_ends += [c_r, r_w]
            plan = CpuPlan(
                cpu=cpu,
                host_core=self.plan_cores[cpu] if spec.pin else None,
                preempt_points=preempt_points(spec.nr_cpus, len(self.allowed)),
                arena=self.arena,
                waiters=self.wspec,
                eventfds=self.eventfds,
                ipi_r=self.ipi_r,
                ipi_w=self.ipi_w,
                stats=self.stats_region,
                live=self.live_spec,
                lock_stat=self.lock_stat_region,
                queues=queues,
                driver=self.ops,
                job=spec.cpu_jobs[cpu] if spec.cpu_jobs else spec.job,
                dev_bytes=self.dev_bytes,
                timeout_scan_cpu=timeout_cpu,
                timer_cpu=timer_cpu,
                seed=spec.seed,
                owner_pid=os.getpid(),
                mode=spec.mode,
                queue_jobs=spec.queue_jobs,
                rcu=self.rcu_spec,
                hotplug=self.cpuhp_spec,
                timeline=self.timeline if cpu == 0 else None,
                writer_slot=self.n,
                trace=self.trace_spec,
                profile_dir=spec.profile_dir,
                pools=self.pools,
                gate=gate,
            )
            p = proc.fork(cpu_main, (plan, c_r, r_w), f"mqrt-cpu{cpu}")
            self.procs.insert(cpu, p)
            self.ctl_w.append(c_w)
            self.res_r.append(r_r)

    def _drive(self) -> RunResult:
        """Drive the started CPUs to the run's result (:class:`~mqrt.runtime.manager.Manager`)."""
        return Manager(self).run()

    def _device_died(self, dev: DeviceProcess) -> dict[str, Any]:
        p = dev.process
        p.join(0.1)
        error = ""
        while dev.res.poll(0):
            msg = recv(dev.res)
            if msg is None:
                break
            if isinstance(msg, wire.Error):
                error = msg.error
        counters = self.ops.device_counters(self.arena)
        self.device_result = {"counters": counters, "workers": self.ops.device_workers(self.arena)}
        return {"role": "device", "pid": p.pid, "how": exit_name(p.exitcode), "error": error,
                "partial": counters}  # fmt: skip

    def _stop_device(
        self, dev: DeviceProcess, stalled: Callable[[], dict[str, Any] | None] = lambda: None
    ) -> dict[str, Any] | None:
        """Disable the controller, tell the device to exit, collect its counters;
        ``stalled()`` says, while it is waited for, that it hung (then it is killed)."""
        with contextlib.suppress(Exception):
            self.ops.shutdown(self.arena)
        send(dev.ctl, wire.Exit())
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while time.monotonic() < deadline:
            if not wait([dev.res, dev.process.sentinel], timeout=0.1):
                if (hung := stalled()) is not None:
                    kill(dev.process)
                    return self._device_died(dev) | hung
                continue
            msg = recv(dev.res) if dev.res.poll() else None
            if isinstance(msg, wire.DeviceResult):
                self.device_result = {
                    "counters": msg.counters,
                    "workers": self.ops.device_workers(self.arena),
                }
                return None
            if msg is None and not dev.process.is_alive():
                return self._device_died(dev)
        return self._device_died(dev)

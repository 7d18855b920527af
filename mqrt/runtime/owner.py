"""The runtime: builds a run, owns its shared memory, starts the CPUs, collects what
they measured, and cleans up on every path.

::

    runtime (owner)
      | layout <- driver setup (alloc_tag_set, init_queue) + waiters + CPU stats
      | arena = Arena.create(layout); init tags, requests, lists; ops.init_shared
      | eventfds (one per CPU waiter), IPI pipes, ops.make_fds, control + result pipes
      | the driver's device, if it has one: ops.start_device -> "ready" -> ops.probe
      | fork CPU 0..N-1 (pinned to host cores, wrapping around)
      |          \\-- each: ready -> start -> run -> drain -> drained -> exit -> result
      | _Manager: ready barrier (all CPUs "ready") -> start at t0 (Phase.RUNNING)
      | one wait point: result pipes + process sentinels (+ a timeout for progress)
      |   a CPU that dies: noticed at once (its sentinel), reported with its role,
      |   CPU and signal; the others are stopped and report what they measured
      | all drained -> exit (Phase.EXIT) -> results -> invariants (checked in the arena)
      \\-- finally: join with a deadline, SIGTERM, SIGKILL; close fds; unlink arena

The driver is reached only through :class:`~mqrt.block.blk_mq_types.BlkMqOps`; the
children's control messages are those of :mod:`mqrt.lib.wire`.

Every exit path (normal end, a user error, an exception, Ctrl-C, SIGTERM, a child
killed) leaves no process and no ``/dev/shm`` segment behind.
"""

from __future__ import annotations

import contextlib
import enum
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

from mqrt.block.blk_mq_cpumap import Topology, format_cpulist, host_cpus, pin_plan
from mqrt.block.blk_mq_debugfs import check_invariants, fair_share_report
from mqrt.block.blk_mq_setup import init_shared
from mqrt.block.blk_mq_structs import RequestQueue
from mqrt.block.blk_mq_types import BlkMqOps, DeviceProcess
from mqrt.lib import inject, wire
from mqrt.lib.shm import Arena, Layout, exit_on_sigterm
from mqrt.lib.trace import TraceSpec, dump_msgpack, read_all
from mqrt.lib.wait import Waiters

_fork = mp.get_context("fork")

#: A CPU that has not said "ready" by then is stuck in setup.
READY_TIMEOUT_S = 30.0
#: How long CPUs may take to finish their in-flight I/Os after the deadline, on top
#: of the request timeout (lost requests complete through the timeout path).
DRAIN_GRACE_S = 10.0
#: Join, then SIGTERM, then SIGKILL (loky's order), each with this deadline.
JOIN_TIMEOUT_S = 5.0


class RunError(RuntimeError):
    """The run could not complete (a CPU died or hung); carries what was measured."""

    def __init__(self, message: str, partial: RunResult | None = None):
        super().__init__(message)
        self.partial = partial


@dataclass
class RunSpec:
    """Everything a run needs; the driver's ``setup`` fills queues and ops."""

    nr_cpus: int
    job: Any  #: workers.ioengine.JobSpec
    #: the driver's set-up: declares its queues in the layout; -> ops, queues, dev_bytes
    setup: Callable[[Layout, Topology], tuple[BlkMqOps, list[RequestQueue], int]]
    cpus_allowed: list[int] | None = None  #: host CPUs to pin to (None: this process's)
    cpus_per_core: int | None = None  #: emulated topology (None: from the host)
    pin: bool = True
    seed: int = 0
    mode: str = "mq"  #: mq, sq or raw: how the CPUs feed the driver (mqrt.block.blk_mq_modes)
    #: per request queue, the job to run on it (None: ``job`` on every queue)
    queue_jobs: list[Any] | None = None
    #: (seconds after the start, action, args) done once by CPU 0 (workers.cpu)
    actions: list[tuple[float, str, tuple]] | None = None
    #: injection points to arm for the run: name -> (percent, max µs) (mqrt.lib.inject)
    inject: dict[str, tuple[float, int]] | None = None
    #: watch the run with mqrt.runtime.detectors's detectors: the first finding stops it
    detect: bool = False
    #: detector thresholds (seconds): no progress, and a lost wake-up
    hang_s: float = 1.0
    lost_wakeup_s: float = 0.3
    #: event trace: records per CPU ring (0: no trace)
    trace_entries: int = 0
    #: where to dump the trace (msgpack) when the run fails: a detector fired, an
    #: invariant broke or a process died (None: never)
    trace_dump: str | None = None
    #: Called with a progress snapshot about every 0.25 s while the run goes.
    progress: Callable[[dict[str, Any]], None] | None = None


@dataclass
class RunResult:
    cpus: list[wire.CpuReport]
    invariants: dict[str, Any]
    queues: list[dict[str, Any]]
    host: dict[str, Any]
    topology: str
    setup_s: float  #: from run() to the first I/O
    wall_s: float
    dead: list[dict[str, Any]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    interrupted: bool = False  #: stopped early by Ctrl-C: figures cover what ran
    t0_wall: float = 0.0  #: wall-clock time of the first I/O (time.time())
    device: dict[str, Any] = field(default_factory=dict)  #: the device's counters
    #: what a detector found (mqrt.runtime.detectors.Finding.to_dict()), if it stopped the run
    finding: dict[str, Any] | None = None
    #: the trace dump written for a failed run (RunSpec.trace_dump), if any
    trace_dump: str | None = None


def _exit_name(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"{signal.Signals(-code).name}({code})"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def run(spec: RunSpec) -> RunResult:
    """Run one job on every emulated CPU (and the driver's device process, if it has
    one) and return what they measured."""
    return _Run(spec).run()


def _send(conn, msg: wire.Command) -> None:
    """Best effort: the child may be gone (its pipe closed)."""
    with contextlib.suppress(OSError, ValueError):
        wire.send(conn, msg)


def _recv(conn) -> wire.Report | None:
    """One message from a child's result pipe; None if the child closed it."""
    try:
        return wire.recv_report(conn)
    except (EOFError, OSError):
        return None


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

    def run(self) -> RunResult:
        from mqrt.workers.cpu import CPU_STATS

        spec = self.spec
        layout = Layout()
        self.ops, self.queues, self.dev_bytes = spec.setup(layout, self.topology)
        for q in self.queues:
            self.messages.extend(q.tag_set.messages)
        self.messages = list(dict.fromkeys(self.messages))
        self.wspec = Waiters.declare(layout, self.n)
        self.stats_region = layout.add("cpu_stats", CPU_STATS, self.n)
        self.trace_spec = (
            TraceSpec.declare(layout, self.n, spec.trace_entries) if spec.trace_entries else None
        )
        with exit_on_sigterm(), Arena.create(layout) as arena:
            self.arena = arena
            try:
                self._init_arena()
                self._start_device()
                inject.configure(spec.inject or {}, spec.seed)
                self._start_cpus()
                return self._drive()
            finally:
                inject.configure({})
                _reap(self.procs)
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
        if not wait([res, p.sentinel], timeout=READY_TIMEOUT_S) or not res.poll():
            raise RunError(f"device (pid {p.pid}) did not start: {_exit_name(p.exitcode)}")
        msg = _recv(res)
        if not isinstance(msg, wire.Ready):
            error = msg.error if isinstance(msg, wire.Error) else None
            raise RunError(f"device (pid {p.pid}) failed to start: {error}")
        try:
            self.device_info = self.ops.probe(self.arena)
        except RuntimeError as exc:
            raise RunError(f"{exc} (device pid {p.pid}: {_exit_name(p.exitcode)})") from None

    def _start_cpus(self) -> None:
        from mqrt.workers.cpu import CpuPlan, cpu_main

        spec, queues, ops = self.spec, self.queues, self.ops
        timeout_cpu = [q.index % self.n for q in queues]
        # the driver's timer (if any) runs on the first CPU of the queue's hctx 0
        timer_cpu = [q.hctx_cpus[0][0] if ops.timer_interval_ns(q.index) else -1 for q in queues]
        self.ctl_w, self.res_r = [], []
        child_ends = []
        for cpu in range(self.n):
            c_r, c_w = _fork.Pipe(duplex=False)
            r_r, r_w = _fork.Pipe(duplex=False)
            self.conns += [c_r, c_w, r_r, r_w]
            child_ends += [c_r, r_w]
            plan = CpuPlan(
                cpu=cpu,
                host_core=self.plan_cores[cpu] if spec.pin else None,
                arena=self.arena,
                waiters=self.wspec,
                eventfds=self.eventfds,
                ipi_r=self.ipi_r,
                ipi_w=self.ipi_w,
                stats=self.stats_region,
                queues=queues,
                driver=ops,
                job=spec.job,
                dev_bytes=self.dev_bytes,
                timeout_scan_cpu=timeout_cpu,
                timer_cpu=timer_cpu,
                seed=spec.seed,
                owner_pid=os.getpid(),
                mode=spec.mode,
                queue_jobs=spec.queue_jobs,
                actions=spec.actions,
                trace=self.trace_spec,
            )
            p = _fork.Process(
                target=cpu_main, args=(plan, c_r, r_w), name=f"mqrt-cpu{cpu}", daemon=True
            )
            p.start()
            self.procs.insert(cpu, p)
            self.ctl_w.append(c_w)
            self.res_r.append(r_r)
        for c in child_ends:
            c.close()

    def _drive(self) -> RunResult:
        """Drive the started CPUs to the run's result (:class:`_Manager`)."""
        return _Manager(self).run()

    def _device_died(self, dev: DeviceProcess) -> dict[str, Any]:
        p = dev.process
        p.join(0.1)
        error = ""
        while dev.res.poll(0):
            msg = _recv(dev.res)
            if msg is None:
                break
            if isinstance(msg, wire.Error):
                error = msg.error
        counters = self.ops.device_counters(self.arena)
        self.device_result = {"counters": counters}
        return {"role": "device", "pid": p.pid, "how": _exit_name(p.exitcode), "error": error,
                "partial": counters}  # fmt: skip

    def _stop_device(self, dev: DeviceProcess) -> dict[str, Any] | None:
        """Disable the controller, tell the device to exit, collect its counters."""
        with contextlib.suppress(Exception):
            self.ops.shutdown(self.arena)
        _send(dev.ctl, wire.Exit())
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while time.monotonic() < deadline:
            if not wait([dev.res, dev.process.sentinel], timeout=0.25):
                continue
            msg = _recv(dev.res) if dev.res.poll() else None
            if isinstance(msg, wire.DeviceResult):
                self.device_result = {"counters": msg.counters}
                return None
            if msg is None and not dev.process.is_alive():
                return self._device_died(dev)
        return self._device_died(dev)


class Phase(enum.StrEnum):
    """Where a run is, as the runtime drives it."""

    SETUP = "setup"  #: the CPUs are getting ready
    RUNNING = "running"  #: started at t0: the CPUs run their jobs, then drain
    EXIT = "exit"  #: every CPU was told to exit: waiting for their results


class _Manager:
    """Drives a run from the CPUs' start to its result, in named steps (the shape of
    loky's executor manager thread)::

        while a CPU has not reported:
            advance          all ready -> start at t0 (RUNNING); all drained -> enter_exit
            past_deadline    a phase over its deadline: stuck CPUs -> enter_exit; in EXIT: give up
            check_detectors  a finding -> enter_exit
            report_progress
            wait_for_events  the one wait point; the first Ctrl-C -> on_stop
              on_message     ready, drained, result, error from a CPU
              on_death       a CPU's sentinel: its result may still be in the pipe, else it died
              on_device_death
        assemble_result      trace dump, device stop, reap, invariants, RunResult / RunError

    :meth:`enter_exit` is the one way to the EXIT phase: tell every CPU still there
    to exit and give them a join deadline.
    """

    def __init__(self, run: _Run):
        self.r = run
        self.spec = run.spec
        self.n = run.n
        self.phase = Phase.SETUP
        self.deadline = time.monotonic() + READY_TIMEOUT_S
        self.ready: set[int] = set()
        self.drained: set[int] = set()
        self.results: dict[int, wire.CpuReport] = {}
        self.dead: dict[int, dict[str, Any]] = {}
        self.errors: dict[int, str] = {}  #: by CPU; -1: the runtime's own (a timeout)
        self.device_dead: dict[str, Any] | None = None
        self.t0_ns = self.end_ns = 0
        self.setup_s = self.t0_wall = 0.0
        self.timeout_s = max(q.tag_set.timeout_ns for q in run.queues) / 1e9
        self.next_progress = 0.0
        self.interrupted = False
        self.finding: dict[str, Any] | None = None
        self.by_conn = {c: i for i, c in enumerate(run.res_r)}
        self.by_sentinel = {run.procs[i].sentinel: i for i in range(self.n)}
        self.monitor = None
        if self.spec.detect:
            from mqrt.runtime.detectors import Monitor

            self.monitor = Monitor(
                run.arena, run.queues, run.wspec, run.eventfds, run.stats_region, self.n,
                hang_s=self.spec.hang_s, lost_wakeup_s=self.spec.lost_wakeup_s,
                trace=run.trace_spec,
            )  # fmt: skip

    def run(self) -> RunResult:
        try:
            while alive := self.alive():
                now = time.monotonic()
                self.advance()
                if self.past_deadline(now):
                    break
                if self.check_detectors():
                    continue
                self.report_progress(now)
                for obj in self.wait_for_events(alive):
                    self.on_event(obj)
        finally:
            if self.monitor is not None:
                self.monitor.close()
        return self.assemble_result()

    # -- the steps of the loop ------------------------------------------------------------

    def alive(self) -> list[int]:
        """The CPUs that neither died nor reported."""
        return [i for i in range(self.n) if i not in self.dead and i not in self.results]

    def advance(self) -> None:
        """Move to the next phase once every CPU is there."""
        if self.phase is Phase.SETUP and len(self.ready) == self.n - len(self.dead):
            if self.dead:
                self.enter_exit()
            else:
                self.start()
        if self.phase is Phase.RUNNING and len(self.drained) + len(self.dead) >= self.n:
            self.enter_exit()

    def start(self) -> None:
        """Every CPU is ready: start them all at one t0, a little ahead."""
        self.t0_ns = time.monotonic_ns() + 20_000_000
        self.setup_s = (self.t0_ns / 1e9) - self.r.t_begin
        self.t0_wall = time.time() + 0.02
        for conn in self.r.ctl_w:
            _send(conn, wire.Start(self.t0_ns))
        job = self.spec.job
        self.end_ns = self.t0_ns + int((job.ramp_time + job.runtime) * 1e9)
        self.deadline = self.end_ns / 1e9 + self.timeout_s + DRAIN_GRACE_S
        self.phase = Phase.RUNNING

    def past_deadline(self, now: float) -> bool:
        """A phase past its deadline: the CPUs not done are stuck, stop everything;
        True once even the exit's deadline has passed (stop waiting)."""
        if now <= self.deadline:
            return False
        if self.phase is Phase.EXIT:
            return True
        stuck = sorted(set(range(self.n)) - self.drained - set(self.dead))
        self.errors[-1] = (
            f"CPUs {format_cpulist(stuck)} did not finish within "
            f"{self.deadline - self.r.t_begin:.0f} s of the start ({self.phase}): stopping them"
        )
        self.enter_exit()
        return False

    def check_detectors(self) -> bool:
        """Run the detectors while the CPUs run; True if one fired (the run stops
        now: a hung CPU cannot drain)."""
        if self.monitor is None or self.phase is not Phase.RUNNING or self.finding is not None:
            return False
        found = self.monitor.check()
        if found is None:
            return False
        found.at_s = time.monotonic() - self.t0_ns / 1e9
        self.finding = found.to_dict()
        self.enter_exit()
        return True

    def report_progress(self, now: float) -> None:
        progress = self.spec.progress
        if progress is None or self.phase is not Phase.RUNNING or now < self.next_progress:
            return
        self.next_progress = now + 0.25
        r = self.r
        progress(_snapshot(r.arena, r.stats_region, self.n, self.t0_ns, self.end_ns))

    def wait_for_events(self, alive: list[int]) -> list[Any]:
        """The one wait point: the live CPUs' result pipes and sentinels, and the
        device's sentinel (a timeout for the progress line and the detectors)."""
        r = self.r
        waitables: list[Any] = [r.res_r[i] for i in alive] + [r.procs[i].sentinel for i in alive]
        if r.device is not None and self.device_dead is None:
            waitables.append(r.device.sentinel)
        try:
            return wait(waitables, timeout=0.1 if self.monitor is not None else 0.25)
        except KeyboardInterrupt:
            if not self.on_stop():
                raise
            return []

    def on_event(self, obj: Any) -> None:
        r = self.r
        if r.device is not None and obj == r.device.sentinel:
            self.on_device_death()
        elif obj in self.by_conn:
            i = self.by_conn[obj]
            msg = _recv(obj)
            if msg is not None:
                self.on_message(i, msg)
        else:
            self.on_death(self.by_sentinel[obj])

    # -- what can happen ------------------------------------------------------------------

    def on_message(self, i: int, msg: wire.Report) -> None:
        """CPU ``i`` said something on its result pipe."""
        match msg:
            case wire.Ready():
                self.ready.add(i)
            case wire.Drained():
                self.drained.add(i)
            case wire.CpuResult(report=report):
                self.results[i] = report
            case wire.Error(error=error):
                self.errors[i] = error

    def on_death(self, i: int) -> None:
        """CPU ``i``'s process ended: a result may still be in its pipe (it exited
        after sending it); otherwise it died, and the run stops."""
        if i in self.results:
            return
        r = self.r
        p, res = r.procs[i], r.res_r[i]
        p.join(0.1)
        while res.poll(0):
            msg = _recv(res)
            if msg is None:
                break
            if isinstance(msg, wire.CpuResult | wire.Error):
                self.on_message(i, msg)
        if i in self.results:
            return
        self.dead[i] = {
            "role": "cpu",
            "cpu": i,
            "pid": p.pid,
            "how": _exit_name(p.exitcode),
            "error": self.errors.get(i, ""),
            "partial": _cpu_counters(r.arena, r.stats_region, i),
        }
        self.enter_exit()

    def on_device_death(self) -> None:
        """The device process ended before it was told to: the run stops."""
        assert self.r.dev is not None
        self.device_dead = self.r._device_died(self.r.dev)
        self.enter_exit()

    def on_stop(self) -> bool:
        """Ctrl-C: the first one while the CPUs run stops the run cleanly (they drain
        and report what they measured); False for any other (abort)."""
        if self.interrupted or self.phase is not Phase.RUNNING:
            return False
        self.interrupted = True
        self._send_all(wire.Stop())
        return True

    def enter_exit(self) -> None:
        """Tell every CPU still there to exit, and wait for them a bounded time."""
        if self.phase is Phase.EXIT:
            return
        self._send_all(wire.Exit())
        self.phase = Phase.EXIT
        self.deadline = time.monotonic() + JOIN_TIMEOUT_S + 5

    def _send_all(self, msg: wire.Command) -> None:
        for i, conn in enumerate(self.r.ctl_w):
            if i not in self.dead:
                _send(conn, msg)

    # -- the end ----------------------------------------------------------------------------

    def assemble_result(self) -> RunResult:
        """Dump the trace of a failed run, stop the device, reap every child, check
        the invariants; the RunResult, or RunError carrying it if a process died or
        a CPU reported an error."""
        r, results = self.r, self.results
        failed = (
            self.finding is not None
            or self.dead
            or any(c["blk_mq"]["violations"] for c in results.values())
        )
        dumped = self._dump_trace() if failed else None
        wall = time.monotonic() - r.t_begin
        if r.dev is not None and self.device_dead is None:
            self.device_dead = r._stop_device(r.dev)
        dead_list = [self.dead[i] for i in sorted(self.dead)]
        if self.device_dead is not None:
            dead_list.append(self.device_dead)
        _reap(r.procs)
        invariants = {"skipped": "a process died"} if dead_list else self._invariants()
        result = RunResult(
            cpus=[results[i] for i in sorted(results)],
            invariants=invariants,
            queues=[
                {"name": q.name, "index": q.index, "fair_share": fair_share_report(r.arena, q)}
                for q in r.queues
            ],
            host={
                "cores": os.cpu_count(),
                "cpus_allowed": format_cpulist(r.allowed),
                "pinned": [results[i].get("host_core") for i in sorted(results)],
            },
            topology=r.topology.describe(),
            setup_s=self.setup_s,
            wall_s=wall,
            dead=dead_list,
            messages=r.messages,
            interrupted=self.interrupted,
            t0_wall=self.t0_wall,
            finding=self.finding,
            trace_dump=dumped,
            device={**r.device_info, **r.device_result} if r.dev is not None else {},
        )
        if dead_list or self.errors:
            parts = [
                f"{d['role'] if d['role'] == 'device' else 'cpu' + str(d['cpu'])} "
                f"(pid {d['pid']}) died: {d['how']}"
                + (f"\n{d['error'].rstrip()}" if d["error"] else "")
                for d in dead_list
            ]
            parts += [e.rstrip() for k, e in sorted(self.errors.items()) if k not in self.dead]
            raise RunError("; ".join(parts), result)
        return result

    def _dump_trace(self) -> str | None:
        """The event trace of a failed run, where RunSpec.trace_dump says (if it does)."""
        r, spec = self.r, self.spec
        if r.trace_spec is None or not spec.trace_dump:
            return None
        finding = self.finding
        dump_msgpack(
            read_all(r.arena, r.trace_spec, quiescent=True),
            spec.trace_dump,
            {
                "finding": finding and {k: finding[k] for k in ("detector", "message")},
                "cpus": self.n,
                "seed": spec.seed,
            },
        )
        return spec.trace_dump

    def _invariants(self) -> dict[str, Any]:
        """The arena's invariants, with what the CPUs saw themselves."""
        reports = self.results.values()
        invariants = check_invariants(self.r.arena, self.r.queues)
        invariants["violations"] = (
            sum(c["blk_mq"]["violations"] for c in reports)
            + len(invariants["problems"])
            + sum(j["inflight"] for c in reports for j in c["jobs"])
        )
        invariants["problems"] = [v for c in reports for v in c["violations"]] + invariants[
            "problems"
        ]
        invariants["stale_completions"] = sum(c["blk_mq"]["stale_completions"] for c in reports)
        return invariants


def _cpu_counters(arena: Arena, region, i: int) -> dict[str, int]:
    v = arena.view(region)
    out = {name: int(v[name][i]) for name in v.dtype.names or ()}
    del v
    return out


def _snapshot(arena: Arena, region, n: int, t0_ns: int, end_ns: int) -> dict[str, Any]:
    v = arena.view(region)
    completed = int(v["completed"].sum())
    inflight = int(v["inflight"].astype("i8").sum())
    del v
    now = time.monotonic_ns()
    return {
        "completed": completed,
        "inflight": inflight,
        "elapsed_s": max(0.0, (now - t0_ns) / 1e9),
        "remaining_s": max(0.0, (end_ns - now) / 1e9),
    }


def _reap(procs: list) -> None:
    """Join with a deadline, then SIGTERM, then SIGKILL; every child is waited for."""
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in procs if p.is_alive()]
        if not live:
            break
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
                os.kill(p.pid, sig)
        for p in live:
            p.join(JOIN_TIMEOUT_S)
    for p in procs:
        with contextlib.suppress(ValueError):
            p.close()
    procs.clear()

"""The runtime: builds a run, owns its shared memory, starts the CPUs, collects what
they measured, and cleans up on every path.

::

    runtime (owner)
      | layout <- driver setup (alloc_tag_set, init_queue) + waiters + CPU stats
      | arena = Arena.create(layout); init tags, requests, lists, driver state
      | eventfds (one per CPU waiter), IPI pipes, control + result pipes
      | fork CPU 0..N-1 (pinned to host cores, wrapping around)
      |          \\-- each: ready -> start -> run -> drain -> drained -> exit -> result
      | ready barrier (all CPUs "ready") -> start at t0
      | one wait point: result pipes + process sentinels (+ a timeout for progress)
      |   a CPU that dies: noticed at once (its sentinel), reported with its role,
      |   CPU and signal; the others are stopped and report what they measured
      | all drained -> exit -> results -> invariants (checked in the arena)
      \\-- finally: join with a deadline, SIGTERM, SIGKILL; close fds; unlink arena

Every exit path (normal end, a user error, an exception, Ctrl-C, SIGTERM, a child
killed) leaves no process and no ``/dev/shm`` segment behind.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from mqrt.block.blk_mq_cpumap import Topology, format_cpulist, host_cpus, pin_plan
from mqrt.block.blk_mq_debugfs import check_invariants, fair_share_report
from mqrt.block.blk_mq_setup import init_shared
from mqrt.block.blk_mq_structs import RequestQueue
from mqrt.block.blk_mq_types import BlkMqOps
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
        self.device: Any = None  # the device process, if the driver has one
        self.device_ctl = self.device_res = None
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

    def _start_device(self) -> None:
        """Fork the driver's device (if it has one), wait for it, and let the driver
        probe it."""
        dev = self.ops.start_device(self.arena, None)
        if dev is None:
            return
        p, ctl, res = dev
        self.procs.append(p)
        self.conns += [ctl, res]
        self.device, self.device_ctl, self.device_res = p, ctl, res
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
        spec, arena, n = self.spec, self.arena, self.n
        procs, ctl_w, res_r = self.procs, self.ctl_w, self.res_r
        by_conn = {c: i for i, c in enumerate(res_r)}
        by_sentinel = {procs[i].sentinel: i for i in range(n)}
        ready: set[int] = set()
        drained: set[int] = set()
        results: dict[int, wire.CpuReport] = {}
        dead: dict[int, dict] = {}
        errors: dict[int, str] = {}
        phase = "setup"
        deadline = time.monotonic() + READY_TIMEOUT_S
        t0_ns = end_ns = 0
        timeout_s = max(q.tag_set.timeout_ns for q in self.queues) / 1e9
        next_progress = 0.0
        exit_sent = interrupted = False
        setup_s = t0_wall = 0.0
        device_dead: dict[str, Any] | None = None

        monitor = None
        if spec.detect:
            from mqrt.runtime.detectors import Monitor

            monitor = Monitor(
                arena, self.queues, self.wspec, self.eventfds, self.stats_region, n,
                hang_s=spec.hang_s, lost_wakeup_s=spec.lost_wakeup_s, trace=self.trace_spec,
            )  # fmt: skip
        finding = None

        def stop_all(what: str) -> None:
            nonlocal exit_sent
            for i in range(n):
                if i not in dead:
                    _send(ctl_w[i], wire.Exit() if what == "exit" else wire.Stop())
            exit_sent = exit_sent or what == "exit"

        while True:
            alive = [i for i in range(n) if i not in dead and i not in results]
            if not alive:
                break
            now = time.monotonic()
            if phase == "setup" and len(ready) == n - len(dead):
                if dead:
                    stop_all("exit")
                    phase = "exit"
                else:
                    t0_ns = time.monotonic_ns() + 20_000_000
                    setup_s = (t0_ns / 1e9) - self.t_begin
                    t0_wall = time.time() + 0.02
                    for i in range(n):
                        _send(ctl_w[i], wire.Start(t0_ns))
                    job = spec.job
                    end_ns = t0_ns + int((job.ramp_time + job.runtime) * 1e9)
                    deadline = end_ns / 1e9 + timeout_s + DRAIN_GRACE_S
                    phase = "running"
            if phase == "running" and len(drained) + len(dead) >= n:
                stop_all("exit")
                phase = "exit"
                deadline = time.monotonic() + JOIN_TIMEOUT_S + 5
            if now > deadline and phase != "exit":
                stuck = sorted(set(range(n)) - drained - set(dead))
                errors[-1] = (
                    f"CPUs {format_cpulist(stuck)} did not finish within "
                    f"{deadline - self.t_begin:.0f} s of the start ({phase}): stopping them"
                )
                stop_all("exit")
                phase = "exit"
                deadline = time.monotonic() + JOIN_TIMEOUT_S + 5
            elif now > deadline:
                break
            if monitor is not None and phase == "running" and finding is None:
                found = monitor.check()
                if found is not None:
                    # A detector fired: keep what it saw, stop everything now (a hung
                    # CPU cannot drain).
                    found.at_s = time.monotonic() - t0_ns / 1e9
                    finding = found.to_dict()
                    stop_all("exit")
                    phase = "exit"
                    deadline = time.monotonic() + JOIN_TIMEOUT_S + 5
                    continue
            if spec.progress is not None and phase == "running" and now >= next_progress:
                next_progress = now + 0.25
                spec.progress(_snapshot(arena, self.stats_region, n, t0_ns, end_ns))
            waitables = [res_r[i] for i in alive] + [procs[i].sentinel for i in alive]
            if self.device is not None and device_dead is None:
                waitables.append(self.device.sentinel)
            try:
                ready_objs = wait(waitables, timeout=0.1 if monitor is not None else 0.25)
            except KeyboardInterrupt:
                # The first Ctrl-C stops the run cleanly (the CPUs drain and report
                # what they measured); a second one aborts.
                if interrupted or phase != "running":
                    raise
                interrupted = True
                stop_all("stop")
                continue
            for obj in ready_objs:
                if self.device is not None and obj == self.device.sentinel:
                    device_dead = self._device_died()
                    if not exit_sent:
                        stop_all("exit")
                        phase = "exit"
                        deadline = time.monotonic() + JOIN_TIMEOUT_S + 5
                elif obj in by_conn:
                    i = by_conn[obj]
                    msg = _recv(obj)
                    if msg is None:
                        continue
                    match msg:
                        case wire.Ready():
                            ready.add(i)
                        case wire.Drained():
                            drained.add(i)
                        case wire.CpuResult(report=report):
                            results[i] = report
                        case wire.Error(error=error):
                            errors[i] = error
                else:
                    i = by_sentinel[obj]
                    if i in results:
                        continue
                    procs[i].join(0.1)
                    while res_r[i].poll(0):  # a result may still be in the pipe
                        msg = _recv(res_r[i])
                        if msg is None:
                            break
                        if isinstance(msg, wire.CpuResult):
                            results[i] = msg.report
                        elif isinstance(msg, wire.Error):
                            errors[i] = msg.error
                    if i in results:
                        continue
                    dead[i] = {
                        "role": "cpu",
                        "cpu": i,
                        "pid": procs[i].pid,
                        "how": _exit_name(procs[i].exitcode),
                        "error": errors.get(i, ""),
                        "partial": _cpu_counters(arena, self.stats_region, i),
                    }
                    if not exit_sent:
                        stop_all("exit")
                        phase = "exit"
                        deadline = time.monotonic() + JOIN_TIMEOUT_S + 5
        if monitor is not None:
            monitor.close()
        failed = (
            finding is not None or dead or any(r["blk_mq"]["violations"] for r in results.values())
        )
        dumped = None
        if self.trace_spec is not None and spec.trace_dump and failed:
            dumped = spec.trace_dump
            dump_msgpack(
                read_all(arena, self.trace_spec, quiescent=True),
                dumped,
                {
                    "finding": finding and {k: finding[k] for k in ("detector", "message")},
                    "cpus": n,
                    "seed": spec.seed,
                },
            )
        wall = time.monotonic() - self.t_begin
        if self.device is not None and device_dead is None:
            device_dead = self._stop_device()
        dead_list = [dead[i] for i in sorted(dead)]
        if device_dead is not None:
            dead_list.append(device_dead)
        _reap(self.procs)
        if dead_list:
            invariants: dict[str, Any] = {"skipped": "a process died"}
        else:
            invariants = check_invariants(arena, self.queues)
            invariants["violations"] = (
                sum(r["blk_mq"]["violations"] for r in results.values())
                + len(invariants["problems"])
                + sum(j["inflight"] for r in results.values() for j in r["jobs"])
            )
            invariants["problems"] = [
                v for r in results.values() for v in r.get("violations", [])
            ] + invariants["problems"]
            invariants["stale_completions"] = sum(
                r["blk_mq"]["stale_completions"] for r in results.values()
            )
        result = RunResult(
            cpus=[results[i] for i in sorted(results)],
            invariants=invariants,
            queues=[
                {"name": q.name, "index": q.index, "fair_share": fair_share_report(arena, q)}
                for q in self.queues
            ],
            host={
                "cores": os.cpu_count(),
                "cpus_allowed": format_cpulist(self.allowed),
                "pinned": [results[i].get("host_core") for i in sorted(results)],
            },
            topology=self.topology.describe(),
            setup_s=setup_s,
            wall_s=wall,
            dead=dead_list,
            messages=self.messages,
            interrupted=interrupted,
            t0_wall=t0_wall,
            finding=finding,
            trace_dump=dumped,
            device={**self.device_info, **self.device_result} if self.device else {},
        )
        if dead_list or errors:
            parts = [
                f"{d['role'] if d['role'] == 'device' else 'cpu' + str(d['cpu'])} "
                f"(pid {d['pid']}) died: {d['how']}"
                + (f"\n{d['error'].rstrip()}" if d["error"] else "")
                for d in dead_list
            ]
            parts += [e.rstrip() for k, e in sorted(errors.items()) if k not in dead]
            raise RunError("; ".join(parts), result)
        return result

    def _device_died(self) -> dict[str, Any]:
        p = self.device
        p.join(0.1)
        error = ""
        while self.device_res.poll(0):
            msg = _recv(self.device_res)
            if msg is None:
                break
            if isinstance(msg, wire.Error):
                error = msg.error
        counters = self.ops.device_counters(self.arena)
        self.device_result = {"counters": counters}
        return {"role": "device", "pid": p.pid, "how": _exit_name(p.exitcode), "error": error,
                "partial": counters}  # fmt: skip

    def _stop_device(self) -> dict[str, Any] | None:
        """Disable the controller, tell the device to exit, collect its counters."""
        with contextlib.suppress(Exception):
            self.ops.shutdown(self.arena)
        _send(self.device_ctl, wire.Exit())
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while time.monotonic() < deadline:
            if not wait([self.device_res, self.device.sentinel], timeout=0.25):
                continue
            msg = _recv(self.device_res) if self.device_res.poll() else None
            if isinstance(msg, wire.DeviceResult):
                self.device_result = {"counters": msg.counters}
                return None
            if msg is None and not self.device.is_alive():
                return self._device_died()
        return self._device_died()


def _cpu_counters(arena: Arena, region, i: int) -> dict[str, int]:
    v = arena.view(region)
    out = {name: int(v[name][i]) for name in v.dtype.names}
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

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

import msgpack

from mqrt.blk_mq import init_shared
from mqrt.blk_mq_cpumap import Topology, format_cpulist, host_cpus, pin_plan
from mqrt.blk_mq_debugfs import check_invariants, fair_share_report
from mqrt.shm import Arena, Layout, exit_on_sigterm
from mqrt.wait import Waiters

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
    setup: Callable[[Layout, Topology], tuple[Any, list, int]]  #: -> ops, queues, dev_bytes
    cpus_allowed: list[int] | None = None  #: host CPUs to pin to (None: this process's)
    cpus_per_core: int | None = None  #: emulated topology (None: from the host)
    pin: bool = True
    seed: int = 0
    #: Called with a progress snapshot about every 0.25 s while the run goes.
    progress: Callable[[dict[str, Any]], None] | None = None


@dataclass
class RunResult:
    cpus: list[dict[str, Any]]
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
    """Run one job on every emulated CPU and return what they measured."""
    from mqrt.workers.cpu import CPU_STATS, CpuPlan, cpu_main

    t_begin = time.monotonic()
    allowed = spec.cpus_allowed or host_cpus()
    if spec.cpus_per_core:
        topology = Topology.emulated(spec.nr_cpus, spec.cpus_per_core)
    else:
        topology = Topology.host(spec.nr_cpus, allowed)
    plan_cores = pin_plan(spec.nr_cpus, allowed)
    messages = []
    if spec.nr_cpus > len(allowed):
        messages.append(
            f"{spec.nr_cpus} emulated CPUs on {len(allowed)} host cores "
            f"({format_cpulist(allowed)}): pinning wraps around, CPUs share cores"
        )
    layout = Layout()
    ops, queues, dev_bytes = spec.setup(layout, topology)
    for q in queues:
        messages.extend(q.tag_set.messages)
    messages = list(dict.fromkeys(messages))
    wspec = Waiters.declare(layout, spec.nr_cpus)
    stats_region = layout.add("cpu_stats", CPU_STATS, spec.nr_cpus)

    procs: list[Any] = []
    fds: list[int] = []
    conns: list[Any] = []
    with exit_on_sigterm(), Arena.create(layout) as arena:
        try:
            init_shared(arena, queues, spec.seed)
            if hasattr(ops, "init_shared"):
                ops.init_shared(arena)
            Waiters.init(arena, wspec)
            eventfds = Waiters.create_eventfds(wspec)
            fds += eventfds
            ipi_r, ipi_w = [], []
            for _ in range(spec.nr_cpus):
                r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                ipi_r.append(r)
                ipi_w.append(w)
            fds += ipi_r + ipi_w
            timeout_cpu = [q.index % spec.nr_cpus for q in queues]
            bw_cpu = [q.hctx_cpus[0][0] if getattr(ops, "mbps", 0) else -1 for q in queues]
            ctl_w, res_r = [], []
            for cpu in range(spec.nr_cpus):
                c_r, c_w = _fork.Pipe(duplex=False)
                r_r, r_w = _fork.Pipe(duplex=False)
                conns += [c_r, c_w, r_r, r_w]
                plan = CpuPlan(
                    cpu=cpu,
                    host_core=plan_cores[cpu] if spec.pin else None,
                    arena=arena,
                    waiters=wspec,
                    eventfds=eventfds,
                    ipi_r=ipi_r,
                    ipi_w=ipi_w,
                    stats=stats_region,
                    queues=queues,
                    driver=ops,
                    job=spec.job,
                    dev_bytes=dev_bytes,
                    timeout_scan_cpu=timeout_cpu,
                    bw_timer_cpu=bw_cpu,
                    seed=spec.seed,
                )
                p = _fork.Process(
                    target=cpu_main, args=(plan, c_r, r_w), name=f"mqrt-cpu{cpu}", daemon=True
                )
                p.start()
                procs.append(p)
                ctl_w.append(c_w)
                res_r.append(r_r)
            for c in conns:
                if c not in ctl_w and c not in res_r:
                    c.close()
            return _drive(
                spec,
                arena,
                queues,
                procs,
                ctl_w,
                res_r,
                stats_region,
                topology,
                allowed,
                messages,
                t_begin,
            )
        finally:
            _reap(procs)
            for c in conns:
                with contextlib.suppress(OSError):
                    c.close()
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _send(conn, msg: dict) -> None:
    with contextlib.suppress(OSError, ValueError):
        conn.send_bytes(msgpack.packb(msg))


def _drive(
    spec, arena, queues, procs, ctl_w, res_r, stats_region, topology, allowed, messages, t_begin
) -> RunResult:
    n = spec.nr_cpus
    by_conn = {c: i for i, c in enumerate(res_r)}
    by_sentinel = {p.sentinel: i for i, p in enumerate(procs)}
    ready: set[int] = set()
    drained: set[int] = set()
    results: dict[int, dict] = {}
    dead: dict[int, dict] = {}
    errors: dict[int, str] = {}
    phase = "setup"
    deadline = time.monotonic() + READY_TIMEOUT_S
    t0_ns = 0
    end_ns = 0
    timeout_s = max(q.tag_set.timeout_ns for q in queues) / 1e9
    next_progress = 0.0
    stop_sent = exit_sent = False
    interrupted = False
    setup_s = 0.0
    t0_wall = 0.0

    def stop_all(what: str) -> None:
        nonlocal stop_sent, exit_sent
        for i in range(n):
            if i not in dead:
                _send(ctl_w[i], {"cmd": what})
        if what == "exit":
            exit_sent = stop_sent = True
        else:
            stop_sent = True

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
                setup_s = (t0_ns / 1e9) - t_begin
                t0_wall = time.time() + 0.02
                for i in range(n):
                    _send(ctl_w[i], {"cmd": "start", "t0": t0_ns})
                job = spec.job
                end_ns = t0_ns + int((job.ramp_time + job.runtime) * 1e9)
                deadline = end_ns / 1e9 + timeout_s + DRAIN_GRACE_S
                phase = "running"
        if phase in ("running",) and len(drained) + len(dead) >= n:
            stop_all("exit")
            phase = "exit"
            deadline = time.monotonic() + JOIN_TIMEOUT_S + 5
        if now > deadline and phase != "exit":
            stuck = sorted(set(range(n)) - drained - set(dead))
            errors[-1] = (
                f"CPUs {format_cpulist(stuck)} did not finish within "
                f"{deadline - t_begin:.0f} s of the start ({phase}): stopping them"
            )
            stop_all("exit")
            phase = "exit"
            deadline = time.monotonic() + JOIN_TIMEOUT_S + 5
        elif now > deadline:
            break
        if spec.progress is not None and phase == "running" and now >= next_progress:
            next_progress = now + 0.25
            spec.progress(_snapshot(arena, stats_region, n, t0_ns, end_ns))
        waitables = [res_r[i] for i in alive] + [procs[i].sentinel for i in alive]
        try:
            ready_objs = wait(waitables, timeout=0.25)
        except KeyboardInterrupt:
            # The first Ctrl-C stops the run cleanly (the CPUs drain and report what
            # they measured); a second one aborts.
            if interrupted or phase != "running":
                raise
            interrupted = True
            stop_all("stop")
            continue
        for obj in ready_objs:
            if obj in by_conn:
                i = by_conn[obj]
                try:
                    msg = msgpack.unpackb(obj.recv_bytes())
                except (EOFError, OSError):
                    continue
                kind = msg.get("msg")
                if kind == "ready":
                    ready.add(i)
                elif kind == "drained":
                    drained.add(i)
                elif kind == "result":
                    results[i] = msg
                elif kind == "error":
                    errors[i] = msg["error"]
            else:
                i = by_sentinel[obj]
                if i in results:
                    continue
                procs[i].join(0.1)
                # A result may still be in the pipe.
                while res_r[i].poll(0):
                    try:
                        msg = msgpack.unpackb(res_r[i].recv_bytes())
                    except (EOFError, OSError):
                        break
                    if msg.get("msg") == "result":
                        results[i] = msg
                    elif msg.get("msg") == "error":
                        errors[i] = msg["error"]
                if i in results:
                    continue
                dead[i] = {
                    "role": "cpu",
                    "cpu": i,
                    "pid": procs[i].pid,
                    "how": _exit_name(procs[i].exitcode),
                    "error": errors.get(i, ""),
                    "partial": _cpu_counters(arena, stats_region, i),
                }
                if not exit_sent:
                    stop_all("exit")
                    phase = "exit"
                    deadline = time.monotonic() + JOIN_TIMEOUT_S + 5
    wall = time.monotonic() - t_begin
    _reap(procs)
    invariants = check_invariants(arena, queues) if not dead else {"skipped": "a CPU died"}
    cpu_violations = [v for r in results.values() for v in r.get("violations", [])]
    if isinstance(invariants, dict) and "problems" in invariants:
        invariants["violations"] = (
            sum(r["blk_mq"]["violations"] for r in results.values())
            + len(invariants["problems"])
            + sum(j["inflight"] for r in results.values() for j in r["jobs"])
        )
        invariants["problems"] = cpu_violations + invariants["problems"]
        invariants["stale_completions"] = sum(
            r["blk_mq"]["stale_completions"] for r in results.values()
        )
    result = RunResult(
        cpus=[results[i] for i in sorted(results)],
        invariants=invariants,
        queues=[
            {"name": q.name, "index": q.index, "fair_share": fair_share_report(arena, q)}
            for q in queues
        ],
        host={
            "cores": os.cpu_count(),
            "cpus_allowed": format_cpulist(allowed),
            "pinned": [r.get("host_core") for r in (results[i] for i in sorted(results))],
        },
        topology=topology.describe(),
        setup_s=setup_s,
        wall_s=wall,
        dead=[dead[i] for i in sorted(dead)],
        messages=messages,
        interrupted=interrupted,
        t0_wall=t0_wall,
    )
    if dead or errors:
        parts = [
            f"cpu{d['cpu']} (pid {d['pid']}) died: {d['how']}"
            + (f"\n{d['error'].rstrip()}" if d["error"] else "")
            for d in result.dead
        ]
        parts += [e.rstrip() for k, e in sorted(errors.items()) if k not in dead]
        raise RunError("; ".join(parts), result)
    return result


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

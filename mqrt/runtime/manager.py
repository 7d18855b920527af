"""The wait loop of a run: from the CPUs' start to the run's result, in named steps
(:class:`Manager`); the owner (:mod:`mqrt.runtime.owner`) sets the run up and hands it
over.
"""

from __future__ import annotations

import enum
import os
import signal
import time
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any

from mqrt.block.blk_mq_cpumap import format_cpulist
from mqrt.block.blk_mq_debugfs import check_invariants, elevator_report, fair_share_report
from mqrt.lib import lockstat, signals, wire
from mqrt.lib.shm import Arena
from mqrt.lib.trace import dump_msgpack, read_all
from mqrt.runtime import manifest
from mqrt.runtime.children import (
    JOIN_TIMEOUT_S,
    exit_name,
    kill,
    ready_timeout_s,
    reap,
    recv,
    send,
)
from mqrt.runtime.manifest import RunPhase
from mqrt.runtime.spec import RunError, RunResult
from mqrt.runtime.watchdog import Stall, Watchdog

if TYPE_CHECKING:
    from mqrt.runtime.owner import _Run

#: How long CPUs may take to finish their in-flight I/Os after the deadline, on top
#: of the request timeout (lost requests complete through the timeout path).
DRAIN_GRACE_S = 10.0


class Phase(enum.StrEnum):
    """Where a run is, as the runtime drives it."""

    SETUP = "setup"  #: the CPUs are getting ready
    RUNNING = "running"  #: started at t0: the CPUs run their jobs, then drain
    EXIT = "exit"  #: every CPU was told to exit: waiting for their results


class Manager:
    """Drives a run from the CPUs' start to its result, in named steps (the shape of
    loky's executor manager thread)::

        while a CPU has not reported:
            check_signals    the first Ctrl-C / SIGTERM / SIGHUP -> on_stop
            advance          all ready -> start at t0 (RUNNING); all drained -> enter_exit
            past_deadline    a phase over its deadline: stuck CPUs -> enter_exit; in EXIT: give up
            check_detectors  a finding -> enter_exit
            check_watchdog   a CPU or the device stopped, spinning or blocked -> killed, enter_exit
            report_progress
            wait_for_events  the one wait point
              on_message     ready, drained, result, error from a CPU
              on_death       a CPU's sentinel: its result may still be in the pipe, else it died
              on_device_death
        assemble_result      trace dump, device stop, reap, invariants, RunResult / RunError

    :meth:`enter_exit` is the one way to the EXIT phase: tell every CPU still there
    to exit and give them a join deadline.

    The loop runs with the stop signals deferred (:func:`mqrt.lib.signals.deferred`):
    the first is only recorded and wakes the wait (:func:`mqrt.lib.signals.wakeup`),
    and :meth:`check_signals` stops the run; a second raises
    :class:`~mqrt.lib.signals.Abort` wherever it lands.
    """

    def __init__(self, run: _Run):
        self.r = run
        self.spec = run.spec
        self.n = run.n
        self.phase = Phase.SETUP
        self.deadline = time.monotonic() + ready_timeout_s(self.n)
        self.ready: set[int] = set()
        self.drained: set[int] = set()
        self.results: dict[int, wire.CpuReport] = {}
        self.dead: dict[int, dict[str, Any]] = {}
        #: CPUs the runtime ended itself: caught spinning (livelock), they could not
        #: read the exit message
        self.stopped: dict[int, dict[str, Any]] = {}
        #: after a livelock: each CPU's retries at the last look (None: no livelock)
        self.retries_seen: list[int] | None = None
        self.errors: dict[int, str] = {}  #: by CPU; -1: the runtime's own (a timeout)
        self.device_dead: dict[str, Any] | None = None
        self.t0_ns = self.end_ns = 0
        self.setup_s = self.t0_wall = 0.0
        #: the CPUs' set-up (fork to ready), CPU time: summed, and the longest
        self.setup_cpu_ns = self.setup_cpu_max_ns = 0
        self.timeout_s = max(q.tag_set.timeout_ns for q in run.queues) / 1e9
        self.next_progress = 0.0
        self.interrupted = False
        self.said_deadline = False
        self.finding: dict[str, Any] | None = None
        self.by_conn = {c: i for i, c in enumerate(run.res_r)}
        self.by_sentinel = {run.procs[i].sentinel: i for i in range(self.n)}
        self.wake_fd = -1  #: readable on a stop signal (mqrt.lib.signals.wakeup)
        self.watchdog = self._watchdog()
        self.monitor = None
        if self.spec.detect:
            from mqrt.runtime.detectors import Monitor

            self.monitor = Monitor(
                run.arena, run.queues, run.wspec, run.eventfds, run.stats_region, self.n,
                pids=[p.pid for p in run.procs[: self.n]], hang_s=self.spec.hang_s,
                trace=run.trace_spec,
            )  # fmt: skip

    def run(self) -> RunResult:
        with signals.deferred(), signals.wakeup() as self.wake_fd:
            return self._run()

    def _run(self) -> RunResult:
        try:
            while self.alive():
                now = time.monotonic()
                self.check_signals()
                self.advance()
                if self.past_deadline(now):
                    break
                if self.check_detectors():
                    continue
                self.check_watchdog()
                self.stop_spinners()
                self.report_progress(now)
                for obj in self.wait_for_events(self.alive()):
                    self.on_event(obj)
        finally:
            if self.monitor is not None:
                self.monitor.close()
        return self.assemble_result()

    # -- the steps of the loop ------------------------------------------------------------

    def alive(self) -> list[int]:
        """The CPUs that neither died nor reported."""
        return [
            i
            for i in range(self.n)
            if i not in self.dead and i not in self.results and i not in self.stopped
        ]

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
            send(conn, wire.Start(self.t0_ns))
        job = self.spec.job
        self.end_ns = self.t0_ns + int((job.ramp_time + job.runtime) * 1e9)
        self.deadline = self.end_ns / 1e9 + self.timeout_s + DRAIN_GRACE_S
        self.phase = Phase.RUNNING
        manifest.set_phase(self.r.arena, RunPhase.RUNNING, self.t0_ns, self.end_ns)
        self.say(
            f"every CPU ready after {self.setup_s:.2f} s: running (set-up CPU time: "
            f"runtime {time.process_time():.2f} s, CPUs {self.setup_cpu_ns / 1e9:.2f} s, "
            f"{self.setup_cpu_max_ns / 1e6:.1f} ms at most for one)"
        )

    def say(self, line: str) -> None:
        """One line of the run's life, for whoever asked (RunSpec.on_event)."""
        if self.spec.on_event is not None:
            self.spec.on_event(line)

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
        if found.spinning:
            for i in found.spinning:
                self.stop_spinning(i)
            self.retries_seen = self.monitor.retries()
        return True

    def _watchdog(self) -> Watchdog:
        from mqrt.workers.cpu import PHASE_NAMES

        r = self.r
        a = r.arena.atomic
        offs = [r.stats_region.offsets(i) for i in range(self.n)]

        def heartbeat(i: int) -> tuple[int, str]:
            o = offs[i]
            phase = a.read(o.phase)
            return a.read(o.heartbeat_ns), PHASE_NAMES[phase] if phase < len(PHASE_NAMES) else "?"

        def device_heartbeat() -> tuple[int, str]:
            return r.ops.device_counters(r.arena).get("heartbeat_ns", 0), "serving its queues"

        return Watchdog(
            [p.pid for p in r.procs[: self.n]],
            heartbeat,
            r.device.pid if r.device is not None else None,
            device_heartbeat if r.device is not None else None,
        )

    def check_watchdog(self) -> None:
        """A CPU or the device that stopped making progress (stopped, spinning,
        blocked: :mod:`mqrt.runtime.watchdog`) cannot drain or answer: end it, and
        the run with it; the others report what they measured."""
        device = self.r.device is not None and self.device_dead is None
        for stall in self.watchdog.check(self.alive(), device):
            self.say(f"{stall.who} (pid {stall.pid}) hung: {stall.describe()}")
            if stall.role == "device":
                self.on_device_hung(stall)
            else:
                self.on_hung(stall)

    def on_hung(self, stall: Stall) -> None:
        r = self.r
        i = stall.cpu
        assert i is not None
        p = r.procs[i]
        kill(p)
        self.dead[i] = {
            "role": "cpu",
            "cpu": i,
            "pid": p.pid,
            "error": "",
            **_hung(stall),
            "partial": _cpu_counters(r.arena, r.stats_region, i),
        }
        self.enter_exit()

    def on_device_hung(self, stall: Stall) -> None:
        r = self.r
        assert r.dev is not None
        kill(r.dev.process)
        self.device_dead = r._device_died(r.dev) | _hung(stall)
        self.enter_exit()

    def device_stalled(self) -> dict[str, Any] | None:
        """While the device is told to exit: how it hung, if it did."""
        for stall in self.watchdog.check([], True):
            return _hung(stall)
        return None

    def stop_spinners(self) -> None:
        """After a livelock: a CPU that has not exited and went round a retry loop
        since the last look joined the spinning ones (freeing a tag while others
        spun): stop it too."""
        if self.retries_seen is None or self.monitor is None:
            return
        now = self.monitor.retries()
        for i in self.alive():
            if now[i] != self.retries_seen[i]:
                self.stop_spinning(i)
        self.retries_seen = now

    def stop_spinning(self, i: int) -> None:
        """CPU ``i`` spins in a loop that never reaches its control pipe: kill it
        (the others exit on the message and report); it reports nothing."""
        p = self.r.procs[i]
        kill(p)
        r = self.r
        self.stopped[i] = {
            "role": "cpu",
            "cpu": i,
            "pid": p.pid,
            "how": "killed (spinning)",
            "partial": _cpu_counters(r.arena, r.stats_region, i),
        }
        r.messages.append(
            f"cpu{i} (pid {p.pid}) was spinning and could not be told to exit: killed"
        )

    def report_progress(self, now: float) -> None:
        if self.phase is Phase.RUNNING and not self.said_deadline and now >= self.end_ns / 1e9:
            self.said_deadline = True
            manifest.set_phase(self.r.arena, RunPhase.DRAINING)
            self.say("the deadline passed: the CPUs drain their I/Os")
        progress = self.spec.progress
        if progress is None or self.phase is not Phase.RUNNING or now < self.next_progress:
            return
        self.next_progress = now + 0.25
        r = self.r
        snap = _snapshot(r.arena, r.stats_region, self.n, self.t0_ns, self.end_ns)
        snap["lock_stat"] = lockstat.live(lockstat.read(r.arena, r.lock_stat_region))
        progress(snap)

    def wait_for_events(self, alive: list[int]) -> list[Any]:
        """The one wait point: the live CPUs' result pipes and sentinels, and the
        device's sentinel (a timeout for the progress line and the detectors)."""
        r = self.r
        waitables: list[Any] = [r.res_r[i] for i in alive] + [r.procs[i].sentinel for i in alive]
        if r.device is not None and self.device_dead is None:
            waitables.append(r.device.sentinel)
        if not self.interrupted:
            waitables.append(self.wake_fd)  # a stop signal
        return wait(waitables, timeout=0.1)

    def on_event(self, obj: Any) -> None:
        r = self.r
        if obj == self.wake_fd:
            return  # seen by check_signals
        if r.device is not None and obj == r.device.sentinel:
            self.on_device_death()
        elif obj in self.by_conn:
            i = self.by_conn[obj]
            msg = recv(obj)
            if msg is not None:
                self.on_message(i, msg)
        else:
            self.on_death(self.by_sentinel[obj])

    # -- what can happen ------------------------------------------------------------------

    def on_message(self, i: int, msg: wire.Report) -> None:
        """CPU ``i`` said something on its result pipe."""
        match msg:
            case wire.Ready(setup_cpu_ns=ns):
                self.ready.add(i)
                self.setup_cpu_ns += ns
                self.setup_cpu_max_ns = max(self.setup_cpu_max_ns, ns)
            case wire.Drained():
                self.drained.add(i)
            case wire.CpuResult(report=report):
                self.results[i] = report
            case wire.Error(error=error):
                self.errors[i] = error

    def on_death(self, i: int) -> None:
        """CPU ``i``'s process ended: a result may still be in its pipe (it exited
        after sending it); otherwise it died, and the run stops."""
        if i in self.results or i in self.dead or i in self.stopped:
            return  # reported, or ended by the runtime itself
        r = self.r
        p, res = r.procs[i], r.res_r[i]
        p.join(0.1)
        while res.poll(0):
            msg = recv(res)
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
            "how": exit_name(p.exitcode),
            "error": self.errors.get(i, ""),
            "partial": _cpu_counters(r.arena, r.stats_region, i),
        }
        self.enter_exit()

    def on_device_death(self) -> None:
        """The device process ended before it was told to: the run stops."""
        assert self.r.dev is not None
        self.device_dead = self.r._device_died(self.r.dev)
        self.enter_exit()

    def check_signals(self) -> None:
        """A stop signal was received (Ctrl-C, SIGTERM, SIGHUP): stop the run."""
        got = signals.received()
        if got and not self.interrupted:
            self.on_stop(got[0])

    def on_stop(self, signum: int) -> None:
        """The first stop signal: while the CPUs run, they stop submitting, drain and
        report what they measured; before they run there is nothing to report (the
        signal is raised, and the owner kills them)."""
        if self.phase is Phase.SETUP:
            raise signals.Stop(signum)
        self.interrupted = True
        self.say(
            f"{signal.Signals(signum).name}: stopping, the CPUs drain their I/Os (1 s at most)"
        )
        if self.phase is Phase.RUNNING:
            manifest.set_phase(self.r.arena, RunPhase.DRAINING)
            self._send_all(wire.Stop())

    def enter_exit(self) -> None:
        """Tell every CPU still there to exit, and wait for them a bounded time."""
        if self.phase is Phase.EXIT:
            return
        self._send_all(wire.Exit())
        self.phase = Phase.EXIT
        manifest.set_phase(self.r.arena, RunPhase.EXIT)
        self.say("the CPUs are told to exit")
        self.deadline = time.monotonic() + JOIN_TIMEOUT_S + 5

    def _send_all(self, msg: wire.Command) -> None:
        for i, conn in enumerate(self.r.ctl_w):
            if i not in self.dead:
                send(conn, msg)

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
            self.device_dead = r._stop_device(r.dev, self.device_stalled)
        dead_list = [self.dead[i] for i in sorted(self.dead)]
        if self.device_dead is not None:
            dead_list.append(self.device_dead)
        reap(r.procs)
        invariants = {"skipped": "a process died"} if dead_list else self._invariants()
        result = RunResult(
            cpus=[results[i] for i in sorted(results)],
            invariants=invariants,
            queues=[
                {
                    "name": q.name,
                    "index": q.index,
                    "limits": {**q.limits.describe(), "nomerges": q.nomerges},
                    "fair_share": fair_share_report(r.arena, q),
                    "elevator": elevator_report(r.arena, q),
                }
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
            stopped=[self.stopped[i] for i in sorted(self.stopped)],
            messages=r.messages,
            interrupted=self.interrupted or bool(signals.received()),
            t0_wall=self.t0_wall,
            finding=self.finding,
            trace_dump=dumped,
            device={**r.device_info, **r.device_result} if r.dev is not None else {},
            sysfs=results[0].get("sysfs", {}) if 0 in results else {},
            lock_stat=lockstat.read(r.arena, r.lock_stat_region),
        )
        if dead_list or self.errors:
            parts = [
                f"{d['role'] if d['role'] == 'device' else 'cpu' + str(d['cpu'])} (pid {d['pid']}) "
                + (f"hung: {d['hung']['detail']}: killed" if "hung" in d else f"died: {d['how']}")
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
            # a CPU killed inside emit() may have left its next slot half-written
            read_all(r.arena, r.trace_spec, quiescent=not self.stopped),
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
        abandoned = sum(j["inflight"] for c in reports for j in c["jobs"])
        if abandoned and self.interrupted:
            return {"skipped": f"{abandoned} I/Os still in flight when the stop gave up on them"}
        invariants = check_invariants(self.r.arena, self.r.queues, self.r.cpuhp_spec)
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


def _hung(stall: Stall) -> dict[str, Any]:
    """What a dead-process entry says of a process the watchdog found hung."""
    return {
        "how": f"hung ({stall.verdict})",
        "hung": stall.to_dict() | {"detail": stall.describe()},
    }


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

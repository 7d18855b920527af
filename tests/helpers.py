"""Helpers for tests that start real processes."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

#: The start method mqrt uses for its children (see mqrt/lib/shm.py and the README).
ctx = mp.get_context("fork")

#: Generous: only reached when something deadlocks.
DEADLOCK_TIMEOUT = 60.0


def stderr_lines(text: str) -> list[str]:
    """mqrt's stderr lines, without the notice a start prints when it reclaims another
    run's leftover segments (another test's, running next to this one)."""
    return [ln for ln in text.strip().splitlines() if "mqrt: reclaimed" not in ln]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` with backoff until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
        interval = min(interval * 2, 0.2)


def run_processes(
    *jobs: tuple[Callable[..., Any], Sequence[Any]], timeout: float = DEADLOCK_TIMEOUT
) -> None:
    """Start one process per ``(target, args)`` job, wait for all, and fail on any
    non-zero exit or on a deadlock (every process is killed and reaped either way)."""
    procs = [ctx.Process(target=target, args=tuple(args)) for target, args in jobs]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [p.pid for p in procs if p.is_alive()]
        assert not hung, f"processes {hung} still running after {timeout}s: deadlock?"
        codes = [p.exitcode for p in procs]
        assert all(c == 0 for c in codes), f"child exit codes: {codes}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
            p.close()


def wait_for_children(pid: int, n: int, timeout: float = 30.0) -> bool:
    """Wait until process ``pid`` has at least ``n`` live children (a run's CPUs have
    started), so a test's signal lands in the run, not in its start-up."""
    import psutil

    def started() -> bool:
        try:
            return len(psutil.Process(pid).children()) >= n
        except psutil.NoSuchProcess:
            return True  # it already ended: let the caller see how

    return wait_until(started, timeout)


def wait_for_work(pid: int, cpu_s: float, procs: int = 1, timeout: float = 60.0) -> bool:
    """Wait until at least ``procs`` live children of ``pid`` have each used ``cpu_s``
    of CPU time: a run's CPUs are doing I/O (its helper processes -- the resource
    tracker, a guardian -- use next to none), whatever the host's load makes of the
    wall clock."""
    import psutil

    def busy() -> bool:
        try:
            children = psutil.Process(pid).children()
        except psutil.NoSuchProcess:
            return True  # it already ended: let the caller see how
        working = 0
        for c in children:
            try:
                t = c.cpu_times()
            except psutil.Error:
                continue
            working += t.user + t.system >= cpu_s
        return working >= procs

    return wait_until(busy, timeout)


@contextlib.contextmanager
def scripted_rigs(setup_for: Callable[..., Any]) -> Iterator[Callable[..., tuple[Any, Any]]]:
    """``make(ops=None, nr_cpus=1, **kw) -> (rig, ops)``: in-process rigs over a
    ScriptOps driver, ``setup_for(ops, **kw)`` declaring their queues; every rig made
    is closed on the way out."""
    from mqrt.testing import Rig, ScriptOps

    rigs: list[Rig] = []

    def make(ops: ScriptOps | None = None, nr_cpus: int = 1, **kw: Any) -> tuple[Rig, ScriptOps]:
        ops = ops or ScriptOps()
        rig = Rig(setup_for(ops, **kw), nr_cpus=nr_cpus)
        rigs.append(rig)
        return rig, ops

    try:
        yield make
    finally:
        for rig in rigs:
            rig.close()


def interrupt(p: subprocess.Popen, ready: Callable[[], bool]) -> tuple[str, str]:
    """Ctrl-C a running command once ``ready()`` says it got where the test wants it
    (a state, not a time): its stdout and stderr; it is killed and reaped on every
    way out."""
    try:
        assert ready()
        p.send_signal(signal.SIGINT)
        return p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()

"""The owner's side of its child processes (the CPUs and the device): control messages
to them, reports from them, how one ended, and the reap on every exit path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from mqrt.lib import wire

#: A CPU that has not said "ready" by then is stuck in setup ...
READY_TIMEOUT_S = 30.0
#: ... plus this much per CPU: hundreds of CPUs set up one after another on few
#: host cores (each builds its handles on every queue and ctx).
READY_PER_CPU_S = 0.1


def ready_timeout_s(nr_cpus: int) -> float:
    """How long ``nr_cpus`` CPUs may take to say "ready" before they count as stuck."""
    return READY_TIMEOUT_S + READY_PER_CPU_S * nr_cpus


#: Join, then SIGTERM, then SIGKILL (loky's order), each with this deadline.
JOIN_TIMEOUT_S = 5.0


def exit_name(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"{signal.Signals(-code).name}({code})"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def send(conn, msg: wire.Command) -> None:
    """Best effort: the child may be gone (its pipe closed)."""
    with contextlib.suppress(OSError, ValueError):
        wire.send(conn, msg)


def recv(conn) -> wire.Report | None:
    """One message from a child's result pipe; None if the child closed it."""
    try:
        return wire.recv_report(conn)
    except (EOFError, OSError):
        return None


def kill(p) -> None:
    """SIGKILL a child the runtime gave up on (a stopped one too), and wait for it."""
    with contextlib.suppress(ProcessLookupError, TypeError):
        os.kill(p.pid, signal.SIGKILL)
    p.join(JOIN_TIMEOUT_S)


def reap(procs: list, join_s: float = JOIN_TIMEOUT_S) -> None:
    """Join with a deadline (``join_s``; 0 when the run is aborted), then SIGTERM,
    then SIGKILL; every child is waited for."""
    deadline = time.monotonic() + join_s
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

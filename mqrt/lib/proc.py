"""What every child process of a run (a CPU, the device) does before anything else.

* Ctrl-C and a terminal's hang-up reach the whole process group: children ignore
  SIGINT and SIGHUP and let the runtime decide what stops; SIGTERM keeps its default
  (the runtime's last resort).
* If the runtime dies without cleaning up (SIGKILL), its children must not live on
  holding the arena: ``PR_SET_PDEATHSIG`` delivers SIGKILL to them, and the resource
  tracker (which they share with the runtime) then unlinks the segment.
* Pinning to a host core, and 1 µs timer slack instead of the default 50 µs: the
  children's timers (null_blk's hrtimers, the device's service times) are
  microseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal

PR_SET_PDEATHSIG = 1
PR_SET_TIMERSLACK = 29

_libc: ctypes.CDLL | None = None


def _prctl(option: int, arg: int) -> bool:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def precise_timers(slack_ns: int = 1000) -> bool:
    """Ask for ``slack_ns`` of timer slack (prctl PR_SET_TIMERSLACK)."""
    return _prctl(PR_SET_TIMERSLACK, slack_ns)


def child_init(parent_pid: int, host_core: int | None) -> None:
    """Signals, death with the parent, pinning and timer slack for a forked child."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)
    if host_core is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {host_core})
    precise_timers()

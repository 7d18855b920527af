"""What every child process of a run (a CPU, the device) does before anything else.

* Ctrl-C and a terminal's hang-up reach the whole process group: children ignore
  SIGINT and SIGHUP and let the runtime decide what stops; SIGTERM keeps its default
  (the runtime's last resort).
* If the runtime dies without cleaning up (SIGKILL), its children must not live on
  holding the arena: ``PR_SET_PDEATHSIG`` delivers SIGKILL to them, and the segment's
  guardian (:mod:`mqrt.lib.shm`) unlinks it.
* Each child names itself (``PR_SET_NAME``: ``mqrt-cpu3``, ``mqrt-device``), so
  ``ps``, ``top`` and ``pkill`` tell them apart.
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
PR_SET_NAME = 15
PR_SET_TIMERSLACK = 29

_libc: ctypes.CDLL | None = None


def _prctl(option: int, arg: int | bytes) -> bool:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        value = ctypes.c_char_p(arg) if isinstance(arg, bytes) else ctypes.c_ulong(arg)
        return _libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def precise_timers(slack_ns: int = 1000) -> bool:
    """Ask for ``slack_ns`` of timer slack (prctl PR_SET_TIMERSLACK)."""
    return _prctl(PR_SET_TIMERSLACK, slack_ns)


def set_name(name: str) -> bool:
    """This process's name as ``ps -o comm`` and ``top`` show it (15 bytes at most)."""
    return _prctl(PR_SET_NAME, name.encode()[:15])


def child_init(parent_pid: int, host_core: int | None, name: str = "") -> None:
    """Signals, death with the parent, its name, pinning and timer slack for a
    forked child."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)
    if name:
        set_name(name)
    if host_core is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {host_core})
    precise_timers()

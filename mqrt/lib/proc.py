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
import multiprocessing.util as mp_util
import os
import select
import signal
import sys
import traceback
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_TIMERSLACK = 29

_libc: ctypes.CDLL | None = None


def _prctl(option: int, arg: int | bytes) -> bool:
    global _libc
    try:
        if _libc is None:
            # the process's own symbols (libc's among them): no find_library(), which
            # runs ``ldconfig -p`` in a subprocess, in each of hundreds of children
            _libc = ctypes.CDLL(None, use_errno=True)
        value = ctypes.c_char_p(arg) if isinstance(arg, bytes) else ctypes.c_ulong(arg)
        return _libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def prepare() -> None:
    """In the parent, before it forks many children: what :func:`child_init` looks
    up once (libc's prctl), so each child inherits it."""
    global _libc
    with contextlib.suppress(OSError, AttributeError):
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl  # noqa: B018  (ctypes makes the function object on first access)


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


class Child:
    """A child forked by :func:`fork`: the part of ``multiprocessing.Process`` the
    runtime uses (``pid``, ``sentinel``, ``join``, ``exitcode``, ``is_alive``,
    ``close``), without its per-start bookkeeping (``Process.start()`` polls every
    child started before: hundreds of CPUs made that quadratic).

    ``sentinel`` is a pidfd: readable once the child has exited, so
    ``multiprocessing.connection.wait`` and ``select`` take it as they take a
    ``Process.sentinel``.  The child stays a zombie until ``join`` (or ``exitcode``,
    ``is_alive``) reaps it: its pid cannot be reused while the runtime may still
    signal it.  Only the process that forked it uses these methods.
    """

    def __init__(self, pid: int, name: str):
        self.pid = pid
        self.name = name
        self.sentinel = os.pidfd_open(pid)
        self._exitcode: int | None = None

    def _reap(self, flags: int) -> None:
        if self._exitcode is not None:
            return
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # reaped by someone else: its status is lost
            self._exitcode = 255
            return
        if pid:
            self._exitcode = os.waitstatus_to_exitcode(status)  # -N: killed by signal N

    @property
    def exitcode(self) -> int | None:
        """As ``Process.exitcode``: None while it runs, -N if signal N ended it."""
        self._reap(os.WNOHANG)
        return self._exitcode

    def is_alive(self) -> bool:
        return self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        """Wait (at most ``timeout`` seconds) for the child to exit, and reap it."""
        if self._exitcode is not None:
            return
        if timeout is None:
            self._reap(0)
            return
        poller = select.poll()
        poller.register(self.sentinel, select.POLLIN)
        with contextlib.suppress(InterruptedError):
            poller.poll(max(0.0, timeout) * 1000)
        self._reap(os.WNOHANG)

    def close(self) -> None:
        """Release the sentinel; as ``Process.close``, ValueError while it runs."""
        if self.exitcode is None:
            raise ValueError(f"cannot close {self.name} (pid {self.pid}): still running")
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


def fork(target: Callable[..., object], args: tuple, name: str) -> Child:
    """Fork a child that runs ``target(*args)`` and exits (status 0, or 1 if it
    raised): the cheap path for many children, with what ``multiprocessing``'s fork
    start does in the child that matters here (its after-fork hooks, its finalizers
    forgotten, stdin on /dev/null).  The caller blocks the stop signals around it
    (:func:`mqrt.lib.signals.forking`)."""
    for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
        with contextlib.suppress(Exception):
            stream.flush()
    pid = os.fork()
    if pid:
        return Child(pid, name)
    code = 1
    try:
        mp_util._finalizer_registry.clear()  # type: ignore[attr-defined]
        mp_util._run_after_forkers()  # type: ignore[attr-defined]
        with contextlib.suppress(OSError, ValueError):
            if sys.stdin is not None:
                sys.stdin.close()
                sys.stdin = open(os.devnull)  # noqa: SIM115
        target(*args)
        code = 0
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

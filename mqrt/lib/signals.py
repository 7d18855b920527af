"""The owner's stop signals: Ctrl-C (SIGINT), SIGTERM and SIGHUP, handled alike.

* The first signal stops what is running.  Where nothing can be stopped cleanly it is
  raised as :class:`Stop` (a ``KeyboardInterrupt``, so ``finally`` clauses and
  ``with`` blocks run); inside :func:`deferred` (a run's wait loop, the report being
  printed) it is only recorded, and the code there asks :func:`received` and stops
  the run itself: the CPUs drain and report what they measured.
* A second signal while the first is being honoured is raised as :class:`Abort`:
  give up now, report nothing.
* Inside :func:`shielded` (the cleanup of a run: reaping the children, unlinking the
  segment) nothing is raised; the signals are only recorded.

The exit status is ``128 + signal`` (:func:`exit_status`): 130 for Ctrl-C, 143 for
SIGTERM, 129 for SIGHUP.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stop(KeyboardInterrupt):
    """A stop signal raised where it landed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal_name(self.signum)


class Abort(Stop):
    """A second stop signal while the first was being honoured: abort, report nothing."""


_received: list[int] = []
_deferred = 0
_shielded = 0
_aborted = False
_wake_w = -1  #: written to when a signal is recorded (see :func:`wakeup`)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _handler(signum: int, frame: Any) -> None:
    global _aborted
    _received.append(signum)
    if _wake_w >= 0:
        with contextlib.suppress(OSError):
            os.write(_wake_w, b"s")
    if _shielded or _aborted:
        return
    if len(_received) > 1:
        _aborted = True
        raise Abort(signum)
    if not _deferred:
        raise Stop(signum)


def received() -> list[int]:
    """The stop signals received so far, first first."""
    return list(_received)


def exit_status() -> int | None:
    """128 + the first stop signal received (None: none was)."""
    return 128 + _received[0] if _received else None


def stopped_message() -> str:
    """What a run stopped by a signal says on stderr, its figures reported."""
    if not _received or _received[0] == signal.SIGINT:
        return "mqrt: interrupted: the figures cover the time before Ctrl-C"
    return f"mqrt: stopped by {signal_name(_received[0])}: the figures cover the time before it"


def reset() -> None:
    global _aborted
    _received.clear()
    _aborted = False


def install() -> bool:
    """Handle every stop signal here (main thread only); True if they now are."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for s in STOP_SIGNALS:
        signal.signal(s, _handler)
    return True


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """The stop signals handled here for the block; if they were not already (a run
    started from library code), the previous handlers are restored after it and the
    block starts and ends with no signal recorded."""
    if threading.current_thread() is not threading.main_thread() or all(
        signal.getsignal(s) is _handler for s in STOP_SIGNALS
    ):
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    reset()
    install()
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        reset()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """The first stop signal is only recorded in the block (see :func:`received`); a
    second one raises :class:`Abort`."""
    global _deferred
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """No stop signal is raised in the block; they are recorded."""
    global _shielded
    _shielded += 1
    try:
        yield
    finally:
        _shielded -= 1


@contextlib.contextmanager
def wakeup() -> Iterator[int]:
    """A file descriptor that becomes readable when a stop signal is received in the
    block: a wait loop waits on it, so a deferred signal is seen at once."""
    global _wake_w
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous, _wake_w = _wake_w, w
    try:
        yield r
    finally:
        _wake_w = previous
        os.close(r)
        os.close(w)


@contextlib.contextmanager
def forking() -> Iterator[None]:
    """Forks in the block.  The stop signals are blocked (the signal mask) across it,
    and each child forked in it starts with a child's dispositions (Ctrl-C and
    SIGHUP ignored, SIGTERM's default: :func:`_child_after_fork`) before it takes
    them: a child never runs the owner's handler, whatever the owner recorded.  The
    first signal is recorded, delivered when the block ends, and raised there as
    :class:`Stop` (unless an outer block defers it)."""
    blocked = threading.current_thread() is threading.main_thread()
    if blocked:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        with deferred():
            yield
            if blocked:  # the signals that came in the block are handled here
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
                blocked = False
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if _received and not (_deferred or _shielded or _aborted):
        raise Stop(_received[0])


def _child_after_fork() -> None:
    """In a child forked while the owner handles the stop signals: a child's
    dispositions (mqrt.lib.proc.child_init sets the same), nothing recorded, and
    the stop signals unblocked (a SIGTERM already pending now ends it)."""
    global _deferred, _shielded, _wake_w
    if signal.getsignal(signal.SIGTERM) is not _handler:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    reset()
    _deferred = _shielded = 0
    _wake_w = -1
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


os.register_at_fork(after_in_child=_child_after_fork)

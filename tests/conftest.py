"""Suite-wide guards: every test must leave no mqrt segment and no child process behind."""

from __future__ import annotations

import contextlib
import os
import signal

import psutil
import pytest

from mqrt.lib import shm
from tests.helpers import wait_until

# A shell without job control starts background commands (`cmd &`) with SIGINT
# ignored, and an ignored signal stays ignored across exec: the Ctrl-C tests' children
# would never see their SIGINT.  Give this process (and so every child it starts)
# the default disposition back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _tracker_pid() -> int | None:
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _children() -> set[int]:
    """Live descendants, except the resource tracker (it lives as long as we do)."""
    tracker = _tracker_pid()
    return {
        p.pid for p in psutil.Process().children(recursive=True) if p.pid != tracker and _alive(p)
    }


def _leaked(before: set[str]) -> list[str]:
    """Segments this test created (owned by us, or by a process that is gone)."""
    mine = os.getpid()
    stale = set(shm.stale_segments())
    return [
        n
        for n in shm.list_segments()
        if n not in before and (shm.segment_owner(n) == mine or n in stale)
    ]


@pytest.fixture(autouse=True)
def no_leftovers():
    """Fail any test that leaves an mqrt-* segment or a child process behind (with
    patience: process tables and the resource tracker lag a little)."""
    segments_before = set(shm.list_segments())
    children_before = _children()
    yield
    if not wait_until(lambda: not _leaked(segments_before), timeout=5.0):
        leaked = _leaked(segments_before)
        pytest.fail(f"test left shared-memory segments behind: {leaked}")
    if not wait_until(lambda: not (_children() - children_before), timeout=5.0):
        left = _children() - children_before
        for pid in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        pytest.fail(f"test left child processes behind: {sorted(left)}")

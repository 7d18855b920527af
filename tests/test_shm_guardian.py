"""No /dev/shm segment outlives its owner, whatever kills it: the guardian (a whole
process group SIGKILLed or hung up), the reclaim at every start (an owner gone, or
its pid reused), and a killed resource tracker (no traceback)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from mqrt.lib import shm
from tests.helpers import wait_until

BENCH = [sys.executable, "-m", "mqrt", "bench", "--cpus", "2", "-q"]


def _segments_of(pid: int) -> list[str]:
    return [n for n in shm.list_segments() if shm.segment_owner(n) == pid]


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _start(args: list[str]) -> subprocess.Popen:
    """A run in a session of its own, as a terminal or a CI job starts it."""
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP])
def test_a_signal_to_the_whole_group_leaves_no_segment_and_no_process(sig):
    proc = _start([*BENCH, "--runtime", "30"])
    try:
        assert wait_until(lambda: _segments_of(proc.pid), timeout=30), proc.stderr
        owner = psutil.Process(proc.pid)
        # the run's processes: the CPUs (in the group) and the guardian (not in it)
        assert wait_until(lambda: len(owner.children()) >= 3, timeout=30)
        run = [owner, *owner.children(recursive=True)]
        cmdlines = [" ".join(p.cmdline()) for p in run]
        assert not [c for c in cmdlines if "resource_tracker" in c], cmdlines
        os.killpg(proc.pid, sig)
        proc.communicate(timeout=30)
        assert wait_until(lambda: not _segments_of(proc.pid), timeout=10)
        assert wait_until(lambda: all(_gone(p) for p in run), timeout=10), run
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _make_segment(name: str) -> str:
    os.close(os.open(os.path.join(shm.SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    return name


def test_reclaim_takes_segments_whose_owner_is_gone():
    exited = subprocess.Popen([sys.executable, "-S", "-c", "pass"])
    exited.wait()
    me = os.getpid()
    start = shm.proc_start_time(me)
    assert start is not None
    dead = _make_segment(f"mqrt-{exited.pid}-1-0000dead")
    reused = _make_segment(f"mqrt-{me}-{start + 1}-0000beef")  # a live pid, another start
    live = _make_segment(f"mqrt-{me}-{start}-0000f00d")  # this process's: alive
    try:
        # (another test's mqrt start, running next to this one, may reclaim them too)
        gone = set(shm.reclaim_stale())
        names = set(shm.list_segments())
        assert dead not in names and reused not in names and live in names
        assert live not in gone
    finally:
        for name in (dead, reused, live):
            shm._unlink(name)


def test_a_start_reclaims_segments_whose_owner_is_gone():
    exited = subprocess.Popen([sys.executable, "-S", "-c", "pass"])
    exited.wait()
    # Any mqrt start reclaims, also another test's running next to this one: if one
    # took this attempt's segment first (it is gone, and not named here), again.
    for attempt in range(20):
        dead = _make_segment(f"mqrt-{exited.pid}-1-{attempt:04x}dead")
        try:
            out = subprocess.run(
                [*BENCH, "--runtime", "0.1"], check=False, capture_output=True, text=True,
                timeout=60,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            assert dead not in shm.list_segments()
            lines = [ln for ln in out.stderr.splitlines() if "reclaimed" in ln]
            if lines and dead in lines[0]:
                return
        finally:
            shm._unlink(dead)
    pytest.fail("another start reclaimed the segment first, 20 times in a row")


# A run with a resource tracker of its own, started before the run: nothing of mqrt's
# registers with it (its arena is untracked), so killing it must change nothing.
WITH_TRACKER = (
    "import runpy, sys\n"
    "from multiprocessing import resource_tracker\n"
    "resource_tracker.ensure_running()\n"
    "sys.argv = ['mqrt', *sys.argv[1:]]\n"
    "runpy.run_module('mqrt', run_name='__main__')\n"
)


def test_a_killed_resource_tracker_leaves_no_traceback():
    proc = _start([sys.executable, "-c", WITH_TRACKER, *BENCH[3:], "--runtime", "2"])
    try:
        owner = psutil.Process(proc.pid)

        def tracker() -> psutil.Process | None:
            for p in owner.children():
                try:
                    if "resource_tracker" in " ".join(p.cmdline()):
                        return p
                except psutil.NoSuchProcess:
                    pass
            return None

        assert wait_until(lambda: _segments_of(proc.pid) and tracker(), timeout=30)
        found = tracker()
        assert found is not None
        found.kill()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "KeyError" not in err, err
        assert not _segments_of(proc.pid)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()

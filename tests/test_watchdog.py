"""The runtime's watchdog (mqrt.runtime.watchdog) on real processes: a healthy one is
never convicted, whatever the host's load; a stopped, spinning or blocked one is,
named with its state; and in a real ``mqrt bench`` a hung CPU ends the run with
exit 1 and the others' figures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mqrt.runtime.watchdog import Stall, Watchdog
from tests.helpers import ctx, wait_until

pytestmark = pytest.mark.timing


def _beating(hb, mode) -> None:
    """A child: publishes a heartbeat every 50 ms from a bounded wait, as a CPU does;
    mode 1: then spins without it; mode 2: then blocks on a lock it holds."""
    while mode.value == 0:
        hb.value = time.monotonic_ns()
        time.sleep(0.05)
    if mode.value == 1:
        while True:
            pass
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()


class _Child:
    def __init__(self):
        self.hb = ctx.Value("Q", 0, lock=False)
        self.mode = ctx.Value("i", 0, lock=False)
        self.p = ctx.Process(target=_beating, args=(self.hb, self.mode), daemon=True)
        self.p.start()
        assert wait_until(lambda: self.hb.value != 0, 30)
        self.dog = Watchdog([self.p.pid], lambda i: (self.hb.value, "testing"))

    def watch(self, seconds: float) -> list[Stall]:
        """Look every 0.1 s for ``seconds`` (of looks: a sampling period); the stalls."""
        found: list[Stall] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not found:
            found = self.dog.check([0], False)
            time.sleep(0.1)
        return found

    def close(self) -> None:
        self.p.kill()
        self.p.join()


@pytest.fixture
def child():
    c = _Child()
    yield c
    c.close()


def test_a_process_that_beats_is_never_convicted(child):
    assert child.watch(3.0) == []


def test_a_short_stop_is_not_a_hang(child):
    os.kill(child.p.pid, signal.SIGSTOP)
    try:
        assert child.watch(0.5) == []
    finally:
        os.kill(child.p.pid, signal.SIGCONT)
    assert child.watch(2.0) == []


def test_a_stopped_process_is_convicted_with_its_state(child):
    os.kill(child.p.pid, signal.SIGSTOP)
    try:
        t = time.monotonic()
        found = child.watch(30)
    finally:
        os.kill(child.p.pid, signal.SIGCONT)
    assert [s.verdict for s in found] == ["stopped"], found
    s = found[0]
    assert s.pid == child.p.pid and s.state == "stopped" and s.phase == "testing"
    assert "stopped (state stopped)" in s.describe()
    assert time.monotonic() - t >= 1.0  # STOPPED_S of looks, not one glimpse


@pytest.mark.parametrize(("mode", "verdict"), [(1, "spinning"), (2, "blocked")])
def test_a_spinning_or_blocked_process_is_convicted(child, mode, verdict):
    child.mode.value = mode
    found = child.watch(60)
    assert [s.verdict for s in found] == [verdict], found
    s = found[0]
    if verdict == "spinning":
        assert s.cpu_s >= 1.0 and s.state == "running"
    else:
        assert s.state == "sleeping" and s.cpu_s < 0.5
        assert s.wchan == "" or "futex" in s.wchan, s.wchan


@pytest.mark.parametrize("kind", ["spin", "block"])
def test_a_hung_cpu_ends_the_run_with_the_others_figures(kind):
    env = {**os.environ, "MQRT_HANG": f"1:{kind}:0.5"}
    t = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "mqrt", "bench", "--cpus", "2", "--runtime", "60", "-q",
         "--output-format", "json"],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert time.monotonic() - t < 50  # not the run's 60 s, nor its drain deadline
    verdict = {"spin": "spinning", "block": "blocked"}[kind]
    assert f"hung: {verdict}" in out.stderr and "Traceback" not in out.stderr, out.stderr
    report = json.loads(out.stdout)
    error = report["mqrt"]["error"]
    assert error["cpu"] == 1 and error["reason"] == f"hung ({verdict})"
    assert error["doing"] == "running its jobs" and error["state"]
    assert error["partial"]["cpus_reported"] == [0]
    assert report["jobs"][0]["read"]["total_ios"] > 0

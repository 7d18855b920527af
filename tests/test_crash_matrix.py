"""The crash matrix: every process of a real ``mqrt bench`` run (the owner, a CPU, the
device, the segment's guardian) signalled in every phase of the run (set-up,
running, draining, reporting) with SIGKILL, SIGTERM, SIGSTOP and SIGHUP.  Each case
checks the exit status, one clear message, that no process and no ``/dev/shm``
segment is left, and the time from the signal to the exit.

The phase is found from the run's own account of itself (``mqrt bench -v`` prints a
line at each step) and from its processes' names (``mqrt-cpu1``, ``mqrt-device``),
never from a fixed sleep.  Draining is made long on purpose: every I/O takes 3 s, the
run lasts 1 s, so the CPUs drain for about 2 s after the deadline.  The whole group
killed at once is in ``test_shm_guardian.py``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from tests.helpers import wait_until

#: What the README promises, with room for a host that is saturated on purpose.
EXIT_WITHIN_S = 5.0  # a dead process, a stop signal: 1 s promised
HUNG_WITHIN_S = 10.0  # a stopped process: 2 s promised

K, T, S, H = signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP, signal.SIGHUP
PHASES = ("setup", "running", "draining", "reporting")

SLOW_NULLB = ["--irqmode", "timer", "--completion_nsec", "3000000000", "--iodepth", "2"]
SLOW_NVME = ["--latency_ns", "3000000000", "--latency_dist", "fixed", "--iodepth", "2"]


def _expected(role: str, sig: int, phase: str) -> tuple[tuple[int, ...], str]:
    """The exit statuses allowed and a text stderr must hold."""
    if role == "owner":
        if sig == K:
            return (-K,) if phase != "reporting" else (-K, 0), ""
        if sig == S:
            return (0,), ""  # continued by the test: the run goes on
        if phase == "reporting":  # the report exists: printed, whichever comes first
            return (0, 128 + sig), ""
        return (128 + sig,), signal.Signals(sig).name
    if sig in (H,) or role == "guardian":
        return (0,), ""  # children ignore SIGHUP; the guardian is not the run
    who = "device" if role == "device" else "cpu1"
    if sig == S:
        return (1,), f"{who} (pid {{pid}}) hung: stopped"
    return (1,), f"{who} (pid {{pid}}) died: {signal.Signals(sig).name}"


def _cases():
    for role in ("owner", "cpu", "device", "guardian"):
        for phase in PHASES:
            if phase == "reporting" and role != "owner":
                continue  # the run's children are gone by then
            for sig in (K, T, S, H):
                yield pytest.param(role, phase, sig, id=f"{role}-{phase}-{sig.name}")


class _Run:
    """A real ``mqrt bench -v`` whose stderr lines are read as they come."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mqrt", "bench", "--cpus", "2", "-q", "-v",
             "--output-format", "json", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        self.out = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)
            self.lines.put(line)

    def wait_line(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if text in self.lines.get(timeout=0.05):
                    return
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
        raise AssertionError(f"never said {text!r}: {''.join(self.err)}")

    def child(self, role: str) -> psutil.Process:
        """The run's process playing ``role``, once it exists."""
        owner = psutil.Process(self.proc.pid)
        sid = os.getsid(self.proc.pid)
        found: list[psutil.Process] = []

        def named(k: psutil.Process) -> bool:
            try:
                if role == "guardian":
                    return os.getsid(k.pid) != sid
                return k.name() == {"cpu": "mqrt-cpu1", "device": "mqrt-device"}[role]
            except (psutil.Error, ProcessLookupError):
                return False

        def there() -> bool:
            found[:] = [k for k in owner.children() if named(k)]
            return bool(found) or self.proc.poll() is not None

        assert wait_until(there, 60, 0.001) and found, f"no {role}: {''.join(self.err)}"
        return found[0]

    def finish(self) -> tuple[int, str]:
        """Wait for the owner (60 s at most); its exit status and all of stderr."""
        assert self.proc.stdout is not None
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(self.proc.stdout.read()), daemon=True)
        reader.start()
        try:
            self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        reader.join(10)
        self._reader.join(10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        self.out = "".join(out)
        return self.proc.returncode, "".join(self.err)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize(("role", "phase", "sig"), list(_cases()))
def test_crash_matrix(role: str, phase: str, sig: signal.Signals):
    if role == "device" and phase == "reporting":
        pytest.skip("no device by then")
    ends_run = _expected(role, sig, phase)[0] != (0,)
    args = ["--runtime", "30" if ends_run and phase != "reporting" else "1"]
    if role == "device":
        args += ["--driver", "nvme"]
    if phase == "draining":
        args = ["--runtime", "1", *(SLOW_NVME if role == "device" else SLOW_NULLB)]
        args += ["--driver", "nvme"] if role == "device" else []
    if phase == "reporting":
        args += ["--driver", "nvme"]  # the wake-up round trip is measured after the run
    run = _Run(args)
    try:
        marker = {
            "setup": "owner pid",
            "running": "running",
            "draining": "the deadline passed",
            "reporting": "reporting",
        }[phase]
        if phase == "setup" and role in ("cpu", "device"):
            target = run.child(role)  # it exists: the CPUs are not all ready yet
        else:
            run.wait_line(marker)
            target = run.child(role) if role != "owner" else psutil.Process(run.proc.pid)
        kids = psutil.Process(run.proc.pid).children()
        t = time.monotonic()
        target.send_signal(sig)
        if role == "owner" and sig == S:
            assert wait_until(lambda: target.status() == psutil.STATUS_STOPPED, 10)
            target.send_signal(signal.SIGCONT)
        code, err = run.finish()
    except BaseException:
        run.proc.kill()
        run.finish()
        raise
    took = time.monotonic() - t
    codes, says = _expected(role, sig, phase)
    assert code in codes, (code, err)
    assert says.format(pid=target.pid) in err, err
    assert "Traceback" not in err, err
    if code != -K:
        assert err.count("mqrt: error:") + err.count("mqrt: stopped by") == (code != 0), err
        report = json.loads(run.out)
        if code == 1:
            error = report["mqrt"]["error"]
            assert error["pid"] == target.pid and error["partial"]["point"] is not None
    if code != 0:  # the run ended on the signal (otherwise it ran to its end)
        assert took < (HUNG_WITHIN_S if sig == S else EXIT_WITHIN_S), took
    assert wait_until(lambda: not any(_alive(k) for k in kids), 10), kids
    assert wait_until(
        lambda: not [n for n in os.listdir("/dev/shm") if n.startswith(f"mqrt-{run.proc.pid}-")],
        10,
    )

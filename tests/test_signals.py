"""Stop signals to a real ``mqrt bench``: Ctrl-C, SIGTERM and SIGHUP stop the run and
report what was measured (exit 128 + signal); a second one aborts; a Ctrl-C during
the imports or after the figures exist never costs a traceback or the report.  Each
test waits for the state it needs (the run's CPUs running, the reference's processes),
never a fixed time, and checks that nothing is left: no process, no /dev/shm segment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import stderr_lines, wait_until

#: Signal to exit: 1 s is the promise; the margin is for a loaded host.
EXIT_WITHIN_S = 5.0


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mqrt", "bench", "--cpus", "2", "-q", "--output-format", "json",
         *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _cpu_s(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
        return t.user + t.system
    except psutil.NoSuchProcess:
        return 0.0


def _wait_running(proc: subprocess.Popen, n: int) -> list[psutil.Process]:
    """Wait until ``n`` children of the owner have used some CPU time: the run's CPUs
    (idle in set-up, they spin once started with --irqmode none) and, with nvme, the
    device.  Returns every child (the resource tracker too)."""
    owner = psutil.Process(proc.pid)

    def running() -> bool:
        if proc.poll() is not None:
            return True
        return sum(_cpu_s(k) > 0.1 for k in owner.children()) >= n

    assert wait_until(running, 60), "the run did not start"
    assert proc.poll() is None, proc.communicate()
    return owner.children()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _finish(proc: subprocess.Popen, kids: list[psutil.Process], t_sig: float):
    """Wait for the owner; its exit status, stdout, stderr and seconds since t_sig;
    fail if it left a process or a segment behind."""
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    took = time.monotonic() - t_sig
    assert wait_until(lambda: not any(_alive(k) for k in kids), 10)
    left = [n for n in os.listdir("/dev/shm") if n.startswith(f"mqrt-{proc.pid}-")]
    assert not left, left
    assert "Traceback" not in err, err
    return proc.returncode, out, err, took


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_stop_signal_reports_what_was_measured(sig):
    proc = _start("--runtime", "30", "--irqmode", "none")
    kids = _wait_running(proc, 2)
    t = time.monotonic()
    proc.send_signal(sig)
    code, out, err, took = _finish(proc, kids, t)
    assert code == 128 + sig, err
    assert took < EXIT_WITHIN_S
    assert len(stderr_lines(err)) == 1, err
    what = "Ctrl-C" if sig == signal.SIGINT else signal.Signals(sig).name
    assert what in err
    report = json.loads(out)
    assert report["mqrt"]["interrupted"]
    read = report["jobs"][0]["read"]
    assert read["total_ios"] > 0 and read["runtime"] < 30_000
    assert report["mqrt"]["invariants"]["violations"] == 0


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGHUP])
def test_second_signal_while_draining_aborts(second):
    # back to back (two different signals: a pending one is not queued twice); the
    # owner cannot have drained and reported between the two kill()s
    proc = _start("--runtime", "30", "--irqmode", "none")
    kids = _wait_running(proc, 2)
    proc.send_signal(signal.SIGTERM)
    t = time.monotonic()
    proc.send_signal(second)
    code, out, err, took = _finish(proc, kids, t)
    # if both are pending at once, the kernel delivers the lower-numbered first
    last = signal.Signals(code - 128)
    assert last in (second, signal.SIGTERM), err
    assert took < EXIT_WITHIN_S
    aborted = f"mqrt: second signal ({last.name}): aborting, figures not reported"
    assert stderr_lines(err) == [aborted]
    assert out == ""


def test_ctrl_c_during_imports_is_quiet(tmp_path):
    # -X importtime reports each import as it ends: once mqrt._entry's is there, the
    # command's own imports (mqrt.cli, numpy, the drivers ...) are under way
    for k, delay in enumerate((0.0, 0.01, 0.03, 0.06, 0.1)):
        log = tmp_path / f"err{k}"
        with open(log, "w") as errf:
            proc = subprocess.Popen(
                [sys.executable, "-X", "importtime", "-m", "mqrt", "bench", "--runtime", "30"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf,
            )  # fmt: skip
            try:
                assert wait_until(lambda log=log: "| mqrt._entry\n" in log.read_text(), 30, 0.001)
                time.sleep(delay)  # a spread of moments in the imports: not synchronisation
                proc.send_signal(signal.SIGINT)
                code = proc.wait(60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        err = log.read_text()
        assert code == 130, (delay, err[-2000:])
        assert "Traceback" not in err and "mqrt: interrupted" in err, (delay, err[-2000:])
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"mqrt-{proc.pid}-")]


def test_ctrl_c_during_the_reference_keeps_the_report():
    proc = _start("--runtime", "1", "--driver", "nvme", "--reference")
    owner = psutil.Process(proc.pid)
    try:
        run = {k.pid for k in _wait_running(proc, 2)}  # the CPUs, the device, the tracker

        def reference_started() -> bool:
            return proc.poll() is not None or any(k.pid not in run for k in owner.children())

        deadline = time.monotonic() + 60  # the reference lasts ~0.1 s: poll tightly
        while not reference_started() and time.monotonic() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, "the reference's processes were not seen"
        kids = owner.children()
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    t = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code, out, err, took = _finish(proc, kids, t)
    assert code == 130, err
    assert took < EXIT_WITHIN_S
    report = json.loads(out)
    assert report["jobs"][0]["read"]["total_ios"] > 0
    assert "sq_cq_loop_iops" not in report["mqrt"].get("reference", {})
    assert report["mqrt"]["interrupted"]  # the reference was cut short

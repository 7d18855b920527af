"""The crash matrix's figures for the README: each process of a running ``mqrt bench``
(the owner, a CPU, the device, the segment's guardian) sent each signal, several
times; per row the exit statuses, the median time from the signal to mqrt's exit, and
the last line mqrt printed.  (The pass/fail matrix over every phase is
``tests/test_crash_matrix.py``.)

    python tools/crash_figures.py --repeat 5
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

import psutil

SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP, signal.SIGHUP)


def _target(owner: int, role: str) -> psutil.Process | None:
    if role == "owner":
        return psutil.Process(owner)
    sid = os.getsid(owner)
    for k in psutil.Process(owner).children():
        try:
            if role == "guardian" and os.getsid(k.pid) != sid:
                return k
            if k.name() == {"cpu": "mqrt-cpu1", "device": "mqrt-device"}.get(role):
                return k
        except (psutil.Error, ProcessLookupError):
            continue
    return None


def one(role: str, sig: signal.Signals) -> tuple[int, float, str]:
    """One run: signal ``role`` once it is running; (exit status, seconds, last line)."""
    args = ["--cpus", "2", "--runtime", "8", "-q", "-v"]
    if role == "device":
        args += ["--driver", "nvme"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mqrt", "bench", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if ": running" in line:
            break
    target = _target(proc.pid, role)
    assert target is not None, lines
    t = time.monotonic()
    target.send_signal(sig)
    if role == "owner" and sig == signal.SIGSTOP:
        while target.status() != psutil.STATUS_STOPPED:
            time.sleep(0.001)
        target.send_signal(signal.SIGCONT)
    lines += proc.stderr.readlines()
    code = proc.wait()
    took = time.monotonic() - t
    proc.stderr.close()
    last = [ln.strip() for ln in lines if ln.strip()][-1]
    return code, took, last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--roles", default="owner,cpu,device,guardian")
    args = ap.parse_args(argv)
    print("| process | signal | exit | signal → exit (median) | what mqrt says |")
    print("|---|---|---|---|---|")
    for role in args.roles.split(","):
        for sig in SIGNALS:
            runs = [one(role, sig) for _ in range(args.repeat)]
            codes = sorted({c for c, _, _ in runs})
            took = statistics.median(t for _, t, _ in runs)
            last = runs[-1][2]
            if "pid " in last:  # pids differ from run to run
                head, _, tail = last.partition("pid ")
                last = head + "pid N" + tail[tail.find(")") :]
            ignored = codes == [0] and not (role == "owner" and sig == signal.SIGSTOP)
            when = "ignored: the run goes on" if ignored else f"{took:.2f} s"
            exits = ", ".join(map(str, codes))
            print(f"| {role} | {sig.name} | {exits} | {when} | `{last}` |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

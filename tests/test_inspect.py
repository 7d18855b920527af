"""``mqrt inspect``: a real run appears in the listing while it goes, with its owner,
command line and segment, and is gone once it ended."""

from __future__ import annotations

import json
import subprocess
import sys

from mqrt.inspect.main import list_runs
from tests.helpers import wait_for_work
from tests.test_cli import mqrt


def test_a_running_run_is_listed_and_gone_once_it_ended():
    bench = subprocess.Popen(
        [sys.executable, "-m", "mqrt", "bench", "--cpus", "1", "--runtime", "30", "--quiet"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert wait_for_work(bench.pid, 0.2), "the run never started its I/O"
        (mine,) = [r for r in list_runs() if r.owner_pid == bench.pid]
        assert mine.state == "running" and mine.segment.startswith(f"mqrt-{bench.pid}-")
        assert "bench" in mine.cmdline and "--runtime 30" in mine.cmdline
        assert mine.size_bytes > 0 and mine.age_s is not None and mine.age_s >= 0
        out = mqrt("inspect", "--json")
        assert out.returncode == 0, out.stderr
        listed = {r["segment"]: r for r in json.loads(out.stdout)}
        assert listed[mine.segment]["owner_pid"] == bench.pid
        text = mqrt("inspect")
        assert text.returncode == 0 and mine.segment in text.stdout and "running" in text.stdout
    finally:
        bench.send_signal(2)  # Ctrl-C: the run stops, reports and removes its segment
        _, err = bench.communicate(timeout=120)
    assert bench.returncode == 130, err
    # the owner unlinks its segment before it exits
    assert not any(r.owner_pid == bench.pid for r in list_runs())

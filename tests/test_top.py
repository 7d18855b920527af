"""``mqrt top``: on a real run, as a snapshot (``--once``, ``--json``) and in a real
terminal (tmux: started, its screen read, a view switched, ``q``), never disturbing
the run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mqrt.inspect.top import Frame, Keys, Table, _cpulist
from tests.helpers import wait_for_work, wait_until
from tests.test_cli import mqrt

ROOT = Path(__file__).resolve().parent.parent


def _bench(*extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mqrt", "bench", "--quiet", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _stop(bench: subprocess.Popen) -> None:
    bench.send_signal(2)  # Ctrl-C: the run stops, reports and removes its segment
    _, err = bench.communicate(timeout=120)
    assert bench.returncode == 130, err


def test_keys_sort_and_switch_views():
    cpus = Table("cpus", ["cpu", "IOPS"], [[0, 5.0], [1, 1.0], [2, 9.0]], sortable=(0, 1))
    frame = Frame({}, {"cpus": [cpus], "hctxs": [], "tags": [], "devices": []})
    k = Keys()
    assert k.press("h", frame) and k.view == "hctxs"
    assert k.press("l", frame) and k.view == "cpus" and k.sort["cpus"] == (1, False)
    assert k.press("i", frame) and k.sort["cpus"] == (1, True)
    assert k.press("r", frame) and k.sort["cpus"] == (1, False)
    assert k.press("s", frame) and k.sort["cpus"] == (0, True)  # wraps to the first
    assert k.press("x", frame) and k.view == "cpus"  # unknown keys are ignored
    assert not k.press("q", frame)
    assert _cpulist([0, 1, 2, 3, 6, 8, 9]) == "0-3,6,8-9" and _cpulist([]) == "-"


def test_a_narrow_terminal_drops_columns_from_the_right_keeping_the_sorted_one():
    from rich.console import Console

    from mqrt.inspect.top import renderable

    cols = ["cpu", "IOPS", *(f"counter{i}/s" for i in range(12)), "hb_ms"]
    rows = [[c, 1234.5 * c, *range(12), 7] for c in range(3)]
    header = {"run": "r", "phase": "running", "elapsed_s": 1.0, "remaining_s": None,
              "iops": 1.0, "cpus": 3, "driver": "d", "devices": "nullb0",
              "slowest_cpu": None, "slowest_cpu_iops": None}  # fmt: skip
    table = Table("cpus", cols, rows, sortable=tuple(range(len(cols))))
    frame = Frame(header, {"cpus": [table]})

    def screen(keys: Keys, width: int | None) -> list[str]:
        console = Console(width=200 if width is None else width, color_system=None)
        with console.capture() as out:
            console.print(renderable(frame, keys, ["cpus"], 1.0, False, width))
        return out.get().splitlines()

    wide = screen(Keys(), None)
    assert not any("not shown" in line for line in wide)
    assert any("counter11/s" in line and "hb_ms" in line for line in wide)
    keys = Keys(sort={"cpus": (12, True)})  # sorted by counter10/s
    narrow = screen(keys, 80)
    assert all(len(line) <= 80 for line in narrow), narrow
    head = next(line for line in narrow if line.lstrip().startswith("cpu "))
    assert "IOPS" in head and "counter10/sv" in head and "hb_ms" not in head
    assert "counter11/s" not in head and "…" not in "".join(narrow)
    caption = " ".join(narrow[narrow.index(next(x for x in narrow if "not shown" in x)) :])
    assert "counter11/s" in caption and "hb_ms" in caption and "counter10/s," not in caption


def test_bad_options_are_one_line_errors():
    out = mqrt("top", "1", "--interval", "0")
    assert out.returncode == 2 and "--interval: SECONDS must be in 0.1..3600, got 0" in out.stderr
    out = mqrt("top", "1", "--view", "cpus,disks")
    assert out.returncode == 2 and "--view: 'disks' is none of" in out.stderr
    assert len(out.stderr.splitlines()) == 1


def test_top_once_on_a_real_run():
    """Snapshots of a real run: its CPUs complete I/O, its one hctx serves both CPUs
    and holds tags of its map, and the device's diskstats move."""
    bench = _bench("--cpus", "2", "--runtime", "60")
    try:
        assert wait_for_work(bench.pid, 0.3, procs=2), "the run never started its I/O"
        out = mqrt("top", str(bench.pid), "--once", "--json", "--interval", "0.5")
        assert out.returncode == 0, out.stderr
        snap = json.loads(out.stdout)
        h = snap["header"]
        assert h["phase"] == "running" and h["cpus"] == 2 and h["driver"] == "NullbOps"
        assert h["run"].startswith(f"mqrt-{bench.pid}-") and h["remaining_s"] > 0
        cpus = snap["cpus"]["cpus"]
        assert [c["cpu"] for c in cpus] == [0, 1]
        assert all(c["IOPS"] > 0 and c["subm/s"] > 0 for c in cpus), cpus
        assert h["iops"] == pytest.approx(sum(c["IOPS"] for c in cpus), rel=1e-3, abs=0.2)
        assert all(0 <= c["hb_ms"] < 5_000 for c in cpus)
        (hctx,) = snap["hctxs"]["hctxs"]
        assert hctx["dev"] == "nullb0" and hctx["cpus"] == "0-1" and hctx["depth"] == 64
        assert hctx["queued/s"] > 0 and 0 <= hctx["tags"] <= 64
        (tags,) = snap["tags"]["tags"]
        assert tags["map"] == "nullb0.tag_set/tags0" and tags["depth"] == 64
        assert len(tags["ws"]) == 8 and set(tags["ws"]) <= {".", "A"}
        (io,) = snap["devices"]["iostat"]
        assert io["device"] == "nullb0" and io["r/s"] > 0 and io["w/s"] == 0
        assert io["rkB/s"] == pytest.approx(io["r/s"] * 4, rel=1e-6)  # bs 4k
        assert io["r_await"] is not None and io["r_await"] > 0
        locks = {row["class"]: row for row in snap["locks"]["locks"]}
        # every I/O took a driver tag: its word's acquisitions run at the run's IOPS
        assert locks["tags.bitmap"]["acq/s"] > 0 and locks["tags.bitmap"]["con%"] < 100
        assert all(r["con/s"] >= 0 and r["wait_us/s"] >= 0 for r in locks.values())
        text = mqrt("top", str(bench.pid), "--once", "--interval", "0.3", "--view", "c,h")
        assert text.returncode == 0, text.stderr
        assert f"mqrt top - mqrt-{bench.pid}-" in text.stdout and "phase running" in text.stdout
        for name in ("IOPS", "twait/s", "hb_ms", "queued/s", "ws_active"):
            assert name in text.stdout
        assert "iostat" not in text.stdout  # only the views asked for
        assert bench.poll() is None  # untouched
    finally:
        _stop(bench)


def test_top_follows_a_run_to_its_end():
    """Not on a terminal it prints a snapshot each interval until the run ends, then
    says so and exits 0; the run ends as it would have."""
    bench = _bench("--cpus", "1", "--runtime", "12")
    try:
        assert wait_for_work(bench.pid, 0.1), "the run never started its I/O"
        out = subprocess.run(
            [sys.executable, "-m", "mqrt", "top", str(bench.pid), "--interval", "0.5",
             "--view", "cpus"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        _, err = bench.communicate(timeout=120)
    assert bench.returncode == 0, err
    assert out.returncode == 0, out.stderr
    assert out.stderr == f"mqrt top: run {_segment(out.stdout)} ended\n"
    assert out.stdout.count("mqrt top - ") >= 1 and "phase ended" in out.stdout


def _segment(text: str) -> str:
    m = re.search(r"mqrt top - (mqrt-\S+)", text)
    assert m, text
    return m.group(1)


def _tmux(sock: str, *args: str) -> subprocess.CompletedProcess:
    # the terminal's own size, not the test runner's COLUMNS and LINES (rich obeys them)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run(
        ["tmux", "-L", sock, *args], capture_output=True, text=True, timeout=30, check=False,
        env=env,
    )  # fmt: skip


@pytest.mark.timing
def test_top_in_a_real_terminal(tmp_path):
    """tmux is the terminal: the screen shows the header and the CPUs, ``h`` switches
    to the hctxs, ``t`` to the tags, ``q`` quits with status 0 and the terminal
    restored, and the run goes on untouched to its end."""
    assert shutil.which("tmux"), "tmux is needed (.ci/run installs it)"
    bench = _bench("--cpus", "2", "--runtime", "60")
    sock = f"mqrt-test-{os.getpid()}"
    rc = tmp_path / "rc"
    try:
        assert wait_for_work(bench.pid, 0.3, procs=2), "the run never started its I/O"
        stty, err = tmp_path / "stty", tmp_path / "err"
        cmd = (
            f"{sys.executable} -m mqrt top {bench.pid} --interval 0.5 2> {err}; s=$?; "
            f"stty -a > {stty}; echo $s > {rc}"
        )
        got = _tmux(sock, "-f", "/dev/null", "new-session", "-d", "-s", "top", "-x", "160", "-y",
                    "48", "-c", str(ROOT), cmd)  # fmt: skip
        assert got.returncode == 0, got.stderr
        # a detached session's size: some tmux versions keep their default (80x24)
        got = _tmux(sock, "resize-window", "-t", "top", "-x", "160", "-y", "48")
        assert got.returncode == 0, got.stderr
        screen = ""

        def shows(*patterns: str) -> bool:
            nonlocal screen
            got = _tmux(sock, "capture-pane", "-p", "-t", "top")
            if got.returncode:  # the session ended: top's own words
                screen += got.stderr + (err.read_text() if err.exists() else "")
                return False
            screen = got.stdout
            return all(re.search(p, screen, re.M) for p in patterns)

        cpu_row = r"^\s*1\s+[\d.]+k?\s+[\d.]+k?\s+\d+"  # cpu 1: IOPS, subm/s, inflight
        assert wait_until(
            lambda: shows(rf"mqrt top - mqrt-{bench.pid}-", r"phase running", r"twait/s", cpu_row),
            60,
        ), screen
        _tmux(sock, "send-keys", "-t", "top", "h")
        assert wait_until(lambda: shows(r"^hctxs", r"queued/s", r"^\s*nullb0\s+0\s+0-1"), 30), (
            screen
        )
        assert "twait/s" not in screen
        _tmux(sock, "send-keys", "-t", "top", "t")
        assert wait_until(lambda: shows(r"^tags", r"wake_batch", r"nullb0\.tag_set/tags0"), 30), (
            screen
        )
        # an 80-column terminal: the CPU table drops columns from the right and says so
        got = _tmux(sock, "resize-window", "-t", "top", "-x", "80", "-y", "48")
        assert got.returncode == 0, got.stderr
        _tmux(sock, "send-keys", "-t", "top", "c")
        assert wait_until(lambda: shows(cpu_row, r"^not shown \(too narrow\): "), 30), screen
        head = next(line for line in screen.splitlines() if line.lstrip().startswith("cpu "))
        assert "inflight" in head and "hb_ms" not in head and "…" not in screen, screen
        _tmux(sock, "send-keys", "-t", "top", "q")
        assert wait_until(lambda: rc.exists() and rc.read_text().strip() != "", 30), (
            "top did not quit"
        )
        assert rc.read_text().strip() == "0"
        modes = stty.read_text().split()
        assert "icanon" in modes and "echo" in modes, modes  # cbreak undone
        assert wait_until(lambda: _tmux(sock, "has-session", "-t", "top").returncode != 0, 30), (
            "the session outlived its command"
        )
        assert bench.poll() is None  # the run goes on
    finally:
        _tmux(sock, "kill-server")
        _stop(bench)

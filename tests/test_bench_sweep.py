"""``mqrt bench`` sweeps, modes, job files and the default run, as a user runs them:
real CPUs, real reports, Ctrl-C in the middle."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from mqrt.bench.sweep import expand_values, median_index, split_axes
from mqrt.lib.knobs import KnobError
from mqrt.workers.ioengine import JOB_KNOBS
from tests.helpers import interrupt, wait_for_work
from tests.test_cli import mqrt

pytestmark = pytest.mark.timing

_KNOBS = {k.name: k for k in JOB_KNOBS}


@pytest.mark.parametrize(
    ("raw", "values"),
    [
        ("1,2,4", ["1", "2", "4"]),
        ("1-4", ["1", "2", "3", "4"]),
        ("1-16:x2", ["1", "2", "4", "8", "16"]),
        ("0-100:25", ["0", "25", "50", "75", "100"]),
        ("32", ["32"]),
    ],
)
def test_value_lists_and_ranges(raw, values):
    assert expand_values(_KNOBS["iodepth"], raw) == values


def test_only_numeric_and_choice_options_become_axes():
    base, axes = split_axes({"iodepth": "1,8", "rw": "read,randread", "percentile_list": "50:99"},
                            _KNOBS)  # fmt: skip
    assert axes == {"iodepth": ["1", "8"], "rw": ["read", "randread"]}
    assert base == {"percentile_list": "50:99"}
    with pytest.raises(KnobError, match="iodepth: bad range '4-1'"):
        split_axes({"iodepth": "4-1"}, _KNOBS)
    assert median_index([5.0, 1.0, 3.0]) == 2 and median_index([4.0, 1.0]) == 1


def test_a_sweep_end_to_end(tmp_path):
    png = tmp_path / "scaling.png"
    out = mqrt(
        "bench", "--cpus", "1,2", "--mode", "mq,sq", "--runtime", "0.25", "--repeat", "2",
        "--irqmode", "none", "--output-format", "json", "--plot", str(png), "-q",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    m = report["mqrt"]
    assert m["sweep"]["axes"] == {"cpus": [1, 2], "mode": ["mq", "sq"]}
    assert m["sweep"]["points"] == m["sweep"]["points_done"] == 4 and m["sweep"]["repeat"] == 2
    assert [p["params"] for p in m["points"]] == [
        {"cpus": c, "mode": mode} for c in (1, 2) for mode in ("mq", "sq")
    ]
    for i, p in enumerate(m["points"]):
        assert len(p["iops_runs"]) == 2 and p["iops"] in p["iops_runs"]
        job = report["jobs"][p["job_index"]]
        assert job["jobname"] == f"nullb0 cpus={p['params']['cpus']} mode={p['params']['mode']}"
        assert job["read"]["iops"] == p["iops"]  # the median run's job
        assert len(p["run"]["cpus"]) == p["params"]["cpus"]
        assert p["run"]["config"]["run"]["mode"] == p["params"]["mode"]
        assert i == 0 or p["job_index"] > m["points"][i - 1]["job_index"]
    assert m["invariants"] == {"violations": 0, "runs": 8}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sweep_table_and_the_paper_ratio_in_text():
    out = mqrt("bench", "--cpus", "2", "--mode", "mq,sq", "--runtime", "0.2", "--irqmode", "none")
    assert out.returncode == 0, out.stderr
    assert "mode" in out.stdout and "IOPS" in out.stdout
    assert "mqrt: mq/sq " in out.stdout and "overhead" in out.stdout


def test_a_bad_point_is_named_before_anything_runs():
    out = mqrt("bench", "--cpus", "1,0", "--runtime", "0.1")
    assert out.returncode == 2
    assert "cpus: must be 1..1024, got '0' (at cpus=0)" in out.stderr
    assert "Traceback" not in out.stderr


def test_job_file_groups_run_in_turn(tmp_path):
    jobs = tmp_path / "two.fio"
    jobs.write_text(
        "[global]\nrw=randread\nruntime=0.2\nirqmode=none\nioengine=libaio\n\n"
        "[shallow]\niodepth=2\n\n[deep]\nstonewall\niodepth=16\ncpus=1,2\n"
    )
    out = mqrt("bench", str(jobs), "--output-format", "json", "-q")
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)["mqrt"]
    assert [p["params"] for p in m["points"]] == [
        {"job": "shallow"},
        {"job": "deep", "cpus": 1},
        {"job": "deep", "cpus": 2},
    ]
    assert [p["run"]["config"]["job"]["iodepth"] for p in m["points"]] == [2, 16, 16]


def test_job_file_errors_name_the_line(tmp_path):
    jobs = tmp_path / "bad.fio"
    jobs.write_text("[global]\nruntime=0.1\n[j]\niodepth=4\nverify=md5\n")
    out = mqrt("bench", str(jobs))
    assert out.returncode == 2
    assert f"{jobs}:5: verify: data verification needs a data-backed device" in out.stderr
    jobs.write_text("[j]\niodepth=0\n")
    out = mqrt("bench", str(jobs))
    assert out.returncode == 2 and f"{jobs}:2: iodepth: must be 1..65536" in out.stderr


def test_the_default_bench_is_a_small_mq_versus_sq_sweep():
    out = mqrt("bench", "--repeat", "1")
    assert out.returncode == 0, out.stderr
    assert "mq/sq" in out.stdout and "default sweep" in out.stdout and "--plot" in out.stdout


def test_ctrl_c_mid_sweep_reports_the_points_so_far():
    code = "import sys\nfrom mqrt.cli import main\nsys.exit(main(sys.argv[1:]))"
    p = subprocess.Popen(
        [sys.executable, "-c", code, "bench", "--cpus", "1,2", "--runtime", "4",
         "--irqmode", "none", "--output-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # into the second point: its two CPUs are doing I/O (the first point has one)
    out, err = interrupt(p, lambda: wait_for_work(p.pid, 0.2, procs=2))
    assert p.returncode == 130, err
    m = json.loads(out)["mqrt"]
    assert m["interrupted"] and m["sweep"]["points_done"] < m["sweep"]["points"] == 2
    assert m["points"] and m["invariants"]["violations"] == 0


def test_the_status_line_names_the_run_and_the_eta(monkeypatch, capsys):
    from mqrt.bench.text import Progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    p = Progress(True, total_runs=4, run_s=2.0)
    p.t0 -= 5  # the command has been running for a while
    p.start_run("cpus=2 mode=sq")
    p({"completed": 0, "inflight": 3, "remaining_s": 1.0})
    p.last = (p.last[0] - 1.0, 0)  # one second later, 250k I/Os done
    p({"completed": 250_000, "inflight": 3, "remaining_s": 0.5})
    p.done()
    err = capsys.readouterr().err
    assert "run 1/4 [cpus=2 mode=sq]" in err and "250k IOPS" in err
    assert "eta 6s" in err  # 0.5 s of this run + 3 more runs of 2 s
    quiet = Progress(True, total_runs=1, run_s=1.0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not Progress(True, total_runs=1, run_s=1.0).enabled and quiet.enabled


def test_a_run_is_named_on_a_terminal_or_with_v(monkeypatch, capsys):
    from mqrt.bench.text import Progress

    line = "run mqrt-1-2-3: owner pid 1, 2 CPUs"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    Progress(True, total_runs=1, run_s=1.0).announce(line)
    Progress(False, total_runs=1, run_s=1.0).announce(line)  # --quiet
    assert capsys.readouterr().err == f"mqrt: {line}\n"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    Progress(True, total_runs=1, run_s=1.0).announce(line)  # piped
    assert capsys.readouterr().err == ""
    Progress(True, total_runs=1, run_s=1.0, verbose=True).announce(line)
    assert capsys.readouterr().err == f"mqrt: {line}\n"


def test_bench_v_names_its_segment_while_it_exists():
    out = mqrt("bench", "--cpus", "1", "--runtime", "0.3", "-v")
    assert out.returncode == 0, out.stderr
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("mqrt: run mqrt-")]
    # the segment's name carries its owner's pid (mqrt-<pid>-<start time>-<random>)
    m = re.fullmatch(r"mqrt: run (mqrt-(\d+)-\d+-[0-9a-f]{8}): owner pid (\d+), 1 CPUs", line)
    assert m is not None and m.group(2) == m.group(3), line

"""``mqrt compare`` and ``mqrt plot`` on hand-built reports that follow the
``mqrt.bench/2`` sweep contract (no bench run: these test the reading side)."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from mqrt.cli import main

P99 = "99.000000"


def point(runs: Sequence[float], bs: int = 4096, p99: int = 20_000, **params: Any) -> dict:
    """One sweep point: median of ``runs``, bandwidth = IOPS x bs, a few percentiles."""
    med = statistics.median(runs)
    return {
        "params": params,
        "iops": med,
        "iops_runs": list(runs),
        "bw_bytes": med * bs,
        "lat_ns": {
            "mean": p99 / 3,
            "percentile": {
                "1.000000": p99 // 10,
                "50.000000": p99 // 3,
                "90.000000": p99 // 2,
                P99: p99,
                "99.900000": p99 * 2,
                "99.990000": p99 * 5,
            },
        },
        "cpu_us_per_io": 8.8,
        "job_index": 0,
    }


def report(
    points: list[dict],
    axes: dict[str, list[Any]] | None = None,
    repeat: int = 3,
    schema: str = "mqrt.bench/2",
    config: dict[str, Any] | None = None,
) -> dict:
    if axes is None:
        axes = {}
        for p in points:
            for k, v in p["params"].items():
                axes.setdefault(k, [])
                if v not in axes[k]:
                    axes[k].append(v)
    return {
        "fio version": "mqrt-0.1.0",
        "timestamp": 1700000000,
        "jobs": [{"jobname": "nullb0"}],
        "mqrt": {
            "schema": schema,
            "config": config
            if config is not None
            else {"job": {"rw": "randread", "bs": 4096, "iodepth": 32}, "run": {"driver": "nullb"}},
            "sweep": {"axes": axes, "repeat": repeat},
            "points": points,
        },
    }


def fio_report(*jobs: tuple[str, float, float, int]) -> dict:
    """Real fio's shape: (jobname, read iops, write iops, read clat p99 ns) per job."""
    return {
        "fio version": "fio-3.36",
        "timestamp": 1700000000,
        "global options": {"ioengine": "io_uring", "bs": "4k"},
        "jobs": [
            {
                "jobname": name,
                "read": {
                    "iops": r,
                    "bw_bytes": int(r * 4096),
                    "total_ios": int(r * 10),
                    "clat_ns": {"percentile": {P99: p99, "50.000000": p99 // 4}},
                    "lat_ns": {"mean": 1.0},
                },
                "write": {"iops": w, "bw_bytes": int(w * 4096), "total_ios": int(w * 10)},
            }
            for name, r, w, p99 in jobs
        ],
    }


def write(tmp_path: Path, name: str, data: Any) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def run_json(capsys, *args: str) -> list[dict]:
    assert main(["compare", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def usage_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mqrt: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def sweep_ab(tmp_path):
    a = report(
        [
            point([100.0, 110.0, 120.0], mode="mq", cpus=1),
            point([200.0, 210.0, 220.0], mode="mq", cpus=2),
            point([50.0, 55.0, 60.0], mode="sq", cpus=1),
            point([90.0, 95.0], mode="sq", cpus=4),  # only in A
        ]
    )
    b = report(
        [
            point([115.0, 125.0, 130.0], mode="mq", cpus="1"),  # overlaps A: ~
            point([250.0, 260.0, 300.0], p99=10_000, mode="mq", cpus=2),  # disjoint, higher
            point([40.0, 44.0, 45.0], mode="sq", cpus=1),  # disjoint, lower
            point([1.0, 2.0, 3.0], mode="raw", cpus=1),  # only in B
        ]
    )
    return write(tmp_path, "a.json", a), write(tmp_path, "b.json", b)


# -- compare -------------------------------------------------------------------------------


def test_compare_matches_points_and_computes_ratios(capsys, sweep_ab):
    rows = run_json(capsys, *sweep_ab)
    assert [(r["params"], r["status"]) for r in rows] == [
        ({"mode": "mq", "cpus": 1}, "both"),
        ({"mode": "mq", "cpus": 2}, "both"),
        ({"mode": "sq", "cpus": 1}, "both"),
        ({"mode": "sq", "cpus": 4}, "only_a"),
        ({"mode": "raw", "cpus": 1}, "only_b"),
    ]
    mq1, mq2, sq1, only_a, only_b = rows
    # 1 and "1" match; medians and B/A exactly
    assert (mq1["a"], mq1["b"], mq1["ratio"]) == (110.0, 125.0, 125.0 / 110.0)
    assert (mq2["a"], mq2["b"], mq2["ratio"]) == (210.0, 260.0, 260.0 / 210.0)
    assert (sq1["a"], sq1["b"], sq1["ratio"]) == (55.0, 44.0, 0.8)
    assert mq1["a_runs"] == [100.0, 110.0, 120.0] and mq1["metric"] == "iops"
    assert only_a["b"] is None and only_a["ratio"] is None and only_a["a"] == 92.5
    assert only_b["a"] is None and only_b["b"] == 2.0


def test_compare_significance_both_ways(capsys, sweep_ab):
    mq1, mq2, sq1, *_ = run_json(capsys, *sweep_ab)
    assert (mq1["significant"], mq1["note"]) == (False, "~ within spread")
    assert (mq2["significant"], mq2["note"]) == (True, "B better: ranges disjoint")
    assert (sq1["significant"], sq1["note"]) == (True, "B worse: ranges disjoint")


def test_compare_table(capsys, sweep_ab):
    assert main(["compare", *sweep_ab]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()

    def line(*words: str) -> str:
        (found,) = [ln for ln in lines if all(w in ln.split() for w in words)]
        return found

    assert "metric: IOPS" in out and "a.json" in out and "b.json" in out
    assert "1.136" in line("mq", "1") and "~ within spread" in line("mq", "1")
    assert "110 [100..120]" in line("mq", "1") and "125 [115..130]" in line("mq", "1")
    assert "1.238" in line("mq", "2") and "B better" in line("mq", "2")
    assert "0.800" in line("sq", "1") and "B worse" in line("sq", "1")
    assert "only in A" in line("sq", "4")
    assert "only in B" in line("raw", "1")


def test_compare_bw_and_p99(capsys, sweep_ab):
    mq1, mq2, *_ = run_json(capsys, *sweep_ab, "--metric", "bw")
    assert mq1["a"] == 110.0 * 4096 and mq1["ratio"] == pytest.approx(125.0 / 110.0)
    assert mq1["a_runs"] == pytest.approx([100.0 * 4096, 110.0 * 4096, 120.0 * 4096])
    assert mq2["note"] == "B better: ranges disjoint"
    mq1, mq2, *_ = run_json(capsys, *sweep_ab, "--metric", "p99")
    assert (mq1["a"], mq1["b"], mq1["ratio"]) == (20_000.0, 20_000.0, 1.0)
    assert mq2["ratio"] == 0.5
    # the report keeps the percentiles of the median run only: no spread to judge by
    assert mq2["significant"] is None and mq2["note"].startswith("no spread")
    assert main(["compare", *sweep_ab, "--metric", "p99"]) == 0
    assert "20.0us" in capsys.readouterr().out


def test_compare_single_runs_have_no_spread(capsys, tmp_path):
    a = write(tmp_path, "a.json", report([point([100.0])], repeat=1))
    b = write(tmp_path, "b.json", report([point([300.0, 310.0, 320.0])], repeat=3))
    (row,) = run_json(capsys, a, b)
    assert row["params"] == {} and row["ratio"] == 3.1
    assert (row["significant"], row["note"]) == (None, "1 run: no spread")
    assert main(["compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "(single point)" in out and "1 run: no spread" in out and "3.100" in out


def test_compare_notes_configuration_differences(capsys, tmp_path):
    cfg = {"job": {"rw": "randread", "bs": 4096}, "run": {"driver": "nullb", "cpus": 1}}
    a = write(tmp_path, "a.json", report([point([1.0, 2.0], cpus=1)], config=cfg))
    cfg_b = {"job": {"rw": "randread", "bs": 8192}, "run": {"driver": "nullb", "cpus": 4}}
    b = write(tmp_path, "b.json", report([point([1.0, 2.0], cpus=1)], config=cfg_b))
    assert main(["compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "configuration differs: job.bs: 4096 vs 8192" in out
    assert "run.cpus" not in out  # a swept axis


def test_compare_plain_fio_json(capsys, tmp_path):
    a = write(tmp_path, "a.json", fio_report(("seq", 1000.0, 0.0, 8000), ("rand", 400.0, 100.0, 0)))
    # fio may print notes before the JSON object
    b_text = "note: both iodepth >= 1 and synchronous I/O engine\n" + json.dumps(
        fio_report(("rand", 600.0, 150.0, 0), ("seq", 1500.0, 0.0, 4000))
    )
    b = write(tmp_path, "b.json", b_text)
    seq, rand = run_json(capsys, a, b)
    assert seq["params"] == {"jobname": "seq"} and (seq["a"], seq["b"]) == (1000.0, 1500.0)
    assert rand["a"] == 500.0 and rand["ratio"] == 1.5
    assert rand["note"] == "1 run: no spread"
    seq, _ = run_json(capsys, a, b, "--metric", "p99")  # clat percentiles: fio's default
    assert seq["ratio"] == 0.5
    # an mqrt report against fio: the fio job name is no sweep point of mqrt's
    m = write(tmp_path, "m.json", report([point([1.0], mode="mq")]))
    err = usage_error(capsys, "compare", m, a)
    assert f"{a}: no point in common with {m}" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "{b}: no such file"),
        ("{not json", "{b}: not JSON (Expecting property name"),
        ("[1, 2]", "{b}: not an mqrt bench report (the JSON is not an object)"),
        ('{"hello": 1}', "{b}: not an mqrt bench report (no 'mqrt' object) nor fio JSON"),
        (
            {"jobs": [], "mqrt": {"schema": "mqrt.bench/1", "config": {}}},
            "{b}: schema mqrt.bench/1 is too old (no sweep points); need mqrt.bench/2 or later",
        ),
        (
            {"mqrt": {"schema": "mqrt.microbench/1"}},
            "{b}: not an mqrt bench report (schema 'mqrt.microbench/1')",
        ),
        (report([]), "{b}: the report has no points"),
        (report([{"params": {"x": 1}, "iops": "fast"}]), "{b}: point 0 (x=1) iops is not a"),
        (report([point([1.0], mode="other")]), "{b}: no point in common with {a} (A: mode=mq"),
    ],
)
def test_compare_errors_are_one_line_naming_the_file(capsys, tmp_path, content, message):
    a = write(tmp_path, "a.json", report([point([1.0, 2.0], mode="mq")]))
    b = str(tmp_path / "b.json") if content is None else write(tmp_path, "b.json", content)
    err = usage_error(capsys, "compare", a, b)
    assert message.format(a=a, b=b) in err


def test_compare_p99_missing_is_an_error(capsys, tmp_path):
    a = write(tmp_path, "a.json", report([point([1.0, 2.0])]))
    no_pct = point([1.0, 2.0])
    no_pct["lat_ns"] = {"mean": 1.0}
    b = write(tmp_path, "b.json", report([no_pct]))
    err = usage_error(capsys, "compare", a, b, "--metric", "p99")
    assert f"{b}: --metric p99: the report has no 99th percentile latency" in err


def test_newer_schema_is_accepted(capsys, tmp_path):
    a = write(tmp_path, "a.json", report([point([2.0])], schema="mqrt.bench/3"))
    (row,) = run_json(capsys, a, a)
    assert row["ratio"] == 1.0


# -- plot ----------------------------------------------------------------------------------


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1024


@pytest.mark.parametrize(
    "points",
    [
        pytest.param(
            [
                point([100.0 * c, 110.0 * c, 125.0 * c], p99=5000 * c, mode=m, cpus=c)
                for m in ("mq", "sq", "raw")
                for c in (1, 2, 4)
            ],
            id="cpus-by-mode",
        ),
        pytest.param([point([100.0, 120.0], iodepth=d) for d in (1, 8, 32)], id="numeric-axis"),
        pytest.param([point([100.0], mode=m) for m in ("mq", "sq")], id="bars"),
        pytest.param([point([100.0, 120.0])], id="single-point"),
    ],
)
def test_plot_writes_a_png(capsys, tmp_path, points):
    pytest.importorskip("matplotlib")
    src = write(tmp_path, "r.json", report(points))
    out = tmp_path / "out.png"
    assert main(["plot", src, "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    _assert_png(out)


def test_plot_report_api_and_default_output(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    from mqrt.compare import bench_from_report
    from mqrt.plot import plot_report, x_axis

    r = report([point([1.0, 2.0], mode="mq", cpus=c) for c in (1, 2)])
    assert x_axis(bench_from_report(r, "r")) == "cpus"
    plot_report(r, str(tmp_path / "api.png"))
    _assert_png(tmp_path / "api.png")
    src = write(tmp_path, "fio.json", fio_report(("a", 10.0, 0.0, 1000), ("b", 20.0, 5.0, 900)))
    assert main(["plot", src]) == 0
    _assert_png(tmp_path / "fio.png")
    capsys.readouterr()
    err = usage_error(capsys, "plot", src, "-o", str(tmp_path / "no" / "dir.png"))
    assert f"{tmp_path / 'no' / 'dir.png'}: cannot write" in err


def test_plot_without_matplotlib(capsys, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    src = write(tmp_path, "r.json", report([point([1.0])]))
    err = usage_error(capsys, "plot", src, "-o", str(tmp_path / "out.png"))
    assert "mqrt: error: --plot needs matplotlib: pip install 'mqrt[plot]'" in err
    assert not (tmp_path / "out.png").exists()


def test_plot_rejects_a_bad_report(capsys, tmp_path):
    src = write(tmp_path, "r.json", {"mqrt": {"schema": "mqrt.bench/1"}})
    err = usage_error(capsys, "plot", src)
    assert f"{src}: schema mqrt.bench/1 is too old" in err

"""`mqrt bench --output-format json` read by a real consumer of fio's JSON: fio-plot.

fio-plot (PyPI ``fio-plot``) draws charts from directories of fio JSON files.  Its
``fio-plot`` command gathers them with ``getdata.get_json_data``: ``jsonimport``
selects the files whose ``job options`` (merged with ``global options``) carry ``rw``,
``iodepth`` and ``numjobs`` matching the request, and ``jsonparsing`` flattens each
job into a row (IOPS, bandwidth, ``lat_ns`` mean and stddev, ``iops_stddev``, CPU,
the ``latency_ns/us/ms`` histogram buckets).  We call those functions in-process on
the files a real bench wrote, laid out as fio-plot's own ``bench-fio`` lays them out
(``<device>/<bs>/<rw>-<iodepth>-<numjobs>.json``), and check that what fio-plot
extracts is what our JSON says.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fio_plot.fiolib.jsonparsing", reason="fio-plot is in the test extra")

from fio_plot.fiolib import (
    barhistogram,
    defaultsettings,
    getdata,
    jsonimport,
)

IODEPTH = 32


def run_bench(rw: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "mqrt", "bench", "--runtime", "0.3", "--cpus", "1"]
    cmd += ["--rw", rw, "--iodepth", str(IODEPTH), "--bs", "4k"]
    cmd += ["--output-format", "json", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


@pytest.fixture(scope="module", params=["randread", "randwrite"])
def bench(request, tmp_path_factory):
    """One real run, written where bench-fio would write it; returns (dir, rw, report)."""
    rw = request.param
    root = tmp_path_factory.mktemp(f"fioplot-{rw}")
    bsdir = root / "nullb0" / "4k"
    bsdir.mkdir(parents=True)
    report = run_bench(rw, bsdir / f"{rw}-{IODEPTH}-1.json")
    return bsdir, rw, report


def fio_plot_settings(directory: Path, rw: str) -> dict:
    settings = defaultsettings.get_default_settings()
    settings.update(
        input_directory=[str(directory)],
        rw=rw,
        iodepth=[IODEPTH],
        numjobs=[1],
        compare_graph=False,
    )
    return settings


def test_fio_plot_selects_our_file_as_written(bench):
    directory, rw, _ = bench
    found = jsonimport.list_json_files(fio_plot_settings(directory, rw), fail=False)
    assert [Path(f).name for f in found[0]["files"]] == [f"{rw}-{IODEPTH}-1.json"]


def test_fio_plot_reads_our_numbers(bench, tmp_path):
    directory, rw, report = bench
    settings = fio_plot_settings(directory, rw)
    assert jsonimport.validate_json_file(settings, report)
    dataset = getdata.get_json_data(settings)  # what `fio-plot -i DIR -r RW ...` calls

    assert len(dataset) == 1 and len(dataset[0]["data"]) == 1
    row = dataset[0]["data"][0]
    jobs = report["jobs"]
    ddir = "read" if rw == "randread" else "write"
    assert row["type"] == ddir
    assert row["rw"] == rw
    assert int(row["iodepth"]) == IODEPTH and int(row["numjobs"]) == 1
    assert row["bs"] in {"4096", "4k"}
    assert row["fio_version"] == report["fio version"]
    assert row["iops"] == pytest.approx(sum(j[ddir]["iops"] for j in jobs))
    assert row["iops"] > 0
    assert row["bw"] == sum(j[ddir]["bw"] for j in jobs)
    assert row["lat"] == pytest.approx(jobs[0][ddir]["lat_ns"]["mean"])
    assert row["lat"] > 0
    assert row["lat_stddev"] == pytest.approx(jobs[0][ddir]["lat_ns"]["stddev"])
    assert row["iops_stddev"] == pytest.approx(jobs[0][ddir]["iops_stddev"])
    assert row["cpu_usr"] == pytest.approx(jobs[0]["usr_cpu"])
    assert row["cpu_sys"] == pytest.approx(jobs[0]["sys_cpu"])
    for unit in ("ns", "us", "ms"):
        buckets = row[f"latency_{unit}"]
        assert buckets == [j[f"latency_{unit}"] for j in jobs]
        # fio-plot's latency histogram sorts the bucket keys (">=2000" last).
        ordered = barhistogram.sort_latency_data(buckets[0])
        assert ordered["values"] == [buckets[0][k] for k in ordered["keys"]]
    # Every I/O lands in some bucket: the three histograms add up to ~100 %.
    total = sum(sum(row[f"latency_{u}"][0].values()) for u in ("ns", "us", "ms"))
    assert total == pytest.approx(100.0, abs=0.5)


def test_fio_plot_reads_our_logs(tmp_path):
    """fio-plot's 2D log graphs (``fio-plot -g``) read the logs bench-fio has fio write
    (``<rw>-iodepth-<d>-numjobs-<n>_<type>.<job>.log``), merging the jobs' files: IOPS
    and bandwidth summed, latencies averaged, window by window."""
    stem = f"randread-iodepth-{IODEPTH}-numjobs-2"
    cmd = [sys.executable, "-m", "mqrt", "bench", "--runtime", "0.5", "--cpus", "2", "-q"]
    cmd += ["--iodepth", str(IODEPTH), "--log_avg_msec", "100", "--output-format", "json"]
    cmd += ["--write_iops_log", stem, "--write_bw_log", stem, "--write_lat_log", stem]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    settings = defaultsettings.get_default_settings()
    settings.update(
        input_directory=[str(tmp_path)], rw="randread", iodepth=[IODEPTH], numjobs=[2],
        type=["iops", "bw", "clat"],
    )  # fmt: skip
    merged = getdata.get_log_data(settings)
    by_type = {m["type"]: m["data"][0]["read"] for m in merged}
    assert set(by_type) == {"iops", "bw", "clat"}

    def ours(kind: str) -> list[list[int]]:
        return [
            [[int(x) for x in ln.split(",")] for ln in (tmp_path / f"{stem}_{kind}.{i}.log")
             .read_text().splitlines()]
            for i in (1, 2)
        ]  # fmt: skip

    for kind in ("iops", "bw"):
        a, b = ours(kind)
        want = [x[1] + y[1] for x, y in zip(a, b, strict=False)]
        assert [v for _, v in by_type[kind]] == want and sum(want) > 0
    a, b = ours("clat")
    got = [v for _, v in by_type["clat"]]
    assert got == pytest.approx([(x[1] + y[1]) / 2 for x, y in zip(a, b, strict=False)])

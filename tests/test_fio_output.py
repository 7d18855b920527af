"""What mqrt writes, read against the real fio 3.33: its text summary formatted as
fio formats the same figures, its JSON with every key fio writes, json+ bins that
fio's own ``fio_jsonplus_clat2csv`` turns into a CSV, and the latency, bandwidth and
IOPS logs fio's log readers take."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mqrt.bench.text import _lat_buckets, lat_line, num2str, sample_lines
from mqrt.block.blk_stat import format_percentiles_text

FIO = shutil.which("fio")
pytestmark = pytest.mark.skipif(FIO is None, reason="fio is not installed")


def split_output(text: str) -> tuple[dict[str, Any], str]:
    """fio's ``--output-format=normal,json``: the JSON object, and the rest."""
    start = text.index("\n{\n") + 1 if not text.startswith("{") else 0
    obj, end = json.JSONDecoder().raw_decode(text[start:])
    return obj, text[:start] + text[start + end :]


def run_fio(tmp: Path, *opts: str, fmt: str = "normal,json") -> tuple[dict[str, Any], str]:
    cmd = [FIO or "fio", "--name=x", "--ioengine=null", "--size=64M", "--rw=randread"]
    cmd += [*opts, f"--output-format={fmt}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=60, check=True)
    return split_output(proc.stdout)


def run_mqrt(tmp: Path, *opts: str, fmt: str = "json") -> str:
    cmd = [sys.executable, "-m", "mqrt", "bench", "--cpus", "1", "--runtime", "0.3", "-q"]
    cmd += ["--irqmode", "none", *opts, "--output-format", fmt]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- 1. the text summary ------------------------------------------------------------------------


@pytest.mark.parametrize("plist", ["", "1:50:99", "50:99.9:99.999:99.9999"])
def test_text_formats_figures_as_fio_does(tmp_path, plist):
    """fio's own figures (its JSON) formatted by mqrt are fio's own text: the
    slat/clat/lat lines, the percentile tables and the latency buckets."""
    opts = ["--runtime=1", "--time_based", "--lat_percentiles=1", "--number_ios=200000"]
    opts += [f"--percentile_list={plist}"] if plist else []
    obj, text = run_fio(tmp_path, *opts)
    job = obj["jobs"][0]
    d = job["read"]
    lines = text.splitlines()
    for name in ("clat", " lat"):
        want = lat_line(name, d[f"{name.strip()}_ns"])
        assert want in lines, (want, text)
    from mqrt.block.blk_stat import percentile_precision

    precision = percentile_precision(plist)
    for name in ("clat", "lat"):
        block = format_percentiles_text(d[f"{name}_ns"]["percentile"], name, precision)
        assert block in text, (block, text)
    for line in _lat_buckets(job):
        assert line in lines, (line, text)
    for line in sample_lines(d):  # fio's bw and iops samples
        assert line in lines, (line, text)
    assert len(sample_lines(d)) == 2


def test_num2str_is_fios():
    assert num2str(4338789, 6) == "4338.8k"
    assert num2str(3153500, 4) == "3154k"
    assert num2str(12916738045, 4, True, "B/s") == "12.0GiB/s"
    assert num2str(12916738045, 4, False, "B/s") == "12.9GB/s"
    assert num2str(67108864, 4, True, "B") == "64.0MiB"
    assert num2str(950, 6) == "950"


def test_text_has_fios_lines_in_fios_order(tmp_path):
    """mqrt's summary has the lines of fio's, in the same order, and IO depths shows
    the configured depth."""
    _, fio_text = run_fio(tmp_path, "--runtime=1", "--time_based", "--number_ios=50000")
    ours = run_mqrt(tmp_path, "--iodepth", "8", fmt="normal")

    def labels(text: str) -> list[str]:
        out = []
        for line in text.splitlines():
            m = re.match(r"\s*(Run status group|[A-Za-z ]+?)\s*(\(\w+\))?\s*[:=]", line)
            if m and not line.startswith("mqrt") and "|" not in line:
                label = m.group(1).strip()
                if label not in out:
                    out.append(label)
        return out

    want = [x for x in labels(fio_text) if x not in ("x", "bw", "iops", "lat", "slat")]
    got = labels(ours)
    assert [x for x in got if x in want] == want, (got, want)
    depths = next(ln for ln in ours.splitlines() if ln.startswith("  IO depths"))
    share = float(re.search(r" 8=([\d.]+)%", depths).group(1))
    assert share > 50.0, depths
    assert "latency   : target=0, window=0, percentile=100.00%, depth=8" in ours


# -- 2. the JSON ---------------------------------------------------------------------------------


def key_paths(obj: Any, prefix: str = "") -> set[str]:
    """Every key path of a JSON value (lists by their first element); the contents of
    maps whose keys are data (percentiles, bins, options) are not followed."""
    out: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.add(f"{prefix}/{k}")
            if k not in ("percentile", "bins", "job options", "global options"):
                out |= key_paths(v, f"{prefix}/{k}")
    elif isinstance(obj, list) and obj:
        out |= key_paths(obj[0], f"{prefix}[]")
    return out


def test_json_has_every_key_fio_writes(tmp_path):
    fio, _ = run_fio(tmp_path, "--rw=randrw", "--number_ios=20000", fmt="json")
    ours = json.loads(run_mqrt(tmp_path, "--rw", "randrw"))
    missing = key_paths(fio) - key_paths(ours)
    assert not missing, sorted(missing)
    job = ours["jobs"][0]
    assert job["latency_depth"] == 32 and job["latency_target"] == 0
    assert job["latency_percentile"] == 100.0 and job["latency_window"] == 0
    assert sum(job["iodepth_submit"].values()) == pytest.approx(100.0, abs=1.0)
    assert sum(job["iodepth_complete"].values()) == pytest.approx(100.0, abs=1.0)


@pytest.mark.parametrize(
    "flags",
    [
        ("--clat_percentiles=0", "--lat_percentiles=1"),
        ("--slat_percentiles=1", "--lat_percentiles=1"),
    ],
)
def test_percentile_flags_mean_what_fios_do(tmp_path, flags):
    plist = "--percentile_list=10:50:99.5"
    fio, _ = run_fio(tmp_path, *flags, plist, "--number_ios=20000", fmt="json")
    ours = json.loads(run_mqrt(tmp_path, *flags, plist))
    f, m = fio["jobs"][0]["read"], ours["jobs"][0]["read"]
    # fio's null engine is synchronous: it has no slat samples, and no slat percentiles
    for name in ("clat_ns", "lat_ns"):
        assert ("percentile" in f[name]) == ("percentile" in m[name]), name
    for name in ("slat_ns", "clat_ns", "lat_ns"):
        if "percentile" in m[name]:
            assert list(m[name]["percentile"]) == ["10.000000", "50.000000", "99.500000"]
    assert ("percentile" in m["slat_ns"]) == ("--slat_percentiles=1" in flags)


# -- 3. json+, several formats, terse ------------------------------------------------------------


CLAT2CSV = shutil.which("fio_jsonplus_clat2csv")
#: fio's Python tools run with the system's Python, where Debian's fio puts their
#: dependencies (python3-six)
SYS_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


@pytest.mark.skipif(CLAT2CSV is None, reason="fio_jsonplus_clat2csv is not installed")
def test_jsonplus_bins_read_by_fio_jsonplus_clat2csv(tmp_path):
    src = tmp_path / "run.json"
    src.write_text(run_mqrt(tmp_path, "--rw", "randrw", "--lat_percentiles", "1", fmt="json+"))
    report = json.loads(src.read_text())
    d = report["jobs"][0]
    for ddir in ("read", "write"):
        for name in ("clat_ns", "lat_ns"):
            bins = d[ddir][name]["bins"]
            assert sum(bins.values()) == d[ddir]["total_ios"] > 0
        assert "bins" not in d[ddir]["slat_ns"]  # no slat_percentiles: no bins, as fio
    for extra in ([], ["--validate"]):  # write the CSV, then check it against the JSON
        proc = subprocess.run(
            [SYS_PYTHON, CLAT2CSV or "", str(src), str(tmp_path / "out.csv"), *extra],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "out_job0.csv validated" in proc.stdout
    lines = (tmp_path / "out_job0.csv").read_text().strip().splitlines()
    header = [c.strip() for c in lines[0].split(",")]
    rows = [[c.strip() for c in ln.split(",")] for ln in lines[1:]]
    for ddir in ("read", "write"):
        col = header.index(f"{ddir}_clat_ns_count")
        counts = sum(int(r[col]) for r in rows if r[col])
        assert counts == d[ddir]["total_ios"]
        cum = header.index(f"{ddir}_clat_ns_cumulative")
        assert max(int(r[cum]) for r in rows if r[cum]) == d[ddir]["total_ios"]


def test_normal_and_json_together_as_fio_prints_them(tmp_path):
    text = run_mqrt(tmp_path, fmt="normal,json")
    obj, rest = split_output(text)
    assert obj["jobs"][0]["read"]["total_ios"] > 0
    assert "  IO depths    : " in rest and "Run status group 0 (all jobs):" in rest


def test_terse_has_fios_fields(tmp_path):
    fio_line = subprocess.run(
        [FIO or "fio", "--name=x", "--ioengine=null", "--size=64M", "--rw=randread",
         "--number_ios=1000", "--output-format=terse"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60, check=True,
    ).stdout.splitlines()[0].split(";")  # fmt: skip
    ours = run_mqrt(tmp_path, fmt="terse").splitlines()[0].split(";")
    # fio's null engine has no disk: ours adds the 9 disk fields fio adds for a device
    assert len(ours) == len(fio_line) + 9
    assert ours[0] == "3" and ours[2] == "nullb0"
    report = json.loads(run_mqrt(tmp_path))
    assert int(ours[5]) > 0 and report["jobs"][0]["read"]["io_kbytes"] > 0
    pct = [f for f in ours if "%=" in f]
    assert len(pct) == 40 and pct[0].startswith("1.000000%=")


def test_bad_output_format_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mqrt", "bench", "--output-format", "normal,xml"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "--output-format" in last and "'xml'" in last and "json+" in last


# -- 4. logs -------------------------------------------------------------------------------------


def read_log(path: Path) -> list[list[int]]:
    return [[int(x) for x in ln.split(",")] for ln in path.read_text().splitlines()]


def test_logs_per_io_match_the_run(tmp_path):
    """A line per I/O in each log, fio's five columns; the latency logs hold the very
    latencies the JSON summarises."""
    opts = ["--cpus", "2", "--rw", "randrw", "--write_lat_log", "L"]
    report = json.loads(run_mqrt(tmp_path, *opts, "--write_bw_log", "B", "--write_iops_log", "I"))
    job = report["jobs"][0]
    total = job["read"]["total_ios"] + job["write"]["total_ios"]
    names = sorted(p.name for p in tmp_path.glob("*.log"))
    assert names == sorted(f"{n}.{i}.log" for n in ("L_clat", "L_slat", "L_lat", "B_bw", "I_iops")
                           for i in (1, 2))  # fmt: skip
    for kind in ("L_clat", "L_slat", "L_lat", "B_bw", "I_iops"):
        rows = read_log(tmp_path / f"{kind}.1.log") + read_log(tmp_path / f"{kind}.2.log")
        assert len(rows) == total, kind
        assert all(len(r) == 5 and r[2] in (0, 1) and r[3] == 4096 and r[4] == 0 for r in rows)
    for ddir, d in enumerate((job["read"], job["write"])):
        for kind in ("clat", "slat", "lat"):
            vals = [
                r[1]
                for i in (1, 2)
                for r in read_log(tmp_path / f"L_{kind}.{i}.log")
                if r[2] == ddir
            ]
            assert len(vals) == d["total_ios"]
            assert min(vals) == d[f"{kind}_ns"]["min"] and max(vals) == d[f"{kind}_ns"]["max"]
            assert sum(vals) / len(vals) == pytest.approx(d[f"{kind}_ns"]["mean"])
    times = [r[0] for r in read_log(tmp_path / "L_clat.1.log")]
    assert times == sorted(times) and times[0] >= 0 and times[-1] < 2000
    assert {r[1] for r in read_log(tmp_path / "I_iops.1.log")} == {1}


def test_averaged_logs_read_by_fio2gnuplot(tmp_path):
    """With log_avg_msec, a line per window; fio's fio2gnuplot reads the bandwidth and
    IOPS logs, and their sums are the run's bytes and I/Os."""
    opts = ["--cpus", "2", "--runtime", "0.5", "--log_avg_msec", "100"]
    report = json.loads(run_mqrt(tmp_path, *opts, "--write_bw_log", "B", "--write_iops_log", "I"))
    d = report["jobs"][0]["read"]
    iops_rows = read_log(tmp_path / "I_iops.1.log") + read_log(tmp_path / "I_iops.2.log")
    assert all(r[0] % 100 == 0 and r[3] == 0 for r in iops_rows)
    assert sum(r[1] for r in iops_rows) // 10 == d["total_ios"]  # IOPS over 100 ms windows
    bw_rows = read_log(tmp_path / "B_bw.1.log") + read_log(tmp_path / "B_bw.2.log")
    kib = sum(r[1] for r in bw_rows) / 10  # KiB/s over 100 ms windows
    assert kib == pytest.approx(d["io_kbytes"], rel=0.01)
    fio2gnuplot = shutil.which("fio2gnuplot")
    assert fio2gnuplot is not None
    for flag, name in (("-b", "B_bw"), ("-i", "I_iops")):
        proc = subprocess.run(
            [SYS_PYTHON, fio2gnuplot, flag, "-k"],
            capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"{name}.1.log" in proc.stdout and f"{name}.2.log" in proc.stdout
        stats = dict(ln.split("=") for ln in (tmp_path / "result.global").read_text().splitlines())
        assert int(stats["disks_count"]) == 2
        rows = bw_rows if flag == "-b" else iops_rows
        assert int(stats["values_count"]) == len(rows)
        assert float(stats["max"]) == max(r[1] for r in rows)


def test_no_log_costs_nothing_when_not_asked(tmp_path):
    report = json.loads(run_mqrt(tmp_path))
    assert report["jobs"][0]["read"]["total_ios"] > 0
    assert not list(tmp_path.glob("*.log"))


def test_bw_and_iops_samples_as_fio_takes_them(tmp_path):
    """A sample per bw_avg_time/iops_avg_time of each CPU's measured time, the CPUs'
    statistics summed as fio's group_reporting sums them."""
    opts = ["--cpus", "2", "--runtime", "0.6", "--bw_avg_time", "200", "--iops_avg_time", "100"]
    report = json.loads(run_mqrt(tmp_path, *opts))
    d = report["jobs"][0]["read"]
    assert d["bw_samples"] == 2 * 3 and d["iops_samples"] == 2 * 6
    # the samples span each CPU's first 0.6 s: as many I/Os at most as the run did,
    # the same I/Os seen in KiB/s (4 KiB each) and in IOPS
    assert 0 < d["iops_mean"] * 0.6 <= d["total_ios"]
    assert d["bw_mean"] == pytest.approx(4 * d["iops_mean"], rel=0.01)
    assert d["iops_min"] <= d["iops_mean"] <= d["iops_max"]
    assert 0 < d["bw_agg"] <= 100.0
    w = report["jobs"][0]["write"]
    assert (w["bw_samples"], w["iops_samples"], w["bw_agg"]) == (0, 0, 0.0)
    text = run_mqrt(tmp_path, *opts, fmt="normal")
    assert re.search(r"^   bw \(  [KM]iB/s\): min=.*samples=6$", text, re.M), text
    assert re.search(r"^   iops        : min=.*samples=12$", text, re.M), text


def test_log_numbers_run_through_a_job_files_sections_as_fios(tmp_path):
    sections = "[a]\nrw=randread\n[b]\nrw=randwrite\n"
    logs = "write_iops_log=J\nlog_avg_msec=100\n"
    fio_dir, our_dir = tmp_path / "fio", tmp_path / "mqrt"
    fio_dir.mkdir()
    our_dir.mkdir()
    (fio_dir / "j.fio").write_text(
        f"[global]\nioengine=null\nsize=16M\nruntime=1\ntime_based=1\n{logs}{sections}"
    )
    subprocess.run([FIO or "fio", "j.fio"], cwd=fio_dir, capture_output=True, timeout=60,
                   check=True)  # fmt: skip
    (our_dir / "j.fio").write_text(f"[global]\nruntime=0.3\n{logs}{sections}")
    cmd = [sys.executable, "-m", "mqrt", "bench", "j.fio", "-q"]
    proc = subprocess.run(cmd, cwd=our_dir, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in fio_dir.glob("*.log"))
    assert names == ["J_iops.1.log", "J_iops.2.log"]
    assert sorted(p.name for p in our_dir.glob("*.log")) == names
    # the second job's log is the writes' (direction 1), as fio's
    for d in (fio_dir, our_dir):
        assert {ln.split(", ")[2] for ln in (d / "J_iops.2.log").read_text().splitlines()} == {"1"}


def test_hist_log_as_fios(tmp_path):
    """write_hist_log: fio's columns for the same coarseness, and the windows' bins
    add up to the json+ histogram of the run's completion latencies."""
    fio_dir = tmp_path / "fio"
    fio_dir.mkdir()
    hist = ["--write_hist_log=H", "--log_hist_msec=100", "--log_hist_coarseness=1"]
    run_fio(fio_dir, "--runtime=1", "--time_based", *hist, fmt="json")
    fio_text = (fio_dir / "H_clat_hist.1.log").read_text()
    fio_widths = {len(ln.split(",")) for ln in fio_text.splitlines()}
    report = json.loads(run_mqrt(tmp_path, *hist, fmt="json+"))
    lines = [
        [int(x) for x in ln.split(",")]
        for ln in (tmp_path / "H_clat_hist.1.log").read_text().splitlines()
    ]
    assert {len(ln) for ln in lines} == fio_widths == {3 + 1856 // 2}
    assert all(ln[0] % 100 == 0 and ln[1] == 0 and ln[2] == 4096 for ln in lines)
    summed = [sum(col) for col in zip(*(ln[3:] for ln in lines), strict=True)]
    from mqrt.block.blk_stat import plat_val_to_idx

    bins = report["jobs"][0]["read"]["clat_ns"]["bins"]
    want = [0] * (1856 // 2)
    for value, count in bins.items():
        want[plat_val_to_idx(int(value)) // 2] += count
    assert summed == want and sum(want) == report["jobs"][0]["read"]["total_ios"]

"""``mqrt bench`` as a user runs it: fio-shaped JSON, one-line errors, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from tests.helpers import interrupt, stderr_lines, wait_for_work
from tests.test_cli import mqrt

pytestmark = pytest.mark.timing


def test_bench_json_is_fio_shaped_with_an_mqrt_object():
    out = mqrt(
        "bench", "--runtime", "0.3", "--cpus", "2", "--irqmode", "timer",
        "--completion-nsec", "20000", "--output-format", "json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["fio version"].startswith("mqrt-")
    (job,) = report["jobs"]
    assert job["jobname"] == "nullb0"
    read = job["read"]
    assert (
        read["iops"] > 0 and read["total_ios"] > 0 and read["io_bytes"] == 4096 * read["total_ios"]
    )
    pct = read["clat_ns"]["percentile"]
    assert "99.000000" in pct and "99.990000" in pct
    assert pct["50.000000"] <= pct["99.000000"]
    for key in ("lat_ns", "slat_ns", "bw", "bw_bytes", "runtime"):
        assert key in read
    assert job["write"]["total_ios"] == 0
    for key in ("usr_cpu", "sys_cpu", "ctx", "iodepth_level", "latency_us", "latency_ms"):
        assert key in job
    assert set(job["iodepth_level"]) == {"1", "2", "4", "8", "16", "32", ">=64"}
    m = report["mqrt"]
    assert m["schema"] == "mqrt.bench/4"
    assert m["config"]["nullb"]["irqmode"] == "timer"
    assert m["config"]["job"]["iodepth"] == 32
    assert m["invariants"] == {"violations": 0, "runs": 1}
    assert m["sweep"]["axes"] == {} and m["sweep"]["repeat"] == 1
    (point,) = m["points"]
    assert point["params"] == {} and point["iops"] == read["iops"] == point["iops_runs"][0]
    run = point["run"]
    assert len(run["cpus"]) == 2 and run["invariants"]["violations"] == 0
    assert {"tag_waits", "tag_sleeps", "ipis_received"} <= set(run["cpus"][0]["counters"])
    assert {"busy", "requeued", "completed"} <= set(run["cpus"][0]["blk_mq"])
    assert {"cores", "python", "topology"} <= set(m["host"])


def test_bench_reports_merges_as_diskstats_and_fio_disk_util_have_them():
    """fio's JSON ``disk_util`` (read_ios, read_merges, ... as /sys/block/<dev>/stat
    counts them), parallel to ``jobs[]``; the merges per CPU and direction in the
    ``mqrt`` object; fio's "Disk stats (read/write)" lines in the text."""
    out = mqrt(
        "bench", "--runtime", "0.3", "--cpus", "1", "--irqmode", "none", "--rw", "read",
        "--output-format", "json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    (job,) = report["jobs"]
    (disk,) = report["disk_util"]
    read = job["read"]
    assert disk["name"] == job["jobname"] == "nullb0"
    assert disk["read_merges"] > 0 and disk["write_merges"] == disk["write_ios"] == 0
    assert disk["read_ios"] + disk["read_merges"] == read["total_ios"]
    assert disk["read_sectors"] * 512 == read["io_bytes"]
    assert disk["in_queue"] == disk["read_ticks"] + disk["write_ticks"]
    (cpu,) = report["mqrt"]["points"][0]["run"]["cpus"]
    assert cpu["blk_mq"]["read_merges"] == cpu["blk_mq"]["merges"] > 0
    assert cpu["blk_mq"]["write_merges"] == 0
    (queue,) = report["mqrt"]["points"][0]["run"]["queues"]
    assert queue["limits"] == {
        "max_sectors_kb": 127, "max_hw_sectors_kb": 127, "max_segments": 128, "nomerges": 0,
    }  # fmt: skip
    text = mqrt("bench", "--runtime", "0.2", "--cpus", "1", "--irqmode", "none", "--rw", "read")
    assert text.returncode == 0, text.stderr
    assert "Disk stats (read/write):\n  nullb0: ios=" in text.stdout
    assert ", merge=" in text.stdout and "read_merges=" in text.stdout


def test_bench_text_summary_reads_like_fio():
    out = mqrt("bench", "--runtime", "0.2", "--cpus", "1", "--irqmode", "none", "-q")
    assert out.returncode == 0, out.stderr
    assert "read: IOPS=" in out.stdout and "clat percentiles (" in out.stdout
    assert "IO depths    :" in out.stdout and "mqrt: invariants ok" in out.stdout


def test_bench_profile_writes_each_cpus_profile_and_a_stage_table(tmp_path):
    out = mqrt(
        "bench", "--runtime", "0.3", "--cpus", "2", "--irqmode", "none", "-q",
        "--output-format", "json", "--profile", str(tmp_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    json.loads(out.stdout)  # the table goes to stderr: the report stays JSON
    assert sorted(os.listdir(tmp_path)) == ["cpu0.prof", "cpu1.prof"]
    assert "profile: 2 CPU(s)" in out.stderr
    for stage in ("fio job/bio", "tag get", "queue_rq/driver", "end_request", "tag free"):
        assert f"  {stage} " in out.stderr


@pytest.mark.parametrize("model", ["5.10", "6.x"])
def test_bench_shared_tag_model(model):
    """``mqrt bench --shared_tag_bitmap 1 --shared_tag_model 5.10|6.x``: a run of each
    model ends with its invariants ok, and the report names the model."""
    out = mqrt(
        "bench", "--runtime", "0.3", "--cpus", "2", "--submit_queues", "4",
        "--hw_queue_depth", "16", "--shared_tag_bitmap", "1", "--shared_tag_model", model,
        "--irqmode", "timer", "--completion-nsec", "20000", "--output-format", "json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)["mqrt"]
    assert m["config"]["nullb"]["shared_tag_model"] == model
    assert m["invariants"] == {"violations": 0, "runs": 1}
    (point,) = m["points"]
    inv = point["run"]["invariants"]
    assert inv["leaked_tags"] == 0 and inv["owned_requests"] == 0 and inv["problems"] == []
    assert point["iops"] > 0


def test_nvme_bench_prints_latency_next_to_the_wakeup_reference():
    out = mqrt(
        "bench", "--driver", "nvme", "--runtime", "0.3", "--cpus", "1", "--iodepth", "1",
        "--latency_ns", "0", "-q", "--reference",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "mqrt: reference: eventfd wake-up round trip" in out.stdout
    assert "lat p50" in out.stdout and "bare SQ -> device -> CQ loop" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--irqmode", "fast"), "irqmode: must be none|softirq|timer (or 0|1|2), got 'fast'"),
        (("--cpus", "0"), "cpus: must be 1..1024, got '0'"),
        (("--bs", "1000"), "bs: must be a multiple of 512, got 1000"),
        (("--hw_queue_depth", "0"), "hw_queue_depth: must be 1..65536, got '0'"),
        (("--requeue", "1,2"), "requeue: expected '<interval>,<probability>,<space>,<times>'"),
        (("--rw", "sideways"), "rw: must be read|write|randread"),
        (("--cpus-allowed", "0-999"), "cpus_allowed: CPUs"),
        (("--init_hctx", "1,100,0,1"), "ENOMEM: nullb0: init_hctx failed for hctx 0 (EFAULT)"),
        (("--driver", "nvme", "--irqmode", "none"), "irqmode: a nullb option"),
        (("--latency_ns", "5"), "latency_ns: an nvme option; add --driver nvme"),
        (("--runtime", "nan"), "runtime: must be 0.01..86400, got 'nan'"),
        (("--inspector", "101"), "inspector: must be 0..100, got '101'"),
        (("-o", "/nonexistent/dir/x.json"), "cannot write /nonexistent/dir/x.json"),
        (
            ("--mode", "raw", "--cpus", "4", "--shared_tag_bitmap", "1", "--hw_queue_depth", "2"),
            "hw_queue_depth: --mode raw with shared_tag_bitmap needs a tag per CPU (>= 4), got 2",
        ),
        (
            ("--mode", "raw", "--shared_tags", "1", "--nr_devices", "2"),
            "shared_tags: --mode raw gives each device its own slots; use 0",
        ),
    ],
)
def test_bad_options_are_one_line_errors(args, message):
    out = mqrt("bench", "--runtime", "0.1", *args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(stderr_lines(out.stderr)) == 1


def test_ctrl_c_stops_cleanly_with_what_was_measured():
    code = "import sys\nfrom mqrt.cli import main\nsys.exit(main(sys.argv[1:]))"
    p = subprocess.Popen(
        [sys.executable, "-c", code, "bench", "--runtime", "20", "--irqmode", "timer",
         "--output-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    # the run's CPUs are doing I/O (start-up and a loaded host vary)
    out, err = interrupt(p, lambda: wait_for_work(p.pid, 0.3))
    assert p.returncode == 130, err
    assert "interrupted" in err
    report = json.loads(out)
    read = report["jobs"][0]["read"]
    assert read["total_ios"] > 0 and read["runtime"] < 10_000
    assert report["mqrt"]["invariants"]["violations"] == 0


def test_cpus_beyond_available_memory_is_refused(monkeypatch):
    """--cpus goes up to 1024 (each CPU is a process of its own), and no further than
    the host's available memory holds: a point asking for more is a usage error
    before anything runs."""
    from mqrt.bench import main as bench
    from mqrt.lib.knobs import KnobError

    monkeypatch.setattr(bench, "_mem_available", lambda: 1 << 30)
    with pytest.raises(KnobError) as exc:
        bench.build({"cpus": 512})
    assert str(exc.value) == (
        "cpus: 512 CPUs need about 5.0 GiB of memory, this host has 1.0 GiB available"
    )
    assert bench.build({"cpus": 64})[0].nr_cpus == 64


def test_a_cpu_killed_mid_run_keeps_what_was_measured():
    # a CPU dies: the run ends at once, exit 1, and the report still carries the
    # figures of the CPUs that finished, with the error: which process, pid, why
    p = subprocess.Popen(
        [sys.executable, "-m", "mqrt", "bench", "--cpus", "2", "--runtime", "20",
         "--irqmode", "timer", "--output-format", "json", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert wait_for_work(p.pid, 0.3, procs=2)  # both CPUs are doing I/O
        sid = os.getsid(p.pid)  # the segment's guardian runs in a session of its own
        victim = next(c for c in psutil.Process(p.pid).children() if os.getsid(c.pid) == sid)
        victim.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 1, err
    assert f"(pid {victim.pid}) died: SIGKILL" in err and "Traceback" not in err
    report = json.loads(out)
    error = report["mqrt"]["error"]
    assert error["pid"] == victim.pid and error["role"] == "cpu"
    assert error["partial"]["cpus_missing"] == [error["cpu"]]
    assert error["reason"].startswith("SIGKILL")
    assert report["jobs"] and report["jobs"][0]["read"]["total_ios"] > 0

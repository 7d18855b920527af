"""``mqrt inspect``: a real run appears in the listing while it goes, with its owner,
command line and segment, and is gone once it ended."""

from __future__ import annotations

import json
import subprocess
import sys
import time

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


def _inspect(run: str, *paths: str) -> dict[str, str]:
    out = mqrt("inspect", run, *paths, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_inspect_reads_a_live_runs_debugfs_and_sysfs():
    """Attach to a real run whose requests stay in flight (null_blk's timer would
    complete each after 60 s): the configured depths, the map's CPU lists, and tags in
    use that match what the run itself accounts for at its end (the I/Os in flight
    its stop gave up on, each CPU's issued and completed)."""
    bench = subprocess.Popen(
        [sys.executable, "-m", "mqrt", "bench", "--cpus", "2", "--submit_queues", "2",
         "--hw_queue_depth", "16", "--iodepth", "4", "--irqmode", "2",
         "--completion_nsec", "60000000000", "--io_timeout", "300000", "--runtime", "120",
         "--output-format", "json", "--quiet"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        seg = ""
        deadline = time.monotonic() + 120
        while not seg and time.monotonic() < deadline:  # the run's segment, once running
            seg = next(
                (
                    r.segment
                    for r in list_runs()
                    if r.owner_pid == bench.pid and r.state == "running"
                ),
                "",
            )
            time.sleep(0.05)
        assert seg, "the run never started"
        dev = "sys/block/nullb0"
        dbg = "sys/kernel/debug/block/nullb0"
        # every CPU submitted its iodepth (published with its heartbeat): 4 each
        got: dict[str, str] = {}
        while time.monotonic() < deadline:
            got = _inspect(seg, f"/{dev}", f"/{dbg}/hctx0", f"/{dbg}/hctx1", "/proc/diskstats")
            if got[f"{dev}/inflight"].split()[0] == "8":
                break
            time.sleep(0.05)
        assert got[f"{dev}/inflight"].split() == ["8", "0"]
        assert got[f"{dev}/mq/0/cpu_list"] == "0\n" and got[f"{dev}/mq/1/cpu_list"] == "1\n"
        assert got[f"{dev}/mq/0/nr_tags"] == "16\n" and got[f"{dev}/mq/0/nr_reserved_tags"] == "0\n"
        assert got[f"{dev}/queue/nr_requests"] == "16\n"
        assert got[f"{dev}/queue/scheduler"].split() == ["[none]", "mq-deadline"]
        stat = got[f"{dev}/stat"].split()
        assert len(stat) == 17 and stat[8] == "8"
        assert got["proc/diskstats"].split()[2] == "nullb0"
        for h in (0, 1):
            assert "nr_tags=16\n" in got[f"{dbg}/hctx{h}/tags"]
            # the tags in use are the run's requests in flight: 4 per hctx, each started
            assert "busy=4\n" in got[f"{dbg}/hctx{h}/tags"]
            busy = got[f"{dbg}/hctx{h}/busy"].splitlines()
            assert len(busy) == 4 and all(".state=in_flight" in line for line in busy)
            assert got[f"{dbg}/hctx{h}/type"] == "default\n"
            assert got[f"{dbg}/hctx{h}/flags"].startswith("alloc_policy=FIFO ")
        lock_stat = _inspect(seg, "/proc/lock_stat")["proc/lock_stat"]
        assert lock_stat.startswith("lock_stat version 0.4\n") and "class name" in lock_stat
        one = mqrt("inspect", seg, f"{dbg}/hctx0/tags_bitmap")
        assert one.returncode == 0 and one.stdout.startswith("00000000: "), one.stdout
        hexbytes = "".join(one.stdout.split(":", 1)[1].split())
        assert len(hexbytes) == 4 and bin(int(hexbytes, 16)).count("1") == 4  # 16 tags, 4 held
        bad = mqrt("inspect", seg, "block/nullb9")
        assert bad.returncode == 2 and "PATH: 'block/nullb9' names no file" in bad.stderr
    finally:
        bench.send_signal(2)
        out, err = bench.communicate(timeout=120)
    assert bench.returncode == 130, err
    # the run's own end-of-run accounting: the 8 tags inspect saw held, 4 per hctx
    run = json.loads(out)["mqrt"]["points"][0]["run"]
    assert run["invariants"]["skipped"].startswith("8 I/Os still in flight"), run["invariants"]
    for cpu in run["cpus"]:
        assert cpu["blk_mq"]["issued"] - cpu["blk_mq"]["completed"] == 4, cpu["blk_mq"]
    ended = mqrt("inspect", seg)
    assert ended.returncode == 2 and "has ended" in ended.stderr


def _maps(pid: int, segment: str) -> bool:
    """Whether process ``pid`` has ``segment`` mapped."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(segment in line for line in f)
    except OSError:
        return False


def test_an_attached_inspector_watches_until_the_run_ends():
    """mqrt bench --inspector: the watcher process maps the run (read-only) while it
    goes, and ends by itself, with status 0, once the run is over."""
    from mqrt.inspect.watcher import Inspector

    bench = subprocess.Popen(
        [sys.executable, "-m", "mqrt", "bench", "--cpus", "1", "--runtime", "60", "--quiet"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        seg = ""
        deadline = time.monotonic() + 120
        while not seg and time.monotonic() < deadline:
            seg = next((r.segment for r in list_runs() if r.owner_pid == bench.pid), "")
            time.sleep(0.02)
        assert seg, "the run never started"
        with Inspector(10) as inspector:
            while time.monotonic() < deadline:  # attachable once its manifest is there
                if mqrt("inspect", seg, "proc/diskstats").returncode == 0:
                    break
                time.sleep(0.05)
            watcher = inspector.proc  # started before the run is named to it
            assert watcher is not None and watcher.poll() is None
            inspector.attach(seg)
            while watcher.poll() is None and not _maps(watcher.pid, seg):
                assert time.monotonic() < deadline, "the watcher never attached"
                time.sleep(0.02)
            assert watcher.poll() is None  # attached, and watching
            bench.send_signal(2)  # the run ends (Ctrl-C): the watcher sees it
            _, err = bench.communicate(timeout=120)
        # the with block waited for the watcher: it saw the run end
        assert watcher.returncode == 0
    finally:
        if bench.returncode is None:  # a failure above: end the run
            bench.kill()
            bench.communicate(timeout=120)
    assert bench.returncode == 130, err

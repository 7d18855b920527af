"""fio job files run: the I/O generator draws what the job file says (block sizes per
direction, ranges, splits, the region of offset/size, rw=MODE:N), and a real
``mqrt bench JOBFILE`` reports the jobs, CPUs and block-size mix the file asked for."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from mqrt.workers.ioengine import IoJob, JobSpec
from mqrt.workers.offsets import BlockSampler

DEV = 1 << 30


def bios(options: dict[str, str], n: int = 20000) -> list[tuple[int, int, int]]:
    job = IoJob(JobSpec.from_options(options), 0, 0, DEV, 0)
    return [job.next_bio() for _ in range(n)]


def test_block_sizes_follow_the_direction():
    out = bios({"rw": "randrw", "bs": "4096", "blocksizes": "4096-4096,65536-65536"})
    sizes = {op: {n for o, _s, n in out if o == op} for op in (0, 1)}
    assert sizes == {0: {8}, 1: {128}}


def test_bssplit_draws_by_weight_and_a_range_in_multiples_of_its_low_end():
    out = bios({"rw": "randread", "bs": "4096", "blocksizes": "4096/75:65536/25,4096-4096"})
    share = Counter(n for _o, _s, n in out)
    assert set(share) == {8, 128}
    assert 0.72 < share[8] / len(out) < 0.78
    out = bios({"rw": "randread", "bs": "4096", "blocksizes": "4096-16384,4096-4096"})
    assert {n for _o, _s, n in out} == {8, 16, 24, 32}


def test_offsets_stay_in_the_region_aligned_to_the_smallest_block():
    out = bios(
        {"rw": "randread", "bs": "4096", "blocksizes": "4096-65536,4096-4096",
         "offset": str(1 << 20), "size": str(8 << 20)}
    )  # fmt: skip
    lo, hi = (1 << 20) >> 9, (9 << 20) >> 9
    assert all(lo <= s and s + n <= hi and s % 8 == 0 for _o, s, n in out)
    assert min(s for _o, s, _n in out) < lo + 64 and max(s + n for _o, s, n in out) > hi - 256


def test_sequential_with_holes_and_random_runs():
    out = bios({"rw": "read", "bs": "4096", "rw_modifier": "8192"}, 4)
    assert [s for _o, s, _n in out] == [0, 24, 48, 72]
    out = bios({"rw": "randread", "bs": "4096", "rw_modifier": "4"}, 8)
    starts = [s for _o, s, _n in out]
    assert starts[1:4] == [starts[0] + 8, starts[0] + 16, starts[0] + 24]
    assert starts[4] != starts[3] + 8  # a new random offset every 4 I/Os


def test_not_time_based_ends_after_loops_times_io_size():
    job = IoJob(
        JobSpec.from_options({"rw": "read", "bs": "4096", "blocksizes": "4096-8192,4096-4096",
                              "size": str(1 << 20), "time_based": "0", "loops": "2"}),
        0, 0, DEV, 0,
    )  # fmt: skip
    total = 0
    while job.remaining():
        total += job.next_bio()[2] << 9
    assert 2 << 20 <= total < (2 << 20) + 8192


def test_the_random_map_gives_every_block_once_per_pass():
    size = 64 * 4096
    out = bios({"rw": "randread", "bs": "4096", "size": str(size), "norandommap": "0"}, 3 * 64)
    for k in range(3):
        assert sorted(s for _o, s, _n in out[k * 64 : (k + 1) * 64]) == list(range(0, 512, 8))
    out = bios({"rw": "randread", "bs": "4096", "size": str(size)}, 3 * 64)
    assert len({s for _o, s, _n in out[:64]}) < 64  # norandommap: repeats


def _top_decile(blocks: np.ndarray, n: int) -> float:
    """fio-genzipf's figure: of the blocks hit, the hits of the busiest tenth."""
    counts = np.bincount(blocks, minlength=n)
    hit = np.sort(counts[counts > 0])[::-1]
    return float(hit[: len(hit) // 10].sum() / hit.sum() * 100)


@pytest.mark.skipif(shutil.which("fio-genzipf") is None, reason="fio is not installed")
@pytest.mark.parametrize(
    ("kind", "value", "dist"),
    [("zipf", "1.2", ("zipf", 1.2, ())), ("zipf", "0.8", ("zipf", 0.8, ())),
     ("pareto", "0.2", ("pareto", 0.2, ()))],
)  # fmt: skip
def test_zipf_and_pareto_match_fio_genzipf(kind, value, dist):
    res = subprocess.run(
        ["fio-genzipf", "-t", kind, "-i", value, "-g", "1", "-b", "4096", "-o", "10"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    fio_top = float(re.search(r"Top\s+10\.00%\s+([\d.]+)%", res.stdout)[1])
    n = (1 << 30) // 4096
    sampler = BlockSampler(n, np.random.default_rng(7), dist, False, 4096)
    mine = _top_decile(sampler.draw(n), n)
    assert abs(mine - fio_top) < 1.5, (mine, fio_top)


def test_zoned_puts_each_zones_share_in_its_range():
    n = 1000
    sampler = BlockSampler(n, np.random.default_rng(1), ("zoned", 0, ((60, 10), (40, 90))), True, 1)
    x = sampler.draw(50000)
    assert 0.58 < (x < 100).mean() < 0.62 and x.max() < n


JOBFILE = """\
[global]
ioengine=libaio
numjobs=2
rw=randrw
bs=4k,64k
runtime=300ms
[a]
random_distribution=zipf:1.2
[b]
stonewall
bssplit=8k/50:64k/50,16k/100
"""


def test_a_real_run_has_the_jobs_cpus_and_block_sizes_of_the_file(tmp_path):
    path = tmp_path / "mix.fio"
    path.write_text(JOBFILE)
    res = subprocess.run(
        [sys.executable, "-m", "mqrt", "bench", str(path), "-q", "--output-format", "json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert f"mqrt: {path}:2: ioengine=libaio: no effect" in res.stderr
    report = json.loads(res.stdout)
    assert [j["jobname"] for j in report["jobs"]] == ["nullb0 job=a", "nullb0 job=b"]
    assert [j["groupid"] for j in report["jobs"]] == [0, 1]  # stonewall: fio's second group
    assert [p["params"] for p in report["mqrt"]["points"]] == [{"job": "a"}, {"job": "b"}]
    assert report["mqrt"]["config"]["run"]["cpus"] == 2  # numjobs=2: two CPUs

    def avg(job, d):
        return job[d]["io_bytes"] / job[d]["total_ios"]

    a, b = report["jobs"]
    assert avg(a, "read") == 4096 and avg(a, "write") == 65536
    assert 30_000 < avg(b, "read") < 43_000 and avg(b, "write") == 16384


def run_jobfile(tmp_path, text: str, *extra: str) -> dict:
    path = tmp_path / "job.fio"
    path.write_text(text)
    res = subprocess.run(
        [sys.executable, "-m", "mqrt", "bench", str(path), "-q", "--output-format", "json",
         *extra],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_rates_per_direction_and_thinktime_pace_a_real_run(tmp_path):
    """rate=256k,512k of 4k I/Os on one CPU for 0.6 s: 64 reads/s and 128 writes/s
    (fio caps each direction); [think]: a 20 ms stall after each I/O, at most 50/s."""
    report = run_jobfile(
        tmp_path,
        "[global]\nrw=randrw\nruntime=600ms\niodepth=4\n"
        "[rated]\nrate=256k,512k\n"
        "[think]\nstonewall\nthinktime=20ms\nthinktime_blocks_type=issue\n",
        "--cpus", "1",
    )  # fmt: skip
    rated, think = report["jobs"]
    reads, writes = rated["read"]["total_ios"], rated["write"]["total_ios"]
    assert 25 <= reads <= 48 and 55 <= writes <= 85, (reads, writes)
    ios = think["read"]["total_ios"] + think["write"]["total_ios"]
    assert 15 <= ios <= 32, ios


def test_jobs_without_stonewall_run_side_by_side_each_clone_on_its_own_cpu(tmp_path):
    report = run_jobfile(
        tmp_path,
        "[global]\nrw=randread\nruntime=300ms\n"
        "[reader]\nnumjobs=2\n[writer]\nrw=randwrite\nbs=64k\n[after]\nstonewall\n",
    )
    names = [j["jobname"] for j in report["jobs"]]
    assert names == [
        "nullb0 reader job=reader+writer", "nullb0 writer job=reader+writer", "nullb0 job=after"
    ]  # fmt: skip
    reader, writer, after = report["jobs"]
    assert reader["job options"]["numjobs"] == "2" and writer["job options"]["numjobs"] == "1"
    assert reader["read"]["total_ios"] > 0 and reader["write"]["total_ios"] == 0
    assert writer["write"]["total_ios"] > 0 and writer["read"]["total_ios"] == 0
    assert writer["write"]["io_bytes"] == writer["write"]["total_ios"] * 65536
    assert after["job options"]["numjobs"] == "1"  # fio's default: one clone
    assert [p["params"] for p in report["mqrt"]["points"]] == [
        {"job": "reader+writer"}, {"job": "after"}
    ]  # fmt: skip


def test_sized_clones_do_their_size_each_at_their_own_offset(tmp_path):
    """numjobs=2, size=64k, offset_increment=1m, no time_based: fio's clones each
    write 64k (16 I/Os of 4k) in their own megabyte, then end."""
    job = JobSpec.from_options({"bs": "4096", "offset_increment": str(1 << 20)})
    assert [c.offset for c in job.clones(3)] == [0, 1 << 20, 2 << 20]
    report = run_jobfile(
        tmp_path, "[w]\nrw=write\nnumjobs=2\nsize=64k\noffset_increment=1m\nruntime=5s\n"
    )
    (w,) = report["jobs"]
    assert w["write"]["total_ios"] == 32 and w["write"]["io_bytes"] == 2 * 65536
    assert w["job options"]["numjobs"] == "2"

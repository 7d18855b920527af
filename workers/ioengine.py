"""The I/O generator a CPU runs: an fio job, in fio's vocabulary.

One :class:`IoJob` per (CPU, request queue), like fio's ``numjobs`` spread over
``cpus_allowed`` with ``cpus_allowed_policy=split``: it keeps ``iodepth`` I/Os in
flight, submits ``iodepth_batch_submit`` at a time inside a plug, honours
``rate_iops``, ``ramp_time`` and ``runtime``, and records submission, completion and
total latencies (fio's slat/clat/lat) in fio's histogram.

Each bio is one I/O, timed from its own submission, also when the block layer merged
it into another's request (the request's bios come back with their own starts).  As
fio times an I/O: its slat runs from its start to its issue (its request's first
issue to the driver), its clat from there to its completion -- through every retry
(a requeue, a driver's BLK_STS_RESOURCE, nvme's Abort or reset), which fio never sees
-- and its lat is the two together.  The job also keeps the device's view, as
diskstats does: requests completed and the time they took (from the request's start,
its first bio's), per direction.

Block sizes are per direction (fio's ``bs=read,write``), each fixed, a range
(``bsrange``: a multiple of its low end, uniform) or a split (``bssplit``: sizes
drawn by their weights).  I/O stays within ``[offset, offset + size)``; a
sequential job wraps to ``offset`` at the end, skipping ``rw=read:N`` bytes after
each I/O (``rw=read:-8k``: going back, from the end once past the start); a random
one draws offsets aligned to the smallest block size, and with
``rw=randread:N`` follows each random offset with N-1 sequential ones.

Random offsets follow ``random_distribution`` (:mod:`mqrt.workers.offsets`); a job
file gets fio's random map (every block once per pass) unless it says
``norandommap``; the command line keeps ``norandommap`` (uniform draws).

Deviations from fio
    * Offsets are generated in chunks with numpy (seeded per job), not by fio's
      tausworthe generator: the same distributions, other sequences.
    * The random map covers fixed block sizes; with ranges or splits offsets are
      drawn without one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from mqrt.block.blk_mq_types import BlkStatus, ReqOp
from mqrt.block.blk_stat import LatHist, batch_bucket, parse_percentile_list
from mqrt.lib.fio_values import parse_bssplit, parse_distribution, parse_size_range
from mqrt.lib.knobs import Knob, KnobError, parse_knobs
from mqrt.workers._jobsink import BioSink
from mqrt.workers.offsets import BlockSampler

RW_MODES = {
    "read": "read",
    "write": "write",
    "randread": "randread",
    "randwrite": "randwrite",
    "rw": "rw",
    "readwrite": "rw",
    "randrw": "randrw",
}


def _plist_check(text: str) -> str | None:
    try:
        parse_percentile_list(text)
    except ValueError as exc:
        return str(exc).removeprefix("percentile_list: ")
    return None


#: fio job options mqrt honours, with fio's names, units and defaults.
JOB_KNOBS: tuple[Knob, ...] = (
    Knob(
        "rw",
        "choice",
        "randread",
        "I/O pattern: read, write, randread, randwrite, rw, randrw. Default: randread",
        choices=RW_MODES,
    ),
    Knob("bs", "size", 4096, "Block size in bytes (k/m suffixes). Default: 4k", 512, 1 << 24),
    Knob("iodepth", "int", 32, "I/Os kept in flight per job. Default: 32", 1, 65536),
    Knob(
        "iodepth_batch_submit",
        "int",
        0,
        "I/Os submitted at once, inside one plug (0: up to iodepth). Default: 0",
        0,
        65536,
    ),
    Knob("rwmixread", "int", 50, "Percentage of reads in rw/randrw. Default: 50", 0, 100),
    Knob("runtime", "float", 5.0, "Seconds to run (time_based). Default: 5", 0.01, 86400),
    Knob("ramp_time", "float", 0.0, "Seconds run before stats count. Default: 0", 0, 3600),
    Knob(
        "rate_iops",
        "int",
        0,
        "IOPS cap per job, issued in even steps from the run's start, so the CPUs' jobs keep in "
        "step (0: no cap). Default: 0",
        0,
        1 << 30,
    ),
    Knob("size", "size", 0, "Bytes of the device each job spans (0: all). Default: 0", 0, 1 << 60),
    Knob(
        "percentile_list",
        "str",
        "",
        "Completion-latency percentiles, colon separated. Default: fio's list",
        check=lambda v: _plist_check(v) if v else None,
    ),
    Knob("randseed", "int", 0x1234, "Seed of the offset generator. Default: 0x1234", 0, 1 << 63),
    Knob(
        "iodepth_batch_complete",
        "int",
        1,
        "Completions a job waits for before it submits again (fio's "
        "iodepth_batch_complete_min; 0 or 1: refill at once). Default: 1",
        0,
        65536,
    ),
    Knob(
        "time_based",
        "bool",
        True,
        "Run for runtime (1), or end each job once it has done --size bytes (0). Default: 1",
    ),
    Knob(
        "hipri",
        "bool",
        False,
        "Polled I/O (io_uring IOPOLL): bios go to the poll queues and the submitting "
        "CPU reaps them itself, spinning (needs --poll_queues). Default: 0",
    ),
    # -- what is reported (fio's names; see mqrt.bench.fiolog for the logs) --
    Knob("clat_percentiles", "bool", True, "Completion-latency percentiles. Default: 1"),
    Knob("lat_percentiles", "bool", False, "Total-latency percentiles. Default: 0"),
    Knob("slat_percentiles", "bool", False, "Submission-latency percentiles. Default: 0"),
    Knob(
        "bw_avg_time",
        "int",
        500,
        "ms over which each bandwidth sample (bw_min, bw_max, bw_mean...) is taken. Default: 500",
        1,
        86_400_000,
    ),
    Knob(
        "iops_avg_time",
        "int",
        500,
        "ms over which each IOPS sample (iops_min, iops_max...) is taken. Default: 500",
        1,
        86_400_000,
    ),
    Knob(
        "write_lat_log",
        "str",
        "",
        "Write NAME_clat.N.log, NAME_slat.N.log, NAME_lat.N.log (fio's format, one per "
        "job N). Default: none",
    ),
    Knob("write_bw_log", "str", "", "Write NAME_bw.N.log (KiB/s). Default: none"),
    Knob(
        "write_hist_log",
        "str",
        "",
        "Write NAME_clat_hist.N.log: completion-latency histograms in fio's bins, one "
        "per log_hist_msec. Default: none",
    ),
    Knob(
        "log_hist_msec",
        "int",
        0,
        "ms each histogram of write_hist_log covers (0: none written). Default: 0",
        0,
        86_400_000,
    ),
    Knob(
        "log_hist_coarseness",
        "int",
        0,
        "Histogram bins merged 2**N at a time in write_hist_log (0..6). Default: 0",
        0,
        6,
    ),
    Knob("write_iops_log", "str", "", "Write NAME_iops.N.log. Default: none"),
    Knob(
        "log_avg_msec",
        "int",
        0,
        "Average the logs over windows of this many ms (0: a line per I/O). Default: 0",
        0,
        86_400_000,
    ),
)


def _check_blocksizes(text: str) -> str | None:
    try:
        parse_blocksizes(text)
    except ValueError as exc:
        return str(exc)
    return None


def _pair(text: str) -> tuple[int, int]:
    """``READ,WRITE`` of two integers (an empty text: no caps)."""
    if not text:
        return 0, 0
    a, b = text.split(",")
    r, w = int(a), int(b)
    if r < 0 or w < 0:
        raise ValueError(text)
    return r, w


def _check_pair(text: str) -> str | None:
    try:
        _pair(text)
    except ValueError:
        return "must be READ,WRITE (two integers >= 0)"
    return None


def _check_distribution(text: str) -> str | None:
    try:
        parse_distribution(text)
    except ValueError as exc:
        return str(exc)
    return None


#: Job options only a job file sets (fio's spellings are translated into these by
#: ``mqrt.bench.fio_options``); never on the command line, never swept.
JOB_FILE_KNOBS: tuple[Knob, ...] = (
    Knob(
        "blocksizes",
        "str",
        "",
        "Block sizes per direction, read,write: each LO-HI or SIZE/PCT:SIZE/PCT (empty: bs)",
        check=lambda v: _check_blocksizes(v) if v else None,
    ),
    Knob(
        "rw_modifier",
        "int",
        0,
        "rw=MODE:N: bytes skipped after each sequential I/O (negative: back), or the "
        "run length of a random job",
        -(1 << 40),
    ),
    Knob("offset", "int", 0, "First byte of the job's region", 0, 1 << 60),
    Knob("offset_increment", "int", 0, "Each clone's offset: offset + clone x this", 0),
    Knob("offset_pct", "float", 0.0, "offset as a percentage of the device", 0, 100),
    Knob("size_pct", "float", 0.0, "size as a percentage of the device (0: size)", 0, 100),
    Knob("io_size", "int", 0, "Bytes of I/O the job does when not time_based (0: size)", 0),
    Knob("loops", "int", 1, "Passes over io_size when not time_based", 1, 1 << 30),
    Knob("number_ios", "int", 0, "I/Os after which the job ends (0: no limit)", 0),
    Knob(
        "random_distribution",
        "str",
        "random",
        "random, zipf:θ, pareto:h, normal:SIGMA, zoned:P/S:..., zoned_abs:P/SIZE:...",
        check=_check_distribution,
    ),
    Knob(
        "rate",
        "str",
        "",
        "Bytes/s caps per direction, READ,WRITE (0: none)",
        check=_check_pair,
    ),
    Knob(
        "rate_iops_rw",
        "str",
        "",
        "IOPS caps per direction, READ,WRITE (0: none)",
        check=_check_pair,
    ),
    Knob(
        "rate_process",
        "choice",
        "linear",
        "linear (even gaps) or poisson (exponential gaps, the same mean)",
        choices={"linear": "linear", "poisson": "poisson"},
    ),
    Knob("thinktime", "int", 0, "Microseconds to stall every thinktime_blocks I/Os", 0),
    Knob("thinktime_spin", "int", 0, "Microseconds of thinktime spent spinning", 0),
    Knob("thinktime_blocks", "int", 1, "I/Os between stalls", 1),
    Knob(
        "thinktime_blocks_type",
        "choice",
        "complete",
        "Count completed (complete) or issued (issue) I/Os",
        choices={"complete": "complete", "issue": "issue"},
    ),
    Knob("iodepth_low", "int", 0, "Refill only once in-flight I/Os drop to this (0: at once)", 0),
    Knob("norandommap", "bool", True, "Random offsets repeat (0: every block once per pass)"),
    Knob(
        "random_generator",
        "choice",
        "tausworthe",
        "tausworthe, tausworthe64 (numpy's PCG64 here) or lfsr (every block once per pass)",
        choices={"tausworthe": "tausworthe", "tausworthe64": "tausworthe64", "lfsr": "lfsr"},
    ),
)


class BsDist(NamedTuple):
    """One direction's block sizes: a range ``lo..hi`` (multiples of ``lo``), or a
    split: (size, percent) pairs."""

    lo: int
    hi: int
    split: tuple[tuple[int, int], ...] = ()


def parse_blocksizes(text: str) -> tuple[BsDist, BsDist]:
    """``READ,WRITE`` of :data:`JOB_FILE_KNOBS`' ``blocksizes``."""
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError(f"expected READ,WRITE, got {text!r}")
    out = []
    for part in parts:
        if "/" in part:
            split = parse_bssplit(part)
            sizes = [s for s, _ in split]
            out.append(BsDist(min(sizes), max(sizes), split))
        else:
            r = parse_size_range(part)
            out.append(BsDist(r.lo, r.hi))
    for d in out:
        for size in (d.lo, d.hi, *(s for s, _ in d.split)):
            if size < 512 or size % 512 or size > 1 << 24:
                raise ValueError(f"block size {size} is not a multiple of 512 in 512..16M")
    return out[0], out[1]


#: Completions folded into the histograms at a time: a fold is ~100 numpy calls, whose
#: fixed cost dominates below ~10k rows; 16384 rows of the job's sink are 896 KiB (the
#: 4096 tuples and ints this replaced took about as much).
FOLD_EVERY = 16384
_CHUNK = 4096


@dataclass(frozen=True)
class JobSpec:
    """A validated fio job."""

    rw: str
    bs: int
    iodepth: int
    iodepth_batch_submit: int
    rwmixread: int
    runtime: float
    ramp_time: float
    rate_iops: int
    size: int
    percentile_list: str
    randseed: int
    iodepth_batch_complete: int = 1
    time_based: bool = True
    hipri: bool = False
    clat_percentiles: bool = True
    lat_percentiles: bool = False
    slat_percentiles: bool = False
    bw_avg_time: int = 500
    iops_avg_time: int = 500
    write_lat_log: str = ""
    write_bw_log: str = ""
    write_iops_log: str = ""
    log_avg_msec: int = 0
    write_hist_log: str = ""
    log_hist_msec: int = 0
    log_hist_coarseness: int = 0
    blocksizes: str = ""
    rw_modifier: int = 0
    offset: int = 0
    offset_pct: float = 0.0
    size_pct: float = 0.0
    io_size: int = 0
    loops: int = 1
    number_ios: int = 0
    random_distribution: str = "random"
    norandommap: bool = True
    random_generator: str = "tausworthe"
    rate: str = ""
    rate_iops_rw: str = ""
    rate_process: str = "linear"
    thinktime: int = 0
    thinktime_spin: int = 0
    thinktime_blocks: int = 1
    thinktime_blocks_type: str = "complete"
    iodepth_low: int = 0
    offset_increment: int = 0

    @property
    def logging(self) -> bool:
        """Whether any of fio's per-I/O logs is asked for."""
        logs = (self.write_lat_log, self.write_bw_log, self.write_iops_log, self.write_hist_log)
        return any(logs)

    @classmethod
    def from_options(cls, given: dict[str, Any]) -> JobSpec:
        v = parse_knobs((*JOB_KNOBS, *JOB_FILE_KNOBS), given)
        if v["bs"] % 512:
            raise KnobError(f"bs: must be a multiple of 512, got {v['bs']}")
        if not v["time_based"] and not (
            v["size"] or v["size_pct"] or v["io_size"] or v["number_ios"]
        ):
            raise KnobError("time_based: 0 needs --size (the bytes each job does), at least bs")
        if not v["time_based"] and 0 < (v["io_size"] or v["size"]) < v["bs"]:
            raise KnobError("time_based: 0 needs --size (the bytes each job does), at least bs")
        return cls(**v)

    def clones(self, n: int) -> list[JobSpec]:
        """``n`` clones (numjobs), clone i starting at offset + i x offset_increment."""
        if not self.offset_increment:
            return [self] * n
        inc = self.offset_increment
        return [dataclasses.replace(self, offset=self.offset + i * inc) for i in range(n)]

    @property
    def dists(self) -> tuple[BsDist, BsDist]:
        """Read and write block sizes."""
        if self.blocksizes:
            return parse_blocksizes(self.blocksizes)
        return BsDist(self.bs, self.bs), BsDist(self.bs, self.bs)

    @property
    def min_bs(self) -> int:
        return min(d.lo for d in self.dists)

    @property
    def max_bs(self) -> int:
        return max(d.hi for d in self.dists)

    @property
    def batch(self) -> int:
        return self.iodepth_batch_submit or self.iodepth

    @property
    def random(self) -> bool:
        return self.rw.startswith("rand")

    @property
    def read_pct(self) -> int:
        if self.rw in ("read", "randread"):
            return 100
        if self.rw in ("write", "randwrite"):
            return 0
        return self.rwmixread


class IoLog:
    """What fio's latency, bandwidth and IOPS logs need of each I/O, recorded only
    when a log is asked for: completion time (ns since the measured part began),
    direction, size, slat, clat and lat; sent whole, averaged by the report."""

    __slots__ = ("chunks",)

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []

    def add(self, now, base: int, ops, nr, nbytes, start, issue) -> None:
        """Rows as :meth:`IoJob._fold` has them (each of ``nr`` I/Os of one size)."""
        slat = np.maximum(issue - start, 0)
        lat = np.maximum(now - start, 0)
        rows = np.stack([now - base, ops, nbytes // np.maximum(nr, 1), slat, lat - slat, lat])
        self.chunks.append(np.repeat(rows, nr, axis=1))

    def to_wire(self) -> bytes:
        rows = np.concatenate(self.chunks, axis=1) if self.chunks else np.zeros((6, 0), np.int64)
        self.chunks = [rows]
        return rows.astype("<i8").tobytes()


class DirStats:
    """One direction's counters and latency histograms."""

    __slots__ = ("clat", "errors", "ios", "lat", "nbytes", "requests", "slat", "ticks_ns")

    def __init__(self) -> None:
        self.ios = 0
        self.nbytes = 0
        self.errors = 0
        self.requests = 0  #: diskstats ios: requests completed (bios minus merges)
        self.ticks_ns = 0  #: diskstats ticks: the requests' time, start to completion
        self.clat = LatHist()
        self.slat = LatHist()
        self.lat = LatHist()

    def to_wire(self) -> dict[str, Any]:
        return {
            "ios": self.ios,
            "bytes": self.nbytes,
            "errors": self.errors,
            "requests": self.requests,
            "ticks_ns": self.ticks_ns,
            "clat": self.clat.to_bytes(),
            "slat": self.slat.to_bytes(),
            "lat": self.lat.to_bytes(),
        }


class IoJob:
    """One fio job on one CPU against one request queue."""

    def __init__(self, spec: JobSpec, cpu: int, q: int, dev_bytes: int, seed: int):
        self.spec = spec
        self.cpu = cpu
        self.q = q
        self.bs_sectors = spec.bs >> 9
        self.dists = spec.dists
        self.fixed = all(d.lo == d.hi == spec.bs for d in self.dists)
        self.unit = spec.min_bs >> 9  #: alignment of random offsets, in sectors
        start = spec.offset or int(dev_bytes * spec.offset_pct / 100)
        start -= start % spec.min_bs
        start = min(start, max(0, dev_bytes - spec.max_bs))
        span = spec.size or int(dev_bytes * spec.size_pct / 100) or dev_bytes - start
        span = min(span, dev_bytes - start)
        self.start = start >> 9  #: the region's first sector
        self.span = max(spec.max_bs, span) >> 9  #: the region's sectors
        self.nr_blocks = max(1, span // spec.bs)
        self.rng = np.random.default_rng([spec.randseed, seed, cpu, q])
        dist = parse_distribution(spec.random_distribution)
        self.sampler = BlockSampler(
            self.span // self.unit,
            self.rng,
            dist,
            (not spec.norandommap or spec.random_generator == "lfsr") and self.fixed,
            spec.min_bs,
        )
        self._offsets: list[int] = []
        self._ops: list[int] = []
        self._lens: list[int] = []
        self._next_block = 0
        self._pos = 0  #: next sequential sector, relative to start
        self._run_left = 0  #: rw=randread:N: sequential I/Os left before a random one
        #: the completions: one row per request (its first bio), stored flat until
        #: folded (C: the step every I/O takes)
        self._sink = BioSink(FOLD_EVERY, self.fold)
        self.done = self._sink.done
        self.inflight = 0
        self.submitted = 0
        self.submitted_bytes = 0
        # pacing: per-direction rate budgets and thinktime (0: none)
        self.rate_bytes = _pair(spec.rate)
        self.rate_iops = _pair(spec.rate_iops_rw)
        self.rated = any(self.rate_bytes) or any(self.rate_iops)
        self.poisson = spec.rate_process == "poisson"
        self.due_ns = [-1, -1]  #: per direction: when its next I/O may start
        self.think_ns = spec.thinktime * 1000
        self.spin_ns = min(spec.thinktime_spin, spec.thinktime) * 1000
        self.think_until = 0
        self._think_mark = 0  #: I/Os issued (or completed) at the last stall
        self.paced = self.rated or self.think_ns > 0
        self.draining = False  #: iodepth_low: waiting for the depth to drop
        #: I/Os this job does in all (0: no limit): number_ios, or io_size (size)
        #: times loops when not time_based, in I/Os of the smallest size
        self.limit = spec.number_ios
        self.limit_bytes = 0
        if not spec.time_based:
            self.limit_bytes = (spec.io_size or (self.span << 9)) * spec.loops
            if self.fixed:
                by_bytes = self.limit_bytes // spec.bs
                self.limit = min(self.limit, by_bytes) if self.limit else by_bytes
                self.limit_bytes = 0
        self.record_from_ns = 0
        #: I/Os submitted per in-flight depth after their submission (fio's io_u_map),
        #: submissions and reaps per batch size bucket (io_u_submit, io_u_complete)
        self.depth_counts = [0] * 65
        self.submit_counts = [0] * 7
        self.complete_counts = [0] * 7
        self._inflight_after = 0  #: in flight after the last submission
        self._bios: list[tuple] = []  #: the bios merged into them, one row each
        self._bios_ns: list[int] = []
        self.dirs = (DirStats(), DirStats())
        #: I/Os and bytes per direction per window (of the gcd of bw_avg_time and
        #: iops_avg_time) since the measured part began: fio's bw and iops samples
        self.window_ns = math.gcd(spec.bw_avg_time, spec.iops_avg_time) * 1_000_000
        self.win_ios = [np.zeros(0, np.int64), np.zeros(0, np.int64)]
        self.win_bytes = [np.zeros(0, np.int64), np.zeros(0, np.int64)]
        #: with a log asked for: every recorded I/O
        self.log = IoLog() if spec.logging else None

    # -- submission ----------------------------------------------------------------------------

    def allowed(self, now: int, n: int) -> tuple[int, int, int]:
        """Of ``n`` I/Os, how many may start now under rate and thinktime (charging
        their budgets), when to look again if none, and ns to spin first (the spun
        part of a thinktime that starts now)."""
        if now < self.think_until:
            return 0, self.think_until, 0
        spin = 0
        if self.think_ns:
            count = (
                self.submitted - self.inflight
                if self.spec.thinktime_blocks_type == "complete"
                else self.submitted
            )
            if count - self._think_mark >= self.spec.thinktime_blocks:
                self._think_mark = count
                self.think_until = now + self.think_ns
                if self.spin_ns < self.think_ns:
                    return 0, self.think_until, self.spin_ns
                spin = self.spin_ns  # all of it spun: then go on
            if self.spec.thinktime_blocks_type == "issue":
                n = min(n, self._think_mark + self.spec.thinktime_blocks - self.submitted)
        if not self.rated:
            return n, 0, spin
        if not self._offsets:
            self._refill()
        n = min(n, len(self._ops))
        due = self.due_ns
        k = 0
        start = now + spin
        if due[0] < 0:  # the first look: the budgets start now, nothing banked
            due[0] = due[1] = start
        mixed = 0 < self.spec.read_pct < 100
        while k < n:
            op = self._ops[-1 - k]
            if due[op] > start:
                if not mixed or due[1 - op] > start:
                    break
                # as fio does: a direction over its rate gives the turn to the other
                op = 1 - op
                self._ops[-1 - k] = op
                n_new = int(self._sizes(self.dists[op], 1)[0])
                self._lens[-1 - k] = n_new
                last = self.start + (self.span - n_new) // self.unit * self.unit
                self._offsets[-1 - k] = min(self._offsets[-1 - k], last)  # stays inside
            cost = 0.0
            if self.rate_bytes[op]:
                cost = (self._lens[-1 - k] << 9) * 1e9 / self.rate_bytes[op]
            if self.rate_iops[op]:
                cost = max(cost, 1e9 / self.rate_iops[op])
            if self.poisson and cost:
                cost *= float(self.rng.exponential())
            due[op] = max(due[op], start - 1_000_000_000) + int(cost)  # bank 1 s at most
            k += 1
        if k == 0:
            return 0, min(due) if mixed else due[self._ops[-1]], spin
        return k, 0, spin

    def remaining(self) -> int:
        """How many more I/Os the job may submit now (a large number: no limit)."""
        n = self.limit - self.submitted if self.limit else 1 << 30
        if self.limit_bytes:
            left = self.limit_bytes - self.submitted_bytes
            n = min(n, -(-left // self.spec.max_bs) if left > 0 else 0)
        return max(n, 0)

    def _refill(self) -> None:
        spec = self.spec
        fast = self.fixed and not spec.rw_modifier
        pct = spec.read_pct
        if fast:  # offsets first, then directions: the stream of a fixed-size job
            if spec.random:
                blocks = self.sampler.draw(_CHUNK)
            else:
                blocks = (np.arange(_CHUNK) + self._next_block) % self.nr_blocks
                self._next_block = int(blocks[-1]) + 1
            # popped from the end: stored last first
            self._offsets = (self.start + blocks[::-1] * self.bs_sectors).tolist()
            self._lens = [self.bs_sectors] * _CHUNK
            if pct in (0, 100):  # one direction: no draw, no array
                self._ops = [0 if pct else 1] * _CHUNK
                return
        if pct == 100:
            ops = np.zeros(_CHUNK, dtype=np.int64)
        elif pct == 0:
            ops = np.ones(_CHUNK, dtype=np.int64)
        else:
            ops = np.where(self.rng.integers(0, 100, _CHUNK) < pct, 0, 1)
        if fast:
            # a fixed-size job pairs them as it always has (any pairing of two
            # independent draws is as random)
            self._ops = ops.tolist()
            return
        lens = np.empty(_CHUNK, dtype=np.int64)
        for op in (0, 1):
            sel = ops == op
            if sel.any():
                lens[sel] = self._sizes(self.dists[op], int(sel.sum()))
        self._lens = lens.tolist()
        self._offsets = self._place(self._lens)
        # popped from the end, in order
        self._ops = ops[::-1].tolist()
        self._offsets.reverse()
        self._lens.reverse()

    def _sizes(self, dist: BsDist, n: int) -> np.ndarray:
        """``n`` block sizes of one direction, in sectors."""
        if dist.split:
            sizes = np.array([s for s, _ in dist.split]) >> 9
            weights = np.array([p for _, p in dist.split], dtype=float)
            return self.rng.choice(sizes, n, p=weights / weights.sum())
        lo = dist.lo >> 9
        if dist.hi == dist.lo:
            return np.full(n, lo)
        return lo * self.rng.integers(1, (dist.hi >> 9) // lo + 1, n)

    def _place(self, lens: list[int]) -> list[int]:
        """Offsets (sectors) for I/Os of these lengths, in order."""
        spec = self.spec
        unit, span, start = self.unit, self.span, self.start
        hole = spec.rw_modifier >> 9 if not spec.random else 0
        run = spec.rw_modifier if spec.random else 0
        draws = self.sampler.draw(len(lens)).tolist() if spec.random else []
        out = []
        pos = self._pos
        for i, n in enumerate(lens):
            if spec.random and self._run_left <= 0:
                pos = min(draws[i] * unit, (span - n) // unit * unit)
                self._run_left = max(run, 1)
            if pos + n > span:
                pos = 0  # past the region's end: back to its start
            elif pos < 0:
                pos = (span - n) // unit * unit  # before its start (backwards): the end
            out.append(start + pos)
            pos += n + hole
            self._run_left -= 1
        self._pos = pos
        return out

    def next_bio(self) -> tuple[int, int, int]:
        """(op, sector, nr_sectors) of the next I/O; counts it in flight."""
        if not self._offsets:
            self._refill()
        self.inflight += 1
        self.submitted += 1
        n = self._lens.pop()
        self.submitted_bytes += n << 9
        return self._ops.pop(), self._offsets.pop(), n

    def next_bios(self, n: int) -> tuple[list[int], list[int], list[int]]:
        """The next ``n`` I/Os at once, as :meth:`next_bio` hands them out one by one:
        their ops, sectors and lengths (three lists, in order); counts them in flight.
        One slice per list instead of three pops and a call per I/O."""
        if n <= 0:
            return [], [], []
        ops, offs, lens = self._ops, self._offsets, self._lens
        if len(offs) < n:  # the chunk runs out: the rest of it, then a new one
            k = len(offs)
            o1, s1, l1 = ops[::-1], offs[::-1], lens[::-1]
            ops.clear()
            offs.clear()
            lens.clear()
            self._refill()
            o2, s2, l2 = self.next_bios(n - k)
            self.inflight += k
            self.submitted += k
            self.submitted_bytes += sum(l1) << 9
            return o1 + o2, s1 + s2, l1 + l2
        # popped from the end: the last n, newest first
        stop = -n - 1
        o = ops[-1:stop:-1]
        s = offs[-1:stop:-1]
        ln = lens[-1:stop:-1]
        del ops[-n:], offs[-n:], lens[-n:]
        self.inflight += n
        self.submitted += n
        self.submitted_bytes += sum(ln) << 9
        return o, s, ln

    def mark_submit(self, n: int) -> None:
        """A batch of ``n`` I/Os was submitted: count them at the depth they made (as
        fio counts at its commit), the batch, and the completions reaped since the
        previous batch."""
        depth = self.inflight
        self.depth_counts[depth if depth < 64 else 64] += n
        self.submit_counts[batch_bucket(n)] += 1
        reaped = self._inflight_after - (depth - n)
        if reaped > 0:
            self.complete_counts[batch_bucket(reaped)] += 1
        self._inflight_after = depth

    # -- completion ----------------------------------------------------------------------------

    #: done(info, now): the bio of one request finished: info is (op, nr_bios, nbytes,
    #: start, issue, status), ``issue`` the request's first issue (the end of its slat).
    #: Its bios leave the depth; from record_from_ns on, the row and ``now`` join the
    #: rows folded every FOLD_EVERY (:meth:`fold`).  The bi_end_io of every I/O, so it
    #: is C (:class:`mqrt.workers._jobsink.BioSink`), set up in __init__.
    done: Callable[[tuple, int], None]

    @property
    def inflight(self) -> int:
        """I/Os submitted and not completed (kept by the sink)."""
        return self._sink.inflight

    @inflight.setter
    def inflight(self, value: int) -> None:
        self._sink.inflight = value

    @property
    def record_from_ns(self) -> int:
        """Completions from this time on are recorded (after ramp_time)."""
        return self._sink.record_from_ns

    @record_from_ns.setter
    def record_from_ns(self, value: int) -> None:
        self._sink.record_from_ns = value

    def done_merged(self, info: tuple, chain: tuple, now: int) -> None:
        """The bios of a merged request finished: ``info`` as :meth:`done` has it,
        ``chain`` the (start_ns, nr_sectors) of each bio after the first.  A row for
        the request (its first bio, at the request's start) and one for each bio
        merged into it, at its own start."""
        op, nr, nbytes, start, issue, status = info
        self.inflight -= nr
        if now < self.record_from_ns:
            return
        for bio_start, bio_sectors in chain:
            self._bios.append((op, 1, bio_sectors << 9, bio_start, issue, status))
            self._bios_ns.append(now)
            nbytes -= bio_sectors << 9
        # Bios whose own start is unknown (none here) take the request's.
        self._sink.record((op, nr - len(chain), nbytes, start, issue, status), now)

    def fold(self) -> None:
        """Move the recorded completions into the histograms (numpy, in bulk)."""
        sink = self._sink
        if sink.pending:
            rows = np.frombuffer(sink.take(), dtype=np.int64).reshape(-1, 7)
            ticks = self._fold(rows, requests=True)
            for op in (ReqOp.READ, ReqOp.WRITE):
                self.dirs[op].ticks_ns += ticks[op]
        if self._bios:
            rows = np.empty((len(self._bios), 7), dtype=np.int64)
            rows[:, :6] = self._bios
            rows[:, 6] = self._bios_ns
            self._bios.clear()
            self._bios_ns.clear()
            self._fold(rows, requests=False)

    def _fold(self, rows: np.ndarray, requests: bool) -> list[int]:
        """Fold ``rows`` ((op, nr_bios, bytes, start, issue, status, completion) each):
        I/Os, bytes, errors, latencies, and for rows that are requests their count;
        the requests' time per direction."""
        ops, nr, nbytes, start, issue, status, now = rows.T
        if self.log is not None:
            self.log.add(now, self.record_from_ns, ops, nr, nbytes, start, issue)
        ticks = [0, 0]
        for op in (ReqOp.READ, ReqOp.WRITE):
            sel = ops == op
            if not sel.any():
                continue
            d = self.dirs[op]
            reps = nr[sel]
            d.ios += int(reps.sum())
            d.nbytes += int(nbytes[sel].sum())
            d.errors += int(reps[status[sel] != BlkStatus.OK].sum())
            st, ist, nw = start[sel], issue[sel], now[sel]
            lat = np.maximum(nw - st, 0)
            d.slat.add_many(np.repeat(np.maximum(ist - st, 0), reps))
            d.clat.add_many(np.repeat(np.maximum(nw - ist, 0), reps))
            d.lat.add_many(np.repeat(lat, reps))
            self._count_windows(op, nw, reps, nbytes[sel])
            if requests:
                d.requests += int(sel.sum())
                ticks[op] = int(lat.sum())
        return ticks

    def _count_windows(self, op: int, now: np.ndarray, reps: np.ndarray, nbytes) -> None:
        win = (now - self.record_from_ns) // self.window_ns
        n = int(win.max()) + 1
        for arrs, weights in ((self.win_ios, reps), (self.win_bytes, nbytes)):
            counts = np.bincount(win, weights=weights, minlength=n).astype(np.int64)
            have = arrs[op]
            if have.size < n:
                have = np.concatenate([have, np.zeros(n - have.size, np.int64)])
            have[:n] += counts
            arrs[op] = have

    def to_wire(self) -> dict[str, Any]:
        self.fold()
        return {
            "cpu": self.cpu,
            "q": self.q,
            "submitted": self.submitted,
            "inflight": self.inflight,
            "depth_counts": self.depth_counts,
            "submit_counts": self.submit_counts,
            "complete_counts": self.complete_counts,
            "read": self.dirs[0].to_wire(),
            "write": self.dirs[1].to_wire(),
            "window_ms": self.window_ns // 1_000_000,
            "win_ios": [a.tolist() for a in self.win_ios],
            "win_bytes": [a.tolist() for a in self.win_bytes],
            **({"log": self.log.to_wire()} if self.log is not None else {}),
        }

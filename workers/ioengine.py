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

Deviations from fio
    * Offsets are generated in chunks with numpy (seeded per job), uniform over
      ``size``; there is no random map (``norandommap`` behaviour).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mqrt.block.blk_mq_types import BlkStatus, ReqOp
from mqrt.block.blk_stat import LatHist, batch_bucket, parse_percentile_list
from mqrt.lib.knobs import Knob, KnobError, parse_knobs

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
    Knob("rate_iops", "int", 0, "IOPS cap per job (0: no cap). Default: 0", 0, 1 << 30),
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

#: Samples folded into the histograms at a time.
FOLD_EVERY = 4096
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

    @property
    def logging(self) -> bool:
        """Whether any of fio's per-I/O logs is asked for."""
        logs = (self.write_lat_log, self.write_bw_log, self.write_iops_log, self.write_hist_log)
        return any(logs)

    @classmethod
    def from_options(cls, given: dict[str, Any]) -> JobSpec:
        v = parse_knobs(JOB_KNOBS, given)
        if v["bs"] % 512:
            raise KnobError(f"bs: must be a multiple of 512, got {v['bs']}")
        if not v["time_based"] and v["size"] < v["bs"]:
            raise KnobError("time_based: 0 needs --size (the bytes each job does), at least bs")
        return cls(**v)

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
        span = spec.size or dev_bytes
        self.nr_blocks = max(1, span // spec.bs)
        self.rng = np.random.default_rng([spec.randseed, seed, cpu, q])
        self._offsets: list[int] = []
        self._ops: list[int] = []
        self._next_block = 0
        self.inflight = 0
        self.submitted = 0
        #: I/Os this job does in all when not time_based (0: no limit)
        self.limit = 0 if spec.time_based else spec.size // spec.bs
        self.record_from_ns = 0
        #: I/Os submitted per in-flight depth after their submission (fio's io_u_map),
        #: submissions and reaps per batch size bucket (io_u_submit, io_u_complete)
        self.depth_counts = [0] * 65
        self.submit_counts = [0] * 7
        self.complete_counts = [0] * 7
        self._inflight_after = 0  #: in flight after the last submission
        self._done: list[tuple] = []  #: one row per request: its first bio
        self._done_ns: list[int] = []
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

    def _refill(self) -> None:
        spec = self.spec
        if spec.random:
            blocks = self.rng.integers(0, self.nr_blocks, _CHUNK)
        else:
            blocks = (np.arange(_CHUNK) + self._next_block) % self.nr_blocks
            self._next_block = int(blocks[-1]) + 1
        self._offsets = (blocks * self.bs_sectors).tolist()
        self._offsets.reverse()
        pct = spec.read_pct
        if pct == 100:
            self._ops = [ReqOp.READ] * _CHUNK
        elif pct == 0:
            self._ops = [ReqOp.WRITE] * _CHUNK
        else:
            self._ops = np.where(self.rng.integers(0, 100, _CHUNK) < pct, 0, 1).tolist()

    def next_bio(self) -> tuple[int, int, int]:
        """(op, sector, nr_sectors) of the next I/O; counts it in flight."""
        if not self._offsets:
            self._refill()
        self.inflight += 1
        self.submitted += 1
        return self._ops.pop(), self._offsets.pop(), self.bs_sectors

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

    def done(self, info: tuple, now: int) -> None:
        """The bio of one request finished: (op, nr_bios, nbytes, start, issue,
        status), ``issue`` the request's first issue (the end of its slat)."""
        self.inflight -= info[1]
        if now >= self.record_from_ns:
            self._done.append(info)
            self._done_ns.append(now)
            if len(self._done) >= FOLD_EVERY:
                self.fold()

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
        self._done.append((op, nr - len(chain), nbytes, start, issue, status))
        self._done_ns.append(now)
        if len(self._done) >= FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        """Move the recorded completions into the histograms (numpy, in bulk)."""
        if self._done:
            ticks = self._fold(self._done, self._done_ns, requests=True)
            for op in (ReqOp.READ, ReqOp.WRITE):
                self.dirs[op].ticks_ns += ticks[op]
        if self._bios:
            self._fold(self._bios, self._bios_ns, requests=False)

    def _fold(self, rows: list[tuple], rows_ns: list[int], requests: bool) -> list[int]:
        """Fold ``rows`` (cleared): I/Os, bytes, errors, latencies, and for rows that
        are requests their count; the requests' time per direction."""
        arr = np.array(rows, dtype=np.int64)
        now = np.array(rows_ns, dtype=np.int64)
        rows.clear()
        rows_ns.clear()
        ops, nr, nbytes, start, issue, status = arr.T
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

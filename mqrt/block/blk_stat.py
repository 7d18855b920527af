"""Latency statistics in fio's log-linear histogram, and builders for fio-shaped JSON.

This is mqrt's counterpart of fio's ``stat.c`` histogram code and of the role
``block/blk-stat.c`` plays in the kernel: workers accumulate completion latencies per
direction (cheaply, in fixed bins plus exact min/max/sum), the pieces are shipped across
processes and merged, like ``blk_rq_stat_sum()`` folding per-CPU buckets, and the result
is reported the way fio does.

fio facts followed
    * Bins: ``PLAT_BITS = 6``, ``PLAT_VAL = 64``, ``PLAT_GROUP_NR = 29``, so 1856 bins.
      Values below 128 ns get a bin each; above, every power-of-two group is cut into 64
      equal bins, so a bin's width is under 1/64 of its values.  Values of 2**34 ns
      (about 17.2 s) and more clamp into the last bin.
    * A bin's value is its midpoint (``plat_idx_to_val``).  fio returns it as an unsigned
      long long, i.e. truncated, so every integer we report (percentiles, json+ ``bins``
      keys) is ``int()`` of the midpoint.
    * Percentiles: the list is sorted, bins are walked accumulating counts, and percentile
      p is the value of the first bin whose running count is ``>= p / 100.0 * N``.
      Keys are ``"%f"`` of p; at most 20 entries, each ``0 < p <= 100``.
    * Standard deviations are sample deviations (``n - 1`` denominator, 0 when n < 2).
    * ``latency_ns/us/ms`` buckets (``io_u_lat_n/u/m``): a latency below 1000 ns goes to
      the ns table, else below 1 ms to the us table (after integer division by 1000),
      else to the ms table (after integer division by 10**6).  Within its table it goes
      to the smallest key K with ``value < K``; 2000 ms and beyond go to ``">=2000"``.
      Values are percentages of all I/Os, so the three tables together sum to 100.
    * ``iodepth_level`` keys are lower bounds: depth 1 -> "1", 2..3 -> "2", 4..7 -> "4",
      ... 32..63 -> "32", 64 and more -> ">=64".
    * Per-direction JSON: ``bw_bytes = 1000 * io_bytes // runtime_ms``, ``bw = bw_bytes //
      1024`` (KiB/s), ``iops = 1000.0 * total_ios / runtime_ms``; all zero when runtime is 0.

Deviations
    * Variance is accumulated per chunk and combined with Chan et al.'s parallel formula
      (fio uses Welford per sample); equal up to rounding, and stable for large means.
      ``sumsq`` is therefore derived from that (a read-only property), not summed.
    * ``latency_buckets`` is computed from the histogram, not counted per I/O: each bin
      is placed by its (truncated) midpoint.  Edges below 128 ns are exact; a bin that
      straddles a larger edge (e.g. 750 ns, 10 us) lands wholly on its midpoint's side.
    * Tables of percentages show a nonzero share under fio's floor at the floor:
      0.1 for ``iodepth_*``, 0.01 for ``latency_*`` (so they may sum a little over 100).
    * ``bw_agg`` is the mean sample's share of the job's own bandwidth (fio: of its
      reporting group's), at most 100.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

PLAT_BITS = 6
PLAT_VAL = 1 << PLAT_BITS
PLAT_GROUP_NR = 29
PLAT_NR = PLAT_GROUP_NR * PLAT_VAL
MAX_PERCENTILES = 20

DEFAULT_PERCENTILES: tuple[float, ...] = (
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0,
    90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99,
)  # fmt: skip

# The smallest value that clamps into the last bin: its msb would give base >= PLAT_NR.
_CLAMP_VAL = 1 << (PLAT_GROUP_NR + PLAT_BITS - 1)
_WIRE_VERSION = 1

_LAT_KEYS = ("2", "4", "10", "20", "50", "100", "250", "500", "750", "1000")
_LAT_MS_KEYS = (*_LAT_KEYS, "2000", ">=2000")
# Exclusive upper edges in ns of every bucket but ">=2000": v // unit < K <=> v < K * unit.
_LAT_EDGES_NS = np.array(
    [int(k) * unit for unit, keys in ((1, _LAT_KEYS), (1000, _LAT_KEYS)) for k in keys]
    + [int(k) * 1_000_000 for k in _LAT_MS_KEYS[:-1]],
    dtype=np.int64,
)
_DEPTH_KEYS = ("1", "2", "4", "8", "16", "32", ">=64")
_DEPTH_LOWER = np.array([1, 2, 4, 8, 16, 32, 64], dtype=np.int64)


def plat_val_to_idx(val: int) -> int:
    """fio's bin index of a value (ns): exact below 128, log-linear above, clamped."""
    if val < 0:
        raise ValueError(f"latency must be >= 0, got {val}")
    msb = max(val.bit_length() - 1, 0)
    if msb <= PLAT_BITS:
        return val
    error_bits = msb - PLAT_BITS
    base = (error_bits + 1) << PLAT_BITS
    offset = (PLAT_VAL - 1) & (val >> error_bits)
    return min(base + offset, PLAT_NR - 1)


def plat_idx_to_val(idx: int) -> float:
    """The midpoint of bin ``idx`` (fio truncates it to an integer; see module notes)."""
    if not 0 <= idx < PLAT_NR:
        raise ValueError(f"bin index must be in [0, {PLAT_NR}), got {idx}")
    if idx < (PLAT_VAL << 1):
        return float(idx)
    error_bits = (idx >> PLAT_BITS) - 1
    base = 1 << (error_bits + PLAT_BITS)
    k = idx % PLAT_VAL
    return base + (k + 0.5) * (1 << error_bits)


# Truncated midpoint of every bin, as fio reports it, and its latency_* bucket.
_BIN_VALUES = np.array([int(plat_idx_to_val(i)) for i in range(PLAT_NR)], dtype=np.int64)
_BIN_LAT_BUCKET = np.searchsorted(_LAT_EDGES_NS, _BIN_VALUES, side="right")


def _as_latencies(values: np.ndarray | Sequence[int]) -> np.ndarray:
    """Values as a 1-d non-negative integer array (int64 or uint64)."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu":
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        raise TypeError(f"latencies must be integers (ns), got dtype {arr.dtype}")
    arr = arr.ravel()
    if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
        raise ValueError(f"latencies must be >= 0, got {int(arr.min())}")
    return arr


def plat_idx_array(values: np.ndarray) -> np.ndarray:
    """Vectorised :func:`plat_val_to_idx` for an integer array; returns int64 indices."""
    arr = _as_latencies(values)
    big = arr >= _CLAMP_VAL
    # Below 2**34 every value is exact in float64, so frexp gives the exact msb.
    small = np.where(big, 0, arr).astype(np.int64)
    _, exp = np.frexp(small.astype(np.float64))
    msb = np.maximum(exp.astype(np.int64) - 1, 0)
    error_bits = np.maximum(msb - PLAT_BITS, 0)
    base = (error_bits + 1) << PLAT_BITS
    offset = (PLAT_VAL - 1) & (small >> error_bits)
    idx = np.where(msb <= PLAT_BITS, small, base + offset)
    return np.where(big, PLAT_NR - 1, np.minimum(idx, PLAT_NR - 1)).astype(np.int64)


def _check_percentile(p: float, text: str) -> float:
    if not 0.0 < p <= 100.0:  # also rejects NaN
        raise ValueError(f"percentile_list: bad entry {text!r}: each must satisfy 0 < p <= 100")
    return p


def _check_plist(plist: Sequence[float]) -> list[float]:
    if len(plist) > MAX_PERCENTILES:
        raise ValueError(f"percentile_list: at most {MAX_PERCENTILES} percentiles")
    return sorted(_check_percentile(float(p), str(p)) for p in plist)


def parse_percentile_list(text: str) -> tuple[float, ...]:
    """Parse fio's ``percentile_list`` syntax (``"1:5:99.9"``) into floats, in order."""
    entries = text.split(":")
    if len(entries) > MAX_PERCENTILES:
        raise ValueError(f"percentile_list: at most {MAX_PERCENTILES} percentiles")
    out = []
    for entry in entries:
        try:
            p = float(entry)
        except ValueError:
            p = math.nan
        out.append(_check_percentile(p, entry))
    return tuple(out)


def _pct_key(p: float) -> str:
    return f"{p:f}"


def _sum_exact(arr: np.ndarray) -> int:
    """Exact sum of non-negative integers, immune to 64-bit overflow (32-bit halves)."""
    u = arr.astype(np.uint64)
    hi = int(np.sum(u >> np.uint64(32), dtype=np.uint64))
    lo = int(np.sum(u & np.uint64(0xFFFFFFFF), dtype=np.uint64))
    return (hi << 32) + lo


class LatHist:
    """Latency histogram in fio's bins plus exact min/max/sum/sum of squares."""

    __slots__ = ("bins", "m2", "max", "min", "n", "sum")

    def __init__(self) -> None:
        self.bins: np.ndarray = np.zeros(PLAT_NR, dtype=np.uint64)
        self.n: int = 0
        self.min: int = 0
        self.max: int = 0
        self.sum: int = 0
        self.m2: float = 0.0  # sum of squared deviations from the mean

    def __repr__(self) -> str:
        return f"LatHist(n={self.n}, min={self.min}, max={self.max}, mean={self.mean():.1f})"

    @property
    def sumsq(self) -> float:
        """Sum of squares of all values (derived from the stable accumulators)."""
        return self.m2 + (self.sum * self.sum / self.n if self.n else 0.0)

    def _combine(self, n: int, vmin: int, vmax: int, vsum: int, m2: float) -> None:
        """Fold in another population's moments (Chan et al.)."""
        if n == 0:
            return
        if self.n == 0:
            self.min, self.max = vmin, vmax
            self.m2 = m2
        else:
            self.min, self.max = min(self.min, vmin), max(self.max, vmax)
            delta = vsum / n - self.sum / self.n
            self.m2 += m2 + delta * delta * self.n * n / (self.n + n)
        self.n += n
        self.sum += vsum

    def add_many(self, values: np.ndarray | Sequence[int]) -> None:
        """Add latencies in ns (non-negative integers)."""
        arr = _as_latencies(values)
        if arr.size == 0:
            return
        counts = np.bincount(plat_idx_array(arr), minlength=PLAT_NR)
        self.bins += counts.astype(np.uint64)
        vsum = _sum_exact(arr)
        dev = arr.astype(np.float64) - vsum / arr.size
        self._combine(arr.size, int(arr.min()), int(arr.max()), vsum, float(np.dot(dev, dev)))

    def add(self, value: int) -> None:
        """Add one latency in ns."""
        value = int(value)
        self.bins[plat_val_to_idx(value)] += np.uint64(1)
        self._combine(1, value, value, value, 0.0)

    def merge(self, other: LatHist) -> None:
        """Fold ``other`` into this histogram (like summing per-CPU blk_rq_stat)."""
        self.bins += other.bins
        self._combine(other.n, other.min, other.max, other.sum, other.m2)

    def mean(self) -> float:
        """Exact-sum mean in ns; 0.0 when empty."""
        return self.sum / self.n if self.n else 0.0

    def stddev(self) -> float:
        """Sample standard deviation (n - 1 denominator, as fio); 0.0 when n < 2."""
        return math.sqrt(max(self.m2, 0.0) / (self.n - 1)) if self.n >= 2 else 0.0

    def percentiles(self, plist: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, int]:
        """fio's percentiles: ``{"99.000000": ns, ...}`` in ascending order; {} when empty."""
        ps = _check_plist(plist)
        if self.n == 0 or not ps:
            return {}
        cum = np.cumsum(self.bins).astype(np.float64)
        thresholds = np.array(ps, dtype=np.float64) / 100.0 * self.n
        idx = np.minimum(np.searchsorted(cum, thresholds, side="left"), PLAT_NR - 1)
        return {_pct_key(p): int(_BIN_VALUES[i]) for p, i in zip(ps, idx, strict=True)}

    def to_bytes(self) -> bytes:
        """Compact msgpack encoding (only nonzero bins), for sending across processes."""
        nz = np.flatnonzero(self.bins)
        sum_bytes = self.sum.to_bytes(max(1, (self.sum.bit_length() + 7) // 8), "little")
        fields = [_WIRE_VERSION, self.n, self.min, self.max, sum_bytes, self.m2]
        fields += [nz.astype("<u2").tobytes(), self.bins[nz].astype("<u8").tobytes()]
        return msgpack.packb(fields)

    @classmethod
    def from_bytes(cls, b: bytes) -> LatHist:
        """Inverse of :meth:`to_bytes`."""
        fields = msgpack.unpackb(b)
        if not isinstance(fields, list) or len(fields) != 8 or fields[0] != _WIRE_VERSION:
            raise ValueError("LatHist.from_bytes: not a version-1 LatHist encoding")
        _, n, vmin, vmax, sum_bytes, m2, idx_bytes, count_bytes = fields
        idx = np.frombuffer(idx_bytes, dtype="<u2")
        counts = np.frombuffer(count_bytes, dtype="<u8")
        if idx.size != counts.size or (idx.size and int(idx.max()) >= PLAT_NR):
            raise ValueError("LatHist.from_bytes: corrupt bin table")
        h = cls()
        h.bins[idx.astype(np.intp)] = counts
        h.n, h.min, h.max, h.m2 = int(n), int(vmin), int(vmax), float(m2)
        h.sum = int.from_bytes(sum_bytes, "little")
        return h

    def fio_json(
        self, plist: Sequence[float] | None = DEFAULT_PERCENTILES, bins: bool = False
    ) -> dict[str, Any]:
        """fio's ``clat_ns``-style object; ``plist=None`` omits percentiles, ``bins=True``
        adds json+ ``bins`` (``{bin value: count}`` of nonzero bins)."""
        out: dict[str, Any] = {
            "min": self.min,
            "max": self.max,
            "mean": self.mean(),
            "stddev": self.stddev(),
            "N": self.n,
        }
        if self.n == 0:
            return out
        if plist is not None:
            out["percentile"] = self.percentiles(plist)
        if bins:
            nz = np.flatnonzero(self.bins)
            out["bins"] = {str(int(_BIN_VALUES[i])): int(self.bins[i]) for i in nz}
        return out

    def latency_buckets(
        self,
    ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """fio's (latency_ns, latency_us, latency_ms) percentages, from the bins
        (approximate near edges above 128 ns; see module notes)."""
        per_bucket = np.bincount(
            _BIN_LAT_BUCKET, weights=self.bins.astype(np.float64), minlength=len(_LAT_EDGES_NS) + 1
        )
        pct = per_bucket * (100.0 / self.n) if self.n else per_bucket * 0.0
        pct = np.where((pct < 0.01) & (per_bucket > 0), 0.01, pct)  # fio's floor
        nk = len(_LAT_KEYS)
        ns = dict(zip(_LAT_KEYS, map(float, pct[:nk]), strict=True))
        us = dict(zip(_LAT_KEYS, map(float, pct[nk : 2 * nk]), strict=True))
        ms = dict(zip(_LAT_MS_KEYS, map(float, pct[2 * nk :]), strict=True))
        return ns, us, ms


def _dist(counts: np.ndarray, keys: Sequence[str]) -> dict[str, float]:
    """fio's ``stat_calc_dist``: percentages of the total, a nonzero share below 0.1%
    shown as 0.1; all zeros when there is nothing."""
    total = counts.sum()
    pct = counts * (100.0 / total) if total else counts * 0.0
    pct = np.where((pct < 0.1) & (counts > 0), 0.1, pct)
    return dict(zip(keys, map(float, pct), strict=True))


def iodepth_level(depth_counts: Mapping[int, int]) -> dict[str, float]:
    """fio's ``iodepth_level`` from ``{in-flight depth: I/Os submitted at it}``, the
    depth counted as fio does, with the I/Os being submitted (depth 0 is counted as
    "1").  Percentages of all submitted I/Os (all zeros when there are none)."""
    levels = np.zeros(len(_DEPTH_KEYS), dtype=np.float64)
    for depth, count in depth_counts.items():
        if depth < 0 or count < 0:
            raise ValueError(f"iodepth_level: negative depth or count ({depth}: {count})")
        levels[max(int(np.searchsorted(_DEPTH_LOWER, depth, side="right")) - 1, 0)] += count
    return _dist(levels, _DEPTH_KEYS)


#: ``iodepth_submit``/``iodepth_complete`` keys: I/Os per submission (or per reap)
#: of 0, 1..4, 5..8, 9..16, 17..32, 33..64, more.
BATCH_KEYS = ("0", "4", "8", "16", "32", "64", ">=64")


def batch_bucket(nr: int) -> int:
    """Index in :data:`BATCH_KEYS` of a submission (or reap) of ``nr`` I/Os."""
    if nr <= 4:
        return 1 if nr > 0 else 0
    return min((nr - 1).bit_length() - 1, 6)


def batch_dist(counts: Sequence[int]) -> dict[str, float]:
    """fio's ``iodepth_submit``/``iodepth_complete`` from counts per bucket."""
    return _dist(np.asarray(counts, dtype=np.float64), BATCH_KEYS)


#: (min, max, mean, sample stddev, count) of bandwidth or IOPS samples.
SampleStat = tuple[int, int, float, float, int]


def _share(bw_mean_kib: float, bw_bytes: int) -> float:
    """fio's ``bw_agg``: the mean sample's share of the group's bandwidth, at most 100."""
    if bw_bytes <= 1024:
        return 100.0
    return min(100.0, bw_mean_kib * 100.0 / (bw_bytes / 1024.0))


def group_samples(per_job: Sequence[Sequence[float]]) -> SampleStat:
    """The samples of jobs reported as one (fio's group_reporting): each job's
    minimum, maximum, mean and sum of squared deviations added up, and their counts,
    as fio sums bandwidth and IOPS statistics; zeros when there are none."""
    lo = hi = 0
    mean = ssd = 0.0
    n = 0
    for samples in per_job:
        arr = np.asarray(samples, dtype=np.float64)
        if not arr.size:
            continue
        lo += int(arr.min())
        hi += int(arr.max())
        mean += float(arr.mean())
        ssd += float(((arr - arr.mean()) ** 2).sum())
        n += arr.size
    dev = math.sqrt(ssd / (n - 1)) if n > 1 else 0.0
    return lo, hi, mean, dev, n


def _sample_stats(samples: Sequence[float]) -> tuple[int, int, float, float, int]:
    """(min, max, mean, sample stddev, count) of samples, zeros when there are none."""
    arr = np.asarray(samples, dtype=np.float64)
    if arr.size == 0:
        return 0, 0, 0.0, 0.0, 0
    dev = float(np.std(arr, ddof=1)) if arr.size > 1 else 0.0
    return int(arr.min()), int(arr.max()), float(arr.mean()), dev, int(arr.size)


def dir_stats_json(
    *,
    io_bytes: int,
    runtime_ms: int,
    total_ios: int,
    clat: LatHist,
    lat: LatHist,
    slat: LatHist,
    plist: Sequence[float] = DEFAULT_PERCENTILES,
    percentiles: tuple[bool, bool, bool] = (False, True, False),
    bins: bool = False,
    short_ios: int = 0,
    drop_ios: int = 0,
    iops_samples: Sequence[float] = (),
    bw_samples_kib: Sequence[float] = (),
    bw_stat: SampleStat | None = None,
    iops_stat: SampleStat | None = None,
) -> dict[str, Any]:
    """fio's per-direction object (``"read"``/``"write"``), every key present even when
    the direction did nothing.  ``percentiles`` says which of slat, clat and lat carry
    them (fio's ``slat_percentiles``, ``clat_percentiles``, ``lat_percentiles``);
    ``bins`` (json+) adds the histogram to those that do."""
    if min(io_bytes, runtime_ms, total_ios, short_ios, drop_ios) < 0:
        raise ValueError("dir_stats_json: byte, time and I/O counts must be >= 0")
    bw_bytes = 1000 * io_bytes // runtime_ms if runtime_ms else 0
    iops = 1000.0 * total_ios / runtime_ms if runtime_ms else 0.0
    bw_min, bw_max, bw_mean, bw_dev, bw_n = bw_stat or _sample_stats(bw_samples_kib)
    io_min, io_max, io_mean, io_dev, io_n = iops_stat or _sample_stats(iops_samples)
    return {
        "io_bytes": io_bytes,
        "io_kbytes": io_bytes // 1024,
        "bw_bytes": bw_bytes,
        "bw": bw_bytes // 1024,
        "iops": iops,
        "runtime": runtime_ms,
        "total_ios": total_ios,
        "short_ios": short_ios,
        "drop_ios": drop_ios,
        "slat_ns": slat.fio_json(plist if percentiles[0] else None, bins and percentiles[0]),
        "clat_ns": clat.fio_json(plist if percentiles[1] else None, bins and percentiles[1]),
        "lat_ns": lat.fio_json(plist if percentiles[2] else None, bins and percentiles[2]),
        "bw_min": bw_min,
        "bw_max": bw_max,
        "bw_agg": _share(bw_mean, bw_bytes) if bw_n else 0.0,
        "bw_mean": bw_mean,
        "bw_dev": bw_dev,
        "bw_samples": bw_n,
        "iops_min": io_min,
        "iops_max": io_max,
        "iops_mean": io_mean,
        "iops_stddev": io_dev,
        "iops_samples": io_n,
    }


def percentile_precision(text: str) -> int:
    """Decimals fio prints a percentile with: the most any entry of ``percentile_list``
    has (``"1:50:99"`` -> 0, ``"99.999"`` -> 3); 2 for fio's default list."""
    if not text:
        return 2
    return max(len(e.partition(".")[2]) for e in text.split(":"))


def percentile_unit(values: Sequence[int]) -> tuple[str, int, int]:
    """fio's unit for a percentile table, from its smallest and largest value (ns):
    msec when the smallest is over 2 ms and the largest over 99.999999 ms, usec when
    the smallest is over 2 us and the largest over 99.999 us, else nsec.  Returns
    (unit, divisor, steps): each value is rounded up to the unit ``steps`` times by
    thousands, so none prints smaller than it is."""
    lo, hi = min(values), max(values)
    if lo > 2_000_000 and hi > 99_999_999:
        return "msec", 1_000_000, 2
    if lo > 2000 and hi > 99_999:
        return "usec", 1000, 1
    return "nsec", 1, 0


def format_percentiles_text(pct: Mapping[str, int], name: str = "clat", precision: int = 2) -> str:
    """fio's percentile table of one latency (``name``: clat, slat or lat): its header
    with the unit fio chooses, then as many entries per line as fit 80 columns; ""
    when ``pct`` is empty."""
    items = sorted((float(k), int(v)) for k, v in pct.items())
    if not items:
        return ""
    unit, divisor, steps = percentile_unit([v for _, v in items])
    hi = max(v for _, v in items)
    width = max(5, int(math.log10(hi // divisor)) + 1 if hi // divisor else 5)
    per_line = (80 - 7) // (precision + 10 + width)
    cells = []
    for p, value in items:
        shown = value
        for _ in range(steps):
            shown = (shown + 999) // 1000
        cells.append(f" {p:{precision + 3}.{precision}f}th=[{shown:{width}d}]")
    lines = [",".join(cells[i : i + per_line]) for i in range(0, len(cells), per_line)]
    return f"    {name} percentiles ({unit}):\n" + ",\n".join(f"     |{ln}" for ln in lines) + "\n"

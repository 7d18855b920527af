"""fio's latency, bandwidth and IOPS logs (``write_lat_log``, ``write_bw_log``,
``write_iops_log``, ``log_avg_msec``), in fio 3.33's text format, from the I/Os the
CPUs recorded.

fio facts followed
    * One file per job and log, the job's number (from 1) before ``.log``:
      ``NAME_clat.N.log``, ``NAME_slat.N.log``, ``NAME_lat.N.log``, ``NAME_bw.N.log``,
      ``NAME_iops.N.log``.  mqrt's jobs are the CPUs' jobs on each device (fio's
      ``numjobs`` clones), numbered device by device, CPU by CPU, and on through the
      sections of a job file, as fio numbers all of a file's jobs.
    * A line is ``time, value, direction, block size, priority``: time in ms since the
      job's measured part began, direction 0 read / 1 write, priority 0.
    * Without ``log_avg_msec``, a line per I/O: latencies in ns, bandwidth the I/O's
      bytes over its total latency (bytes * 10**6 / ns), IOPS 1.
    * With ``log_avg_msec=W``, a line per window of W ms and direction that had I/O,
      at the window's end, block size 0: the mean latency (ns), the bandwidth in KiB/s
      and the IOPS over the window.
    * ``write_hist_log=NAME`` writes ``NAME_clat_hist.N.log``: per ``log_hist_msec``
      window and direction with I/O, ``time, direction, block size`` and the window's
      completion latencies counted in fio's 1856 bins (``log_hist_coarseness=C``
      sums 2**C neighbours); nothing when ``log_hist_msec`` is 0, as fio.

Deviations
    * No ``log_offset`` (the offset column): the completions do not carry it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mqrt.block.blk_stat import PLAT_NR, plat_idx_array

#: Columns of a CPU's recorded I/Os (workers.ioengine.IoLog).
T, DDIR, BS, SLAT, CLAT, LAT = range(6)
_LAT_COLS = {"slat": SLAT, "clat": CLAT, "lat": LAT}


def job_logs(result) -> list[np.ndarray]:
    """Each job's recorded I/Os, (6, n) sorted by time: device by device, CPU by CPU
    (empty for a job that recorded none)."""
    out = []
    for q in range(len(result.queues)):
        for cpu in sorted(result.cpus, key=lambda c: c["cpu"]):
            raw = cpu["jobs"][q].get("log", b"")
            rows = np.frombuffer(raw, dtype="<i8").reshape(6, -1)
            out.append(rows[:, np.argsort(rows[T], kind="stable")])
    return out


def _per_io(rows: np.ndarray, kind: str) -> np.ndarray:
    """(time ms, value, ddir, bs) of every I/O."""
    if kind in _LAT_COLS:
        value = rows[_LAT_COLS[kind]]
    elif kind == "bw":
        value = rows[BS] * 1_000_000 // np.maximum(rows[LAT], 1)
    else:
        value = np.ones(rows.shape[1], dtype=np.int64)
    return np.stack([rows[T] // 1_000_000, value, rows[DDIR], rows[BS]])


def _averaged(rows: np.ndarray, kind: str, avg_msec: int) -> np.ndarray:
    """(window end ms, value, ddir, 0) of every window and direction with I/O."""
    window = rows[T] // (avg_msec * 1_000_000)
    key = window * 2 + rows[DDIR]
    keys, first, count = np.unique(key, return_index=True, return_counts=True)
    if kind in _LAT_COLS:
        value = np.add.reduceat(rows[_LAT_COLS[kind]], first) // count if keys.size else keys
    elif kind == "bw":
        nbytes = np.add.reduceat(rows[BS], first) if keys.size else keys
        value = nbytes * 1000 // avg_msec // 1024
    else:
        value = count * 1000 // avg_msec
    return np.stack([(keys // 2 + 1) * avg_msec, value, keys % 2, np.zeros_like(keys)])


def log_lines(rows: np.ndarray, kind: str, avg_msec: int) -> np.ndarray:
    """The lines of one job's log of ``kind`` (clat, slat, lat, bw, iops), as a
    (n, 4) array: time, value, direction, block size."""
    if rows.shape[1] and avg_msec:
        table = _averaged(rows, kind, avg_msec)
    elif rows.shape[1]:
        table = _per_io(rows, kind)
    else:
        table = np.zeros((4, 0), dtype=np.int64)
    return table.T


def hist_lines(rows: np.ndarray, hist_msec: int, coarseness: int) -> np.ndarray:
    """fio's ``clat_hist`` log of one job: per window of ``hist_msec`` and direction
    with I/O, (window end ms, direction, block size, the window's completion
    latencies counted in fio's bins, ``2**coarseness`` bins summed at a time)."""
    stride = 1 << coarseness
    if not rows.shape[1] or not hist_msec:
        return np.zeros((0, 3 + PLAT_NR // stride), dtype=np.int64)
    window = rows[T] // (hist_msec * 1_000_000)
    key = window * 2 + rows[DDIR]
    keys, inverse = np.unique(key, return_inverse=True)
    bins = np.zeros((keys.size, PLAT_NR), dtype=np.int64)
    np.add.at(bins, (inverse, plat_idx_array(rows[CLAT])), 1)
    last = np.zeros(keys.size, dtype=np.int64)
    last[inverse] = rows[BS]  # the block size of each window's last I/O
    head = np.stack([(keys // 2 + 1) * hist_msec, keys % 2, last], axis=1)
    return np.concatenate([head, bins.reshape(keys.size, -1, stride).sum(axis=2)], axis=1)


def write_logs(result, job: Any, directory: Path | str = ".", first: int = 1) -> list[Path]:
    """Write the logs ``job`` asks for, one per job of the run, numbered from
    ``first``; the paths written."""
    wanted = []
    if job.write_lat_log:
        wanted += [(job.write_lat_log, k) for k in ("clat", "slat", "lat")]
    if job.write_bw_log:
        wanted.append((job.write_bw_log, "bw"))
    if job.write_iops_log:
        wanted.append((job.write_iops_log, "iops"))
    written = []
    for index, rows in enumerate(job_logs(result), start=first):
        if job.write_hist_log:
            path = Path(directory) / f"{job.write_hist_log}_clat_hist.{index}.log"
            table = hist_lines(rows, job.log_hist_msec, job.log_hist_coarseness)
            with open(path, "w") as f:
                f.write("".join(", ".join(map(str, line)) + "\n" for line in table.tolist()))
            written.append(path)
        for name, kind in wanted:
            path = Path(directory) / f"{name}_{kind}.{index}.log"
            table = log_lines(rows, kind, job.log_avg_msec)
            t, value, ddir, bs = table.T.tolist()
            with open(path, "w") as f:
                f.write(
                    "".join(
                        f"{a}, {b}, {c}, {d}, 0\n"
                        for a, b, c, d in zip(t, value, ddir, bs, strict=True)
                    )
                )
            written.append(path)
    return written

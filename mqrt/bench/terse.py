"""fio's terse output, version 3 (``--output-format terse``): one line of
semicolon-separated fields per job, as fio 3.33 writes it, from the job's fio JSON.

Per direction (read, then write): KiB, KiB/s, IOPS, runtime ms; slat, clat and lat
as min;max;mean;stddev in usec; twenty ``P%=usec`` percentile fields (of lat with
``lat_percentiles``, else of clat, ``0%=0`` when there are fewer); bandwidth samples
min;max;share;mean;stddev.  Then CPU, the IO depths, the latency buckets in usec (the
nsec ones added to the first) and msec, and the device's disk stats.

Deviation: mqrt does not measure the device's busy time (``util`` is 0.00%)."""

from __future__ import annotations

from typing import Any

TERSE_VERSION = 3
NR_PERCENTILES = 20


def _lat(h: dict[str, Any]) -> str:
    return f";{h['min'] // 1000};{h['max'] // 1000};{h['mean'] / 1000:f};{h['stddev'] / 1000:f}"


def _dir(d: dict[str, Any], plist: list[str]) -> str:
    runtime = d["runtime"]
    bw = (1000 * d["io_bytes"] // runtime) // 1024 if runtime else 0
    iops = 1000 * d["total_ios"] // runtime if runtime else 0
    out = f";{d['io_bytes'] >> 10};{bw};{iops};{runtime}"
    out += _lat(d["slat_ns"]) + _lat(d["clat_ns"])
    pct = d["lat_ns"].get("percentile") or d["clat_ns"].get("percentile")
    # a direction without I/O: fio still lists the percentiles, at 0
    items = list(pct.items() if pct else dict.fromkeys(plist, 0).items())[:NR_PERCENTILES]
    for i in range(NR_PERCENTILES):
        if i < len(items):
            out += f";{float(items[i][0]):f}%={items[i][1] // 1000}"
        else:
            out += ";0%=0"
    out += _lat(d["lat_ns"])
    share = d["bw_agg"]
    out += f";{d['bw_min']};{d['bw_max']};{share:f}%;{d['bw_mean']:f};{d['bw_dev']:f}"
    return out


def terse_line(job: dict[str, Any], version: str, disk: dict[str, Any] | None) -> str:
    """One job's terse v3 line (its disk stats appended, as fio does)."""
    line = f"{TERSE_VERSION};{version};{job['jobname']};{job['groupid']};{job['error']}"
    plist: list[str] = []
    for d in (job["read"], job["write"]):
        plist = plist or list(d["lat_ns"].get("percentile") or d["clat_ns"].get("percentile") or [])
    line += _dir(job["read"], plist) + _dir(job["write"], plist)
    line += f";{job['usr_cpu']:f}%;{job['sys_cpu']:f}%;{job['ctx']};{job['majf']};{job['minf']}"
    line += "".join(f";{v:3.1f}%" for v in job["iodepth_level"].values())
    lat_u = list(job["latency_us"].values())
    lat_u[0] += sum(job["latency_ns"].values())
    line += "".join(f";{v:3.2f}%" for v in lat_u)
    line += "".join(f";{v:3.2f}%" for v in job["latency_ms"].values())
    if disk is not None:
        line += (
            f";{disk['name']};{disk['read_ios']};{disk['write_ios']};{disk['read_merges']};"
            f"{disk['write_merges']};{disk['read_ticks']};{disk['write_ticks']};"
            f"{disk['in_queue']};{0.0:3.2f}%"
        )
    return line


def render_terse(report: dict[str, Any], out) -> None:
    """Every job of the report, one terse line each."""
    disks = report.get("disk_util", [])
    for i, job in enumerate(report["jobs"]):
        disk = disks[i] if i < len(disks) else None
        print(terse_line(job, report["fio version"], disk), file=out)

"""The report of ``mqrt bench``: fio's JSON (``jobs[]`` per run, shaped as fio 3.x
prints it, and ``disk_util[]``, the device's view as diskstats counts it) and the
versioned ``mqrt`` object -- host, configuration, the sweep and its points (median
repetition, every repetition's IOPS, bandwidth and p99), and each point's counters
per CPU and per hctx."""

from __future__ import annotations

import sys
import time
from typing import Any

import psutil

from mqrt import __version__
from mqrt.bench.sweep import Point, format_params, median_index
from mqrt.block.blk_stat import (
    DEFAULT_PERCENTILES,
    LatHist,
    SampleStat,
    batch_dist,
    dir_stats_json,
    group_samples,
    iodepth_level,
    parse_percentile_list,
)
from mqrt.block.blk_sysfs import ATTRIBUTES, VIOLATIONS
from mqrt.lib import lockstat

#: Version of the ``mqrt`` object; 2 added the sweep and its points, 3 each run's
#: ``transitions`` (the timeline's sysfs writes), 4 each point's ``lock_stat``.
SCHEMA = "mqrt.bench/4"


def _merge_jobs(result, q: int) -> dict[str, Any]:
    """One fio job per request queue: every CPU's job on it, merged."""
    dirs = []
    for name in ("read", "write"):
        ios = nbytes = errors = requests = ticks_ns = 0
        clat, slat, lat = LatHist(), LatHist(), LatHist()
        for cpu in result.cpus:
            d = cpu["jobs"][q][name]
            ios += d["ios"]
            nbytes += d["bytes"]
            errors += d["errors"]
            requests += d.get("requests", d["ios"])
            ticks_ns += d.get("ticks_ns", 0)
            clat.merge(LatHist.from_bytes(d["clat"]))
            slat.merge(LatHist.from_bytes(d["slat"]))
            lat.merge(LatHist.from_bytes(d["lat"]))
        dirs.append(
            {
                "ios": ios,
                "bytes": nbytes,
                "errors": errors,
                "requests": requests,
                "ticks_ns": ticks_ns,
                "clat": clat,
                "slat": slat,
                "lat": lat,
            }
        )
    depth: dict[int, int] = {}
    submit = [0] * 7
    complete = [0] * 7
    for cpu in result.cpus:
        job = cpu["jobs"][q]
        for d, c in enumerate(job["depth_counts"]):
            if c:
                depth[d] = depth.get(d, 0) + c
        for i, c in enumerate(job.get("submit_counts", ())):
            submit[i] += c
        for i, c in enumerate(job.get("complete_counts", ())):
            complete[i] += c
    return {"dirs": dirs, "depth": depth, "submit": submit, "complete": complete}


def _samples(result, q: int, ddir: int, job) -> tuple[SampleStat, SampleStat]:
    """fio's bandwidth (KiB/s over bw_avg_time) and IOPS (over iops_avg_time) samples
    of one direction on request queue ``q``: every whole period of each CPU's
    measured time (at most the runtime), its jobs summed as fio's group_reporting
    sums them; none for a direction that did no I/O."""
    bw: list[list[int]] = []
    iops: list[list[int]] = []
    for cpu in result.cpus:
        w = cpu["jobs"][q]
        if "win_ios" not in w or not sum(w["win_ios"][ddir]):
            continue
        # a late stop (a loaded host) is not more runtime: fio stops at its runtime
        measured_ms = min(cpu["measured_ns"] // 1_000_000, round(job.runtime * 1000))
        for out, counts, period, scale in (
            (bw, w["win_bytes"][ddir], job.bw_avg_time, 1024),
            (iops, w["win_ios"][ddir], job.iops_avg_time, 1),
        ):
            per = period // w["window_ms"]
            nr = measured_ms // period
            padded = list(counts) + [0] * max(0, nr * per - len(counts))
            out.append(
                [sum(padded[i * per : (i + 1) * per]) * 1000 // period // scale for i in range(nr)]
            )
    return group_samples(bw), group_samples(iops)


def _cpu_totals(result) -> dict[str, float]:
    usr = sum(c["usr_s"] for c in result.cpus)
    sys_ = sum(c["sys_s"] for c in result.cpus)
    elapsed = sum(c["elapsed_ns"] for c in result.cpus) / 1e9
    ios = sum(
        c["jobs"][q][d]["ios"]
        for c in result.cpus
        for q in range(len(c["jobs"]))
        for d in ("read", "write")
    )
    return {
        "usr_s": usr,
        "sys_s": sys_,
        "usr_cpu": 100.0 * usr / elapsed if elapsed else 0.0,
        "sys_cpu": 100.0 * sys_ / elapsed if elapsed else 0.0,
        "ctx": sum(c["ctx_switches"] for c in result.cpus),
        "cpu_us_per_io": 1e6 * (usr + sys_) / ios if ios else 0.0,
        "ios": ios,
    }


def disk_util(name: str, dirs: list[dict[str, Any]]) -> dict[str, Any]:
    """fio's ``disk_util`` entry for one device, from the jobs' view of it (as
    ``/sys/block/<dev>/stat`` counts): requests completed (``*_ios``), sectors,
    merged bios (``*_merges``: bios that joined another's request), the requests'
    time in ms from their start to completion (``*_ticks``) and its sum
    (``in_queue``).  fio's ``util`` needs the time the device was busy, which mqrt
    does not measure: it is left out."""
    r, w = dirs
    ticks = [d["ticks_ns"] // 1_000_000 for d in dirs]
    return {
        "name": name,
        "read_ios": r["requests"],
        "write_ios": w["requests"],
        "read_sectors": r["bytes"] >> 9,
        "write_sectors": w["bytes"] >> 9,
        "read_merges": r["ios"] - r["requests"],
        "write_merges": w["ios"] - w["requests"],
        "read_ticks": ticks[0],
        "write_ticks": ticks[1],
        "in_queue": (r["ticks_ns"] + w["ticks_ns"]) // 1_000_000,
    }


def run_jobs(
    result, config: dict[str, Any], spec, bins: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], LatHist]:
    """fio's ``jobs[]`` for one run (one job per request queue, every CPU's I/O on it
    merged), its ``disk_util[]`` (one entry per request queue, in the same order) and
    the run's total-latency histogram (reads and writes); ``bins``: json+'s
    histograms."""
    if getattr(spec, "job_members", None):
        return _member_jobs(result, config, spec, bins)
    job = spec.job
    runtime_ms = max((c["measured_ns"] for c in result.cpus), default=0) // 1_000_000
    plist = (
        parse_percentile_list(job.percentile_list) if job.percentile_list else DEFAULT_PERCENTILES
    )
    cpu = _cpu_totals(result)
    flags = (
        getattr(job, "slat_percentiles", False),
        getattr(job, "clat_percentiles", True),
        getattr(job, "lat_percentiles", False),
    )
    jobs = []
    disks = []
    run_lat = LatHist()
    # one fio job per CPU on each device, reported together (fio: numjobs with
    # group_reporting); consumers such as fio-plot select files by numjobs
    job_opts = {k: str(v) for k, v in config["job"].items()}
    job_opts.update(numjobs=str(len(result.cpus)), group_reporting="1")
    for qi, qinfo in enumerate(result.queues):
        merged = _merge_jobs(result, qi)
        disks.append(disk_util(qinfo["name"], merged["dirs"]))
        nr_errors = sum(d["errors"] for d in merged["dirs"])
        entry: dict[str, Any] = {
            "jobname": qinfo["name"],
            "groupid": 0,
            "error": 5 if nr_errors else 0,  # fio reports the first errno: EIO
            "total_err": nr_errors,
            "eta": 0,
            "elapsed": round(result.wall_s),
            "job options": job_opts,
        }
        all_lat = LatHist()
        for ddir, (name, d) in enumerate(zip(("read", "write"), merged["dirs"], strict=True)):
            samples = _samples(result, qi, ddir, job)
            entry[name] = dir_stats_json(
                io_bytes=d["bytes"],
                runtime_ms=runtime_ms if d["ios"] else 0,
                total_ios=d["ios"],
                clat=d["clat"],
                lat=d["lat"],
                slat=d["slat"],
                plist=plist,
                percentiles=flags,
                bins=bins,
                bw_stat=samples[0],
                iops_stat=samples[1],
            )
            all_lat.merge(d["lat"])
            run_lat.merge(d["lat"])
        empty = LatHist()
        entry["trim"] = dir_stats_json(
            io_bytes=0, runtime_ms=0, total_ios=0, clat=empty, lat=empty, slat=empty
        )
        entry["sync"] = {"total_ios": 0, "lat_ns": empty.fio_json(None)}
        lat_ns, lat_us, lat_ms = all_lat.latency_buckets()
        entry.update(
            {
                "job_runtime": runtime_ms,
                "usr_cpu": cpu["usr_cpu"],
                "sys_cpu": cpu["sys_cpu"],
                "ctx": cpu["ctx"],
                "majf": 0,
                "minf": 0,
                "iodepth_level": iodepth_level(merged["depth"]),
                "iodepth_submit": batch_dist(merged["submit"]),
                "iodepth_complete": batch_dist(merged["complete"]),
                "latency_ns": lat_ns,
                "latency_us": lat_us,
                "latency_ms": lat_ms,
                # fio's latency_target mode (latency_target, _window, _percentile) is
                # not there: its defaults, and the depth it would probe up to
                "latency_depth": job.iodepth,
                "latency_target": 0,
                "latency_percentile": 100.0,
                "latency_window": 0,
            }
        )
        jobs.append(entry)
    return jobs, disks, run_lat


def device_costs(device: dict[str, Any]) -> dict[str, Any]:
    """What the device spent per command (a device process that counts its CPU time):
    CPU ns in total (its workers and its coordinator) and per worker -- all of their
    CPU time, the kernel's sleeping and waking included -- and the time its workers
    were not blocked (busy), host doorbell writes and interrupts per command.  Empty
    for a device that does not count them."""
    c = device.get("counters", {})
    if "cpu_ns" not in c:
        return {}
    cmds = max(1, c["commands"])
    workers = [
        {
            "worker": k,
            "commands": w["commands"],
            "cpu_ns_per_cmd": w["cpu_ns"] / max(1, w["commands"]),
            "busy_ns_per_cmd": w["busy_ns"] / max(1, w["commands"]),
            "busy_ns": w["busy_ns"],
            "cpu_ns": w["cpu_ns"],
            "interrupts": w["interrupts"],
            "doorbell_writes": w["doorbell_writes"],
            "sleeps": w["sleeps"],
        }
        for k, w in enumerate(device.get("workers", []))
    ]
    return {
        "cpu_ns_per_cmd": (c["cpu_ns"] + c.get("coordinator_cpu_ns", 0)) / cmds,
        "busy_ns_per_cmd": c["busy_ns"] / cmds,
        "doorbells_per_cmd": c["doorbell_writes"] / cmds,
        "interrupts_per_cmd": c["interrupts"] / cmds,
        "workers": workers,
    }


def run_detail(result, config: dict[str, Any]) -> dict[str, Any]:
    """What mqrt adds about one run: configuration, invariants, summary, and the
    counters per CPU and per hctx, the device's and the driver's."""
    cpu = _cpu_totals(result)
    return {
        "config": config,
        "topology": result.topology,
        "invariants": result.invariants,
        "summary": {
            "ios": cpu["ios"],
            "cpu_us_per_io": cpu["cpu_us_per_io"],
            "setup_to_first_io_s": result.setup_s,
            # from the start of this process (imports included) to the first I/O
            "start_to_first_io_s": result.t0_wall - psutil.Process().create_time(),
            "wall_s": result.wall_s,
        },
        "cpus": [
            {
                "cpu": c["cpu"],
                "pid": c["pid"],
                "host_core": c["host_core"],
                "usr_s": c["usr_s"],
                "sys_s": c["sys_s"],
                "ctx_switches": c["ctx_switches"],
                "blk_mq": c["blk_mq"],
                "counters": c["cpu_counters"],
                "hctx": c["hctx"],
                "inject_hits": c.get("inject_hits", {}),
            }
            for c in result.cpus
        ],
        "queues": result.queues,
        "device": {**result.device, **device_costs(result.device)},
        "driver": _sum_driver(result),
        "messages": result.messages,
        "transitions": transitions(result.sysfs),
    }


def lock_stat(result) -> dict[str, Any]:
    """The run's contention counters per lock class (:func:`mqrt.lib.lockstat.summary`:
    contentions, acquisitions, wait_ns total, max and average, retries, yields and
    contentions per CPU), over each CPU's life from its set-up to its report; {} when
    the run has none."""
    counters = getattr(result, "lock_stat", None)
    return {} if counters is None else lockstat.summary(counters)


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return float(s[n // 2]) if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def transitions(sysfs: dict[str, Any]) -> dict[str, Any]:
    """The timeline's writes of one run: every transition (``list``: times in ns after
    the run's start), each --at/--every's ticks started, late and skipped
    (``writes``), and per attribute (``summary``) the count, the duration's median
    and maximum, the median of each numeric field its store reported, and the sum of
    the fields that must stay 0 (``violations``: :data:`~mqrt.block.blk_sysfs.VIOLATIONS`).
    A numbered attribute is summarised per value (``cpuN/online=0``,
    ``cpuN/online=1``): its values are different transitions."""
    trans = sysfs.get("transitions", [])
    own = {"write", "attr", "dev", "value", "scheduled_ns", "start_ns", "end_ns", "duration_ns"}

    def key(t: dict[str, Any]) -> str:
        attr = ATTRIBUTES.get(t["attr"])
        return f"{t['attr']}={t['value']}" if attr is not None and attr.numbered else t["attr"]

    summary: dict[str, dict[str, Any]] = {}
    for attr in dict.fromkeys(key(t) for t in trans):
        mine = [t for t in trans if key(t) == attr]
        durations = [t["duration_ns"] for t in mine]
        fields: dict[str, list[float]] = {}
        for t in mine:
            for k, v in t.items():
                if k not in own and isinstance(v, int | float) and not isinstance(v, bool):
                    fields.setdefault(k, []).append(v)
        summary[attr] = {
            "count": len(mine),
            "errors": sum("error" in t for t in mine),
            "aborted": sum(bool(t.get("aborted")) for t in mine),
            "violations": sum(t.get(k, 0) for t in mine for k in VIOLATIONS),
            "duration_ns_median": _median(durations),
            "duration_ns_max": max(durations),
            "fields_median": {k: _median(v) for k, v in fields.items()},
        }
    return {"list": trans, "writes": sysfs.get("writes", []), "summary": summary}


def _sum_driver(result) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in result.cpus:
        for k, v in c.get("driver", {}).items():
            out[k] = out.get(k, 0) + v
    return out


def run_summary(result, config: dict[str, Any], spec, bins: bool = False) -> dict[str, Any]:
    """One repetition of a point: its fio jobs (``bins``: with json+'s histograms),
    headline figures and detail."""
    jobs, disks, lat = run_jobs(result, config, spec, bins)
    job = spec.job
    plist = (
        parse_percentile_list(job.percentile_list) if job.percentile_list else DEFAULT_PERCENTILES
    )
    lat_json = lat.fio_json(plist)
    dirs = [j[d] for j in jobs for d in ("read", "write")]
    return {
        "iops": sum(d["iops"] for d in dirs),
        "bw_bytes": sum(d["bw_bytes"] for d in dirs),
        "lat_ns": lat_json,
        "p99_ns": lat_json.get("percentile", {}).get("99.000000", 0),
        "measured_s": max((c["measured_ns"] for c in result.cpus), default=0) / 1e9,
        "interrupted": result.interrupted,
        "jobs": jobs,
        "disk_util": disks,
        "detail": run_detail(result, config),
        "lock_stat": lock_stat(result),
        "host": {**result.host, "python": sys.version.split()[0], "topology": result.topology},
    }


def assemble(
    points: list[Point],
    axes: dict[str, list[Any]],
    repeat: int,
    *,
    wall_s: float,
    interrupted: bool,
    messages: list[str],
) -> dict[str, Any]:
    """The whole report: fio's top level with the median repetition's jobs of every
    point (named after the point when there is a sweep), and the ``mqrt`` object."""
    jobs: list[dict[str, Any]] = []
    disks: list[dict[str, Any]] = []
    out_points = []
    violations = 0
    measured = 0.0
    done = [p for p in points if p.runs]
    groups: list[Any] = []
    for p in done:
        for r in p.runs:
            violations += r["detail"]["invariants"].get("violations", 0)
            measured += r["measured_s"]
        m = median_index(r["iops"] for r in p.runs)
        med = p.runs[m]
        first = len(jobs)
        suffix = f" {format_params(p.params)}" if p.params else ""
        # a job file's groups (stonewall, new_group) run one after the other, each
        # a point: fio numbers them from 0 in file order
        group = p.params.get("job")
        if group is not None and group not in groups:
            groups.append(group)
        groupid = groups.index(group) if group is not None else 0
        jobs += [{**j, "jobname": j["jobname"] + suffix, "groupid": groupid} for j in med["jobs"]]
        disks += [{**d, "name": d["name"] + suffix} for d in med["disk_util"]]
        out_points.append(
            {
                "params": p.params,
                "iops": med["iops"],
                "iops_runs": [r["iops"] for r in p.runs],
                "bw_bytes": med["bw_bytes"],
                "bw_bytes_runs": [r["bw_bytes"] for r in p.runs],
                "lat_ns": med["lat_ns"],
                "p99_ns_runs": [r["p99_ns"] for r in p.runs],
                "cpu_us_per_io": med["detail"]["summary"]["cpu_us_per_io"],
                "device_us_per_cmd": med["detail"]["device"].get("cpu_ns_per_cmd", 0.0) / 1000,
                "job_index": first,
                "nr_jobs": len(med["jobs"]),
                "median_run": m,
                "run": med["detail"],
                "lock_stat": med.get("lock_stat", {}),
            }
        )
    config = done[0].runs[0]["detail"]["config"] if done else {}
    driver_config = config.get("nullb", config.get("nvme", {}))
    now = time.time()
    return {
        "fio version": f"mqrt-{__version__}",
        "timestamp": int(now),
        "timestamp_ms": int(now * 1000),
        "time": time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(now)),
        "global options": {k: str(v) for k, v in driver_config.items()},
        "jobs": jobs,
        "disk_util": disks,
        "mqrt": {
            "schema": SCHEMA,
            "version": __version__,
            "host": done[0].runs[0]["host"] if done else {},
            "config": config,
            "sweep": {
                "axes": axes,
                "repeat": repeat,
                "points": len(points),
                "points_done": sum(
                    len(p.runs) == repeat
                    and not (p.runs[-1]["interrupted"] or p.runs[-1].get("partial"))
                    for p in points
                ),
                "wall_s": wall_s,
                "measured_s": measured,
                # start-up, tear-down and collection: the sweep's own cost
                "overhead_pct": 100.0 * max(0.0, wall_s - measured) / wall_s if wall_s else 0.0,
            },
            "points": out_points,
            "invariants": {"violations": violations, "runs": sum(len(p.runs) for p in done)},
            "interrupted": interrupted,
            "messages": messages,
        },
    }


def _member_jobs(result, config: dict[str, Any], spec, bins: bool = False):
    """fio's jobs of one group run side by side (each on its own CPUs): one entry
    per job and request queue, ``name`` appended; the devices' view and the latency
    of the whole run as :func:`run_jobs` has them."""
    import copy

    whole = copy.copy(spec)
    whole.job_members = None
    _jobs, disks, run_lat = run_jobs(result, config, whole, bins)
    entries = []
    for name, cpus in spec.job_members:
        view = copy.copy(result)
        view.cpus = [c for c in result.cpus if c["cpu"] in cpus]
        part = copy.copy(whole)
        part.job = spec.cpu_jobs[cpus[0]]
        jobs, _d, _l = run_jobs(view, config, part, bins)
        entries += [{**j, "jobname": f"{j['jobname']} {name}"} for j in jobs]
    return entries, disks, run_lat

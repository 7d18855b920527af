"""What ``mqrt bench`` prints for people: fio's summary of a run, a table of the
points of a sweep (median and spread per point, the mq/sq/raw ratios), the reference
figures of an nvme run, and the live status line."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from mqrt.bench.sweep import format_params
from mqrt.block.blk_mq_cpumap import format_cpulist
from mqrt.block.blk_stat import choose_unit, format_percentiles_text


def _si(x: float) -> str:
    """fio's short numbers: 950, 12.3k, 123k, 1234k -> 1.23M."""
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            v = x / div
            return f"{v:.3g}{unit}" if v < 1000 else f"{v:.0f}{unit}"
    return f"{x:.0f}"


def _lat_unit(h: dict[str, Any]) -> tuple[str, int]:
    """fio's way: nsec for short latencies, msec only when even the minimum is a
    millisecond or more, usec otherwise."""
    if h["max"] < 10_000:
        return "nsec", 1
    if h["min"] >= 1_000_000:
        return "msec", 1_000_000
    return "usec", 1000


def render_point(
    jobs: list[dict[str, Any]], m: dict[str, Any], out, disks: list[dict[str, Any]] | None = None
) -> None:
    """fio's human summary of one run, one block per job, its disk stats, then
    mqrt's own lines (``m`` is the run's detail: a point's ``run`` object)."""
    for job in jobs:
        err = f"{job['error']} ({job['total_err']} I/Os failed)" if job["error"] else "0"
        print(f"{job['jobname']}: (groupid=0, jobs={len(m['cpus'])}): err= {err}", file=out)
        for name in ("read", "write"):
            d = job[name]
            if not d["total_ios"]:
                continue
            mib = d["bw_bytes"] / (1 << 20)
            print(
                f"  {name}: IOPS={_si(d['iops'])}, BW={mib:.1f}MiB/s "
                f"({d['bw_bytes'] / 1e6:.1f}MB/s)({d['io_bytes'] / (1 << 20):.0f}MiB/"
                f"{d['runtime']}msec)",
                file=out,
            )
            for lat_name in ("slat", "clat", "lat"):
                h = d[f"{lat_name}_ns"]
                unit, div = _lat_unit(h)
                print(
                    f"    {lat_name:>4} ({unit}): min={h['min'] // div}, max={h['max'] // div}, "
                    f"avg={h['mean'] / div:.2f}, stdev={h['stddev'] / div:.2f}",
                    file=out,
                )
            pct = d["clat_ns"].get("percentile", {})
            if pct:
                unit, _ = choose_unit(max(pct.values()))
                print(f"    clat percentiles ({unit}):", file=out)
                out.write(format_percentiles_text(pct, unit))
        lvl = job["iodepth_level"]
        print(
            f"  cpu          : usr={job['usr_cpu']:.2f}%, sys={job['sys_cpu']:.2f}%, "
            f"ctx={job['ctx']}, majf=0, minf=0",
            file=out,
        )
        print("  IO depths    : " + ", ".join(f"{k}={v:.1f}%" for k, v in lvl.items()), file=out)
    if disks:
        print("\nDisk stats (read/write):", file=out)
        for d in disks:
            print(
                f"  {d['name']}: ios={d['read_ios']}/{d['write_ios']}, "
                f"sectors={d['read_sectors']}/{d['write_sectors']}, "
                f"merge={d['read_merges']}/{d['write_merges']}, "
                f"ticks={d['read_ticks']}/{d['write_ticks']}, in_queue={d['in_queue']}",
                file=out,
            )
    s = m["summary"]
    inv = m["invariants"]
    print(
        f"\nmqrt: {len(m['cpus'])} CPUs ({m['topology']}), "
        f"{s['cpu_us_per_io']:.2f} us of CPU per I/O, "
        f"first I/O {s['start_to_first_io_s'] * 1000:.0f} ms after the command started",
        file=out,
    )
    dev = m["device"]
    if "cpu_ns_per_cmd" in dev:
        per_worker = ", ".join(f"{w['cpu_ns_per_cmd'] / 1000:.2f}" for w in dev["workers"])
        print(
            f"mqrt: device: {dev['cpu_ns_per_cmd'] / 1000:.2f} us of CPU per command "
            f"({len(dev['workers'])} worker{'s' if len(dev['workers']) != 1 else ''}: "
            f"{per_worker}; "
            f"{dev['busy_ns_per_cmd'] / 1000:.2f} us busy serving, the rest sleeping and "
            f"waking), "
            f"{dev['doorbells_per_cmd']:.3f} doorbell writes and "
            f"{dev['interrupts_per_cmd']:.3f} interrupts per command",
            file=out,
        )
    if "violations" in inv:
        state = "ok" if not inv["violations"] else "VIOLATED"
        print(
            f"mqrt: invariants {state}: {inv['violations']} violations, "
            f"{inv['leaked_tags']} tags leaked, {inv['owned_requests']} requests still owned, "
            f"{inv['stale_completions']} stale completions dropped",
            file=out,
        )
        for p in inv["problems"][:10]:
            print(f"  ! {p}", file=out)
    for msg in m["messages"]:
        print(f"mqrt: note: {msg}", file=out)
    totals: dict[str, int] = {}
    for c in m["cpus"]:
        for k, v in {**c["blk_mq"], **c["counters"]}.items():
            totals[k] = totals.get(k, 0) + v
    keys = (
        "tag_waits",
        "tag_sleeps",
        "busy",
        "requeued",
        "timeouts",
        "ipis_sent",
        "kblockd_runs",
        "restarts",
        "read_merges",
        "write_merges",
    )
    print("mqrt: " + ", ".join(f"{k}={totals.get(k, 0)}" for k in keys), file=out)


def render_report(report: dict[str, Any], out) -> None:
    """A single run: fio's summary.  A sweep (or repetitions): the points table,
    then the paper's ratios when ``mode`` is an axis."""
    m = report["mqrt"]
    points = m["points"]
    sweep = m["sweep"]
    if len(points) == 1 and not sweep["axes"]:
        p = points[0]
        sel = slice(p["job_index"], p["job_index"] + p["nr_jobs"])
        render_point(report["jobs"][sel], p["run"], out, report.get("disk_util", [])[sel])
        if sweep["repeat"] > 1:
            runs = p["iops_runs"]
            print(
                f"mqrt: median of {len(runs)} runs: {_si(p['iops'])} IOPS "
                f"[{_si(min(runs))}..{_si(max(runs))}]",
                file=out,
            )
    else:
        render_table(m, out)
    if "reference" in m:
        render_reference(m, out)
    if "error" in m:
        print(f"mqrt: {partial_line(m['error']['partial'], sweep)}", file=out)
    if m["interrupted"]:
        print(
            f"mqrt: interrupted: {sweep['points_done']} of {sweep['points']} points complete; "
            "the figures cover what ran",
            file=out,
        )


def partial_line(partial: dict[str, Any], sweep: dict[str, Any]) -> str:
    """Which figures a failed run's report has: the failed point's CPUs that
    reported, the device's counters, the points that did not run."""
    point = " ".join(f"{k}={v}" for k, v in partial["point"].items())
    missing = partial["cpus_missing"]
    line = (
        f"partial figures: {'point ' + point if point else 'the run'} covers "
        f"CPUs {format_cpulist(partial['cpus_reported']) or 'none'}"
        + (f" (not CPUs {format_cpulist(missing)})" if missing else "")
    )
    if partial["device_counters"] != "complete":
        line += f"; the device's counters are {partial['device_counters']}"
    later = sweep["points"] - sweep["points_done"] - 1
    if later > 0:
        line += f"; {later} later point{'s' if later > 1 else ''} did not run"
    return line


def render_table(m: dict[str, Any], out) -> None:
    """One row per point: its parameters, median IOPS with the spread of its runs,
    bandwidth, latency percentiles, CPU per I/O and its invariants."""
    sweep = m["sweep"]
    axes = list(sweep["axes"])
    table = Table(
        title=f"mqrt bench: {sweep['points_done']}/{sweep['points']} points, "
        f"median of {sweep['repeat']} run{'s' if sweep['repeat'] > 1 else ''} each",
        title_justify="left",
    )
    for name in axes:
        table.add_column(name, justify="right")
    device = any(p.get("device_us_per_cmd") for p in m["points"])
    cols = ["IOPS", "runs min..max", "MiB/s", "lat p50", "lat p99", "CPU us/IO"]
    for col in [*cols, *(["dev us/cmd"] if device else []), "inv."]:
        table.add_column(col, justify="right")
    for p in m["points"]:
        runs = p["iops_runs"]
        pct = p["lat_ns"].get("percentile", {})
        inv = p["run"]["invariants"].get("violations", 0)
        table.add_row(
            *[str(p["params"].get(a, "")) for a in axes],
            _si(p["iops"]),
            f"{_si(min(runs))}..{_si(max(runs))}" if len(runs) > 1 else "-",
            f"{p['bw_bytes'] / (1 << 20):.1f}",
            _us(pct.get("50.000000")),
            _us(pct.get("99.000000")),
            f"{p['cpu_us_per_io']:.2f}",
            *([f"{p.get('device_us_per_cmd', 0.0):.2f}"] if device else []),
            "ok" if not inv else f"{inv} VIOLATED",
        )
    Console(file=out, width=max(100, 12 * (len(axes) + 7)), highlight=False).print(table)
    for line in mode_ratios(m):
        print(f"mqrt: {line}", file=out)
    s = sweep
    print(
        f"mqrt: sweep {s['wall_s']:.1f} s, of which {s['measured_s']:.1f} s measured "
        f"(overhead {s['overhead_pct']:.1f}%); invariants: "
        f"{m['invariants']['violations']} violations over {m['invariants']['runs']} runs",
        file=out,
    )


def mode_ratios(m: dict[str, Any]) -> list[str]:
    """``mq/sq`` and ``raw/mq`` at each value of the other axes, when ``mode`` is an
    axis (the blk-mq paper's comparison)."""
    if "mode" not in m["sweep"]["axes"]:
        return []
    by_rest: dict[str, dict[str, float]] = {}
    for p in m["points"]:
        rest = {k: v for k, v in p["params"].items() if k != "mode"}
        by_rest.setdefault(format_params(rest), {})[p["params"]["mode"]] = p["iops"]
    lines = []
    for label, modes in by_rest.items():
        parts = []
        if modes.get("sq") and "mq" in modes:
            parts.append(f"mq/sq {modes['mq'] / modes['sq']:.2f}x")
        if modes.get("mq") and "raw" in modes:
            parts.append(f"raw/mq {modes['raw'] / modes['mq']:.2f}x")
        if parts:
            lines.append((f"{label}: " if label else "") + ", ".join(parts))
    return lines


def render_reference(m: dict[str, Any], out) -> None:
    """Each point next to the bare references measured right after the runs."""
    ref = m["reference"]
    rtt = ref["wakeup_rtt_ns"]
    loop = ref.get("sq_cq_loop_iops")
    print(f"mqrt: reference: eventfd wake-up round trip {rtt / 1000:.1f} us", file=out)
    for p in m["points"]:
        pct = p["lat_ns"].get("percentile", {})
        p50, p99 = pct.get("50.000000"), pct.get("99.000000")
        label = format_params(p["params"]) or "run"
        line = f"mqrt: reference: {label}:"
        if p50 and p99:
            line += (
                f" lat p50 {p50 / 1000:.1f} us ({p50 / rtt:.1f}x the round trip),"
                f" p99 {p99 / 1000:.1f} us ({p99 / rtt:.1f}x)"
            )
        if loop:
            line += f"; {_si(p['iops'])} IOPS = {100 * p['iops'] / loop:.1f}% of the bare loop"
        print(line, file=out)
    if loop:
        print(f"mqrt: reference: bare SQ -> device -> CQ loop {_si(loop)} IOPS", file=out)


def _us(ns: float | None) -> str:
    return "-" if ns is None else f"{ns / 1000:.1f} us"


class Progress:
    """The live status line on stderr (only on a terminal, only once the command has
    run for a couple of seconds): point, repetition, current IOPS, ETA."""

    SHOW_AFTER_S = 2.0

    def __init__(self, enabled: bool, total_runs: int, run_s: float, verbose: bool = False):
        self.enabled = enabled and sys.stderr.isatty()
        self.verbose = verbose
        self.total = total_runs
        self.run_s = run_s  #: expected seconds per run (runtime + ramp + set-up)
        self.t0 = time.monotonic()
        self.done_runs = 0
        self.label = ""
        self.last: tuple[float, int] | None = None
        self.shown = False

    def event(self, line: str) -> None:
        """A line of the run's life (``-v``): printed above the status line."""
        if not self.verbose:
            return
        if self.shown:
            sys.stderr.write("\r" + " " * 100 + "\r")
        sys.stderr.write(f"mqrt: {line}\n")
        sys.stderr.flush()

    def start_run(self, label: str) -> None:
        self.label = label
        self.last = None

    def end_run(self) -> None:
        self.done_runs += 1

    def __call__(self, snap: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.t0 < self.SHOW_AFTER_S:
            return
        iops = 0.0
        if self.last is not None and now > self.last[0]:
            iops = (snap["completed"] - self.last[1]) / (now - self.last[0])
        self.last = (now, snap["completed"])
        left = self.total - self.done_runs - 1
        eta = snap["remaining_s"] + max(0, left) * self.run_s
        run = f"run {self.done_runs + 1}/{self.total} " if self.total > 1 else ""
        sys.stderr.write(
            f"\rmqrt: {run}[{self.label or 'running'}] {_si(iops)} IOPS, "
            f"inflight {snap['inflight']}, eta {eta:.0f}s   "
        )
        sys.stderr.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()
            self.shown = False

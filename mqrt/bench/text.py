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
from mqrt.block.blk_stat import format_percentiles_text, percentile_precision


def _si(x: float) -> str:
    """Short numbers for mqrt's own lines: 950, 12.3k, 123k, 1234k -> 1.23M."""
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            v = x / div
            return f"{v:.3g}{unit}" if v < 1000 else f"{v:.0f}{unit}"
    return f"{x:.0f}"


def num2str(num: int, digits: int, pow2: bool = False, unit: str = "") -> str:
    """fio's short number: ``num`` divided by 1000 (1024 with ``pow2``) until it has at
    most ``digits`` digits, the remainder's first decimals filling the digits left
    (rounded), then the prefix (k, M, G... or Ki, Mi, Gi...) and ``unit`` ("", "B",
    "B/s")."""
    thousand = 1024 if pow2 else 1000
    prefixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi") if pow2 else ("", "k", "M", "G", "T", "P")
    num = int(num)
    post = 0
    modulo = None
    carry = False
    while post < len(prefixes) and len(str(num)) > digits:
        modulo = num % thousand
        num //= thousand
        carry = modulo >= thousand // 2
        post += 1
    if post >= len(prefixes):
        post = 0
    if modulo is None:
        return f"{num}{prefixes[post]}{unit}"
    room = digits - len(str(num))
    if room <= 1:
        return f"{num + carry}{prefixes[post]}{unit}"
    frac = f"{modulo / thousand:.{room - 1}f}"
    if frac[0] == "1":
        num += 1
    return f"{num}.{frac[2:]}{prefixes[post]}{unit}"


def lat_line(name: str, h: dict[str, Any]) -> str:
    """fio's ``slat``/``clat``/``lat`` line: msec when the minimum is over 2 ms, the
    maximum over 100 ms and the deviation over 1 ms; usec on the same terms a
    thousand times smaller; nsec otherwise."""
    lo, hi, mean, dev = h["min"], h["max"], h["mean"], h["stddev"]
    unit = "nsec"
    for name_, div in (("msec", 1_000_000), ("usec", 1000)):
        if lo > 2 * div and hi > 100 * div - 1 and dev > div:
            unit = name_
            lo, hi, mean, dev = lo // div, hi // div, mean / div, dev / div
            break
    return (
        f"    {name} ({unit}): min={num2str(lo, 6)}, max={num2str(hi, 6)}, "
        f"avg={mean:5.02f}, stdev={dev:5.02f}"
    )


def _lat_buckets(job: dict[str, Any]) -> list[str]:
    """fio's ``lat (nsec/usec/msec)`` lines: the nonzero buckets, five per line."""
    lines = []
    for unit, key in (("nsec", "latency_ns"), ("usec", "latency_us"), ("msec", "latency_ms")):
        cells = [f"{k}={v:3.2f}%" for k, v in job.get(key, {}).items() if v > 0]
        for i in range(0, len(cells), 5):
            lines.append(f"  lat ({unit})   : " + ", ".join(cells[i : i + 5]))
    return lines


def _dist_line(label: str, dist: dict[str, float]) -> str:
    return label + ", ".join(f"{k}={v:3.1f}%" for k, v in dist.items())


def _dir_lines(name: str, d: dict[str, Any], precision: int) -> list[str]:
    """One direction's block: IOPS and bandwidth, the latency lines and the
    percentile tables the job asked for."""
    runtime = d["runtime"]
    bw = 1000 * d["io_bytes"] // runtime if runtime else 0
    iops = 1000 * d["total_ios"] // runtime if runtime else 0
    lines = [
        f"  {name}: IOPS={num2str(iops, 4)}, BW={num2str(bw, 4, True, 'B/s')} "
        f"({num2str(bw, 4, False, 'B/s')})({num2str(d['io_bytes'], 4, True, 'B')}/"
        f"{runtime}msec)"
    ]
    for lat_name in ("slat", "clat", " lat"):
        h = d[f"{lat_name.strip()}_ns"]
        if h["N"]:
            lines.append(lat_line(lat_name, h))
    for lat_name in ("slat", "clat", "lat"):
        pct = d[f"{lat_name}_ns"].get("percentile")
        if pct:
            lines += format_percentiles_text(pct, lat_name, precision).splitlines()
    return lines + sample_lines(d)


def sample_lines(d: dict[str, Any]) -> list[str]:
    """fio's ``bw`` and ``iops`` sample lines (KiB/s, in MiB/s from a mean of 1 GiB/s),
    when there are samples."""
    lines = []
    if d["bw_samples"]:
        lo, hi, mean, dev, unit = d["bw_min"], d["bw_max"], d["bw_mean"], d["bw_dev"], "KiB"
        if mean > 1024 * 1024:
            lo, hi, mean, dev, unit = lo // 1024, hi // 1024, mean / 1024, dev / 1024, "MiB"
        lines.append(
            f"   bw ({unit:>5}/s): min={lo:5d}, max={hi:5d}, per={d['bw_agg']:3.2f}%, "
            f"avg={mean:5.02f}, stdev={dev:5.02f}, samples={d['bw_samples']}"
        )
    if d["iops_samples"]:
        lines.append(
            f"   iops        : min={d['iops_min']:5d}, max={d['iops_max']:5d}, "
            f"avg={d['iops_mean']:5.02f}, stdev={d['iops_stddev']:5.02f}, "
            f"samples={d['iops_samples']}"
        )
    return lines


def render_point(
    jobs: list[dict[str, Any]], m: dict[str, Any], out, disks: list[dict[str, Any]] | None = None
) -> None:
    """fio's human summary of one run, one block per job, its run status group and
    disk stats, then mqrt's own lines (``m`` is the run's detail: a point's ``run``
    object)."""
    plist_text = str(m.get("config", {}).get("job", {}).get("percentile_list", ""))
    precision = percentile_precision(plist_text)
    pid = m["cpus"][0]["pid"] if m["cpus"] else 0
    when = time.strftime("%a %b %d %H:%M:%S %Y")
    for job in jobs:
        err = f"{job['error']:2d}"
        if job["error"]:
            err += f" ({job['total_err']} I/Os failed)"
        print(
            f"{job['jobname']}: (groupid=0, jobs={len(m['cpus'])}): err={err}: pid={pid}: {when}",
            file=out,
        )
        for name in ("read", "write"):
            d = job[name]
            if d["io_bytes"]:
                print("\n".join(_dir_lines(name, d, precision)), file=out)
        for line in _lat_buckets(job):
            print(line, file=out)
        print(
            f"  cpu          : usr={job['usr_cpu']:3.2f}%, sys={job['sys_cpu']:3.2f}%, "
            f"ctx={job['ctx']}, majf={job['majf']}, minf={job['minf']}",
            file=out,
        )
        print(_dist_line("  IO depths    : ", job["iodepth_level"]), file=out)
        if "iodepth_submit" in job:
            print(_dist_line("     submit    : ", job["iodepth_submit"]), file=out)
            print(_dist_line("     complete  : ", job["iodepth_complete"]), file=out)
        r, w = job["read"], job["write"]
        print(
            f"     issued rwts: total={r['total_ios']},{w['total_ios']},0,0 "
            f"short={r['short_ios']},{w['short_ios']},0,0 "
            f"dropped={r['drop_ios']},{w['drop_ios']},0,0",
            file=out,
        )
        if job.get("latency_depth"):
            print(
                f"     latency   : target={job['latency_target']}, "
                f"window={job['latency_window']}, "
                f"percentile={job['latency_percentile']:.2f}%, depth={job['latency_depth']}",
                file=out,
            )
    for line in group_lines(jobs):
        print(line, file=out)
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
    _mqrt_lines(m, out)


def group_lines(jobs: list[dict[str, Any]]) -> list[str]:
    """fio's ``Run status group 0 (all jobs)`` block: per direction, the group's
    bandwidth (all bytes over the longest runtime), the jobs' smallest and largest
    bandwidth, the bytes and the runtimes' range."""
    lines = ["", "Run status group 0 (all jobs):"]
    for name, label in (("read", "   READ"), ("write", "  WRITE")):
        dirs = [j[name] for j in jobs if j[name]["runtime"]]
        if not dirs:
            continue
        io = sum(d["io_bytes"] for d in dirs)
        max_run = max(d["runtime"] for d in dirs)
        agg = 1000 * io // max_run
        bws = [1000 * d["io_bytes"] // d["runtime"] for d in dirs]

        def both(v: int, unit: str = "B/s") -> tuple[str, str]:
            return num2str(v, 4, True, unit), num2str(v, 4, False, unit)

        a, a2 = both(agg)
        lo, lo2 = both(min(bws))
        hi, hi2 = both(max(bws))
        i, i2 = both(io, "B")
        lines.append(
            f"{label}: bw={a} ({a2}), {lo}-{hi} ({lo2}-{hi2}), io={i} ({i2}), "
            f"run={min(d['runtime'] for d in dirs)}-{max_run}msec"
        )
    return lines


def _mqrt_lines(m: dict[str, Any], out) -> None:
    """mqrt's own lines under fio's: CPUs, CPU per I/O, the device's costs, the
    invariants, the notes and the block layer's counters."""
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
            f"{inv['leaked_tags']} tags leaked ({inv.get('leaked_sched_tags', 0)} sched tags), "
            f"{inv['owned_requests']} requests still owned, "
            f"{inv['stale_completions']} stale completions dropped",
            file=out,
        )
        for p in inv["problems"][:10]:
            print(f"  ! {p}", file=out)
    for msg in m["messages"]:
        print(f"mqrt: note: {msg}", file=out)
    _transition_lines(m.get("transitions", {}), out)
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


def _transition_lines(tr: dict[str, Any], out) -> None:
    """The timeline's writes: per attribute, how many, how long, what their stores
    reported (medians); per --at/--every, late and skipped ticks."""
    if not tr.get("writes"):
        return
    print("mqrt: transitions:", file=out)
    for attr, s in tr["summary"].items():
        fields = "".join(
            f", {k[:-3]} {_us(v)}" if k.endswith("_ns") else f", {k} {v:g}"
            for k, v in s["fields_median"].items()
        )
        bad = "".join(f", {s[k]} {k}" for k in ("errors", "aborted", "violations") if s.get(k))
        print(
            f"  {attr}: {s['count']} writes{bad}, duration median "
            f"{_us(s['duration_ns_median'])} max {_us(s['duration_ns_max'])}{fields} "
            "(medians)",
            file=out,
        )
    for w in tr["writes"]:
        print(
            f"  {w['kind']} {w['write']}: {w['started']} started, {w['late']} late, "
            f"{w['skipped']} skipped",
            file=out,
        )


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
        render_lock_stat(p.get("lock_stat", {}), out)
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


def render_lock_stat(stats: dict[str, Any], out) -> None:
    """lock_stat's classes that had contentions, longest total wait first: contentions
    (and their share of the acquisitions), wait total, average and longest, failed
    tries, yields; one line when none was contended."""
    rows = sorted(
        ((name, s) for name, s in stats.items() if s["contentions"]),
        key=lambda r: -r[1]["wait_ns"],
    )
    if not rows:
        if stats:
            acq = sum(s["acquisitions"] for s in stats.values())
            print(f"mqrt: lock_stat: no contention ({_si(acq)} acquisitions)", file=out)
        return
    table = Table(title="mqrt: lock_stat (contended classes)", title_justify="left")
    for col in ("class", "contentions", "of acq.", "wait total", "avg", "max", "retries",
                "yields"):  # fmt: skip
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, s in rows:
        acq = s["acquisitions"]
        table.add_row(
            name,
            _si(s["contentions"]),
            f"{100.0 * s['contentions'] / acq:.2f}%" if acq else "-",
            _us(s["wait_ns"]),
            _us(s["wait_avg_ns"]),
            _us(s["wait_max_ns"]),
            _si(s["retries"]),
            _si(s["yields"]),
        )
    Console(file=out, width=100, highlight=False).print(table)


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

    def _line(self, line: str) -> None:
        """One line above the status line."""
        if self.shown:
            sys.stderr.write("\r" + " " * 100 + "\r")
        sys.stderr.write(f"mqrt: {line}\n")
        sys.stderr.flush()

    def event(self, line: str) -> None:
        """A line of the run's life (``-v``)."""
        if self.verbose:
            self._line(line)

    def announce(self, line: str) -> None:
        """The line that names a run (its segment, its owner): printed with ``-v``, or
        when stderr is a terminal (not with ``--quiet``), so a second terminal can find
        the run while it goes."""
        if self.verbose or self.enabled:
            self._line(line)

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
        ls = snap.get("lock_stat") or {}
        locks = (
            f", lock contentions {_si(ls['contentions'])}"
            + (f" (most wait: {ls['top']})" if ls["top"] else "")
            if ls.get("contentions")
            else ""
        )
        sys.stderr.write(
            f"\rmqrt: {run}[{self.label or 'running'}] {_si(iops)} IOPS, "
            f"inflight {snap['inflight']}{locks}, eta {eta:.0f}s   "
        )
        sys.stderr.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()
            self.shown = False

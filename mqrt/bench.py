"""``mqrt bench``: run an fio-shaped job on emulated CPUs through blk-mq and a driver,
and report it the way fio does (human summary, or fio-shaped JSON with an ``mqrt``
object: configuration, host, invariants, per-CPU and per-hctx counters).

Options carry fio's names for the job (``--rw``, ``--bs``, ``--iodepth`` ...) and
null_blk's for the device (``--irqmode``, ``--completion_nsec``, ``--submit_queues``
...); dashes and underscores are both accepted.  A bad value is a one-line error
naming the option and what it accepts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import psutil

from mqrt import __version__
from mqrt.blk_stat import (
    DEFAULT_PERCENTILES,
    LatHist,
    choose_unit,
    dir_stats_json,
    format_percentiles_text,
    iodepth_level,
    parse_percentile_list,
)
from mqrt.knobs import Knob, KnobError, canonical, parse_knobs

SCHEMA = "mqrt.bench/1"

#: Options of the run itself (not of the job or the driver).
RUN_KNOBS: tuple[Knob, ...] = (
    Knob("cpus", "int", 2, "Number of emulated CPUs (worker processes). Default: 2", 1, 256),
    Knob(
        "driver",
        "choice",
        "nullb",
        "Block driver: nullb (null_blk) or nvme (the NVMe device process). Default: nullb",
        choices={"nullb": "nullb", "nvme": "nvme"},
    ),
    Knob(
        "mode",
        "choice",
        "mq",
        "How CPUs feed the driver: mq (blk-mq), sq (the legacy single request queue "
        "under one lock), raw (the driver fed directly, no block layer). Default: mq",
        choices={m: m for m in ("mq", "sq", "raw")},
    ),
    Knob(
        "rq_affinity",
        "int",
        1,
        "Completion affinity: 0 where the irq lands, 1 same LLC, 2 the submitting CPU. Default: 1",
        0,
        2,
    ),
    Knob("io_timeout", "int", 5000, "Request timeout in ms. Default: 5000 (null_blk)", 1, 3600000),
    Knob("cpus_allowed", "str", "", "Host CPUs to pin to, a cpulist (e.g. 0-3). Default: all"),
    Knob(
        "cpus_per_core",
        "int",
        0,
        "Emulated SMT: CPUs per core for the CPU->hctx map (0: the host's). Default: 0",
        0,
        64,
    ),
    Knob("pin", "bool", True, "Pin each emulated CPU to a host core. Default: 1"),
    Knob("seed", "int", 0, "Seed for everything random in the run. Default: 0", 0, 1 << 62),
)


def _groups() -> list[tuple[str, tuple[Knob, ...]]]:
    from mqrt.device.null_blk import NULLB_KNOBS
    from mqrt.device.nvme import NVME_KNOBS
    from mqrt.device.nvme_model import DEVICE_KNOBS
    from mqrt.workers.ioengine import JOB_KNOBS

    return [
        ("job (fio)", JOB_KNOBS),
        ("run", RUN_KNOBS),
        ("nullb (null_blk; --driver nullb)", NULLB_KNOBS),
        ("nvme driver (--driver nvme)", NVME_KNOBS),
        ("nvme device (the controller process)", DEVICE_KNOBS),
    ]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run an fio-like job through blk-mq on emulated CPUs",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    seen: set[str] = set()
    for title, knobs in _groups():
        g = p.add_argument_group(title)
        for k in knobs:
            if k.name in seen:  # a knob both drivers have (poll_queues): listed once
                continue
            seen.add(k.name)
            flags = [f"--{k.name}"]
            if "_" in k.name:
                flags.append(f"--{k.name.replace('_', '-')}")
            g.add_argument(*flags, dest=f"knob_{k.name}", metavar="V", default=None, help=k.help)
    out = p.add_argument_group("output")
    out.add_argument(
        "--output-format",
        "--output_format",
        choices=("normal", "json"),
        default="normal",
        help="normal (fio-like text) or json (fio-shaped JSON). Default: normal",
    )
    out.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    out.add_argument(
        "--reference",
        action="store_true",
        help="after an nvme run, also time the bare SQ -> device -> CQ loop (~1 s) and "
        "give this run's IOPS as a share of it (the eventfd wake-up round trip, next to "
        "the latency percentiles, is always measured)",
    )
    p.set_defaults(func=main)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    return {k[5:]: v for k, v in vars(args).items() if k.startswith("knob_") and v is not None}


def build(given: dict[str, Any]):
    """Validate every option and build the RunSpec (UsageError-free: KnobError)."""
    from mqrt.device import null_blk, nvme
    from mqrt.device.nvme_model import DEVICE_KNOBS
    from mqrt.workers.ioengine import JOB_KNOBS, JobSpec

    given = {canonical(k): v for k, v in given.items()}
    job_names = {k.name for k in JOB_KNOBS}
    run_names = {k.name for k in RUN_KNOBS}
    nullb_names = {k.name for k in null_blk.NULLB_KNOBS}
    nvme_names = {k.name for k in (*nvme.NVME_KNOBS, *DEVICE_KNOBS)}
    unknown = set(given) - job_names - run_names - nullb_names - nvme_names
    if unknown:
        raise KnobError(f"unknown option {sorted(unknown)[0]!r}")
    job = JobSpec.from_options({k: v for k, v in given.items() if k in job_names})
    runv = parse_knobs(RUN_KNOBS, {k: v for k, v in given.items() if k in run_names})
    _apply_mode(given, runv)
    if runv["driver"] == "nvme":
        return _build_nvme(given, job, runv, nullb_names, nvme_names)
    wrong = sorted(set(given) & (nvme_names - nullb_names))
    if wrong:
        raise KnobError(f"{wrong[0]}: an nvme option; add --driver nvme")
    nullb = null_blk.parse_config({k: v for k, v in given.items() if k in nullb_names})
    cpus_allowed = _cpus_allowed(runv)
    dev_bytes = nullb.gb << 30
    if job.bs % nullb.blocksize:
        raise KnobError(
            f"bs: must be a multiple of the device blocksize {nullb.blocksize}, got {job.bs}"
        )

    def setup(layout, topology):
        ops, queues = null_blk.setup(
            nullb,
            layout,
            topology,
            rq_affinity=runv["rq_affinity"],
            timeout_ms=runv["io_timeout"],
            seed=runv["seed"],
        )
        return ops, queues, dev_bytes

    return _spec(job, runv, setup, cpus_allowed, "nullb", null_blk.describe(nullb))


def _apply_mode(given: dict[str, Any], runv: dict[str, Any]) -> None:
    """sq has one hw queue, raw one per CPU: set the driver's queue count, refusing a
    contradicting one."""
    mode = runv["mode"]
    if mode == "mq":
        return
    key = "nr_io_queues" if runv["driver"] == "nvme" else "submit_queues"
    forced = 1 if mode == "sq" else runv["cpus"]
    if key in given and str(given[key]) != str(forced):
        what = "one hw queue" if mode == "sq" else "one hw queue per CPU"
        raise KnobError(f"{key}: --mode {mode} uses {what} ({forced}), got {given[key]!r}")
    given[key] = forced


def _spec(job, runv, setup, cpus_allowed, driver: str, driver_config: dict[str, Any]):
    """The RunSpec and the configuration the report shows, for either driver."""
    from mqrt.runtime import RunSpec
    from mqrt.workers.ioengine import JOB_KNOBS

    spec = RunSpec(
        nr_cpus=runv["cpus"],
        job=job,
        setup=setup,
        cpus_allowed=cpus_allowed,
        cpus_per_core=runv["cpus_per_core"] or None,
        pin=runv["pin"],
        seed=runv["seed"],
        mode=runv["mode"],
    )
    config = {
        "job": {k.name: getattr(job, k.name) for k in JOB_KNOBS},
        "run": runv,
        driver: driver_config,
    }
    return spec, config


def _build_nvme(given, job, runv, nullb_names, nvme_names):
    from mqrt.device import nvme

    wrong = sorted(set(given) & (nullb_names - nvme_names))
    if wrong:
        raise KnobError(f"{wrong[0]}: a nullb option; it does not apply to --driver nvme")
    cfg = nvme.parse_config({k: v for k, v in given.items() if k in nvme_names})
    if job.bs % cfg.lba_size:
        raise KnobError(f"bs: must be a multiple of the lba_size {cfg.lba_size}, got {job.bs}")
    cpus_allowed = _cpus_allowed(runv)
    dev_bytes = cfg.ns_gb << 30

    def setup(layout, topology):
        ops, queues = nvme.setup(
            cfg, layout, topology, rq_affinity=runv["rq_affinity"], timeout_ms=runv["io_timeout"]
        )
        return ops, queues, dev_bytes

    return _spec(job, runv, setup, cpus_allowed, "nvme", nvme.describe(cfg))


def _cpus_allowed(runv) -> list[int] | None:
    if not runv["cpus_allowed"]:
        return None
    from mqrt.blk_mq_cpumap import host_cpus, parse_cpulist

    try:
        cpus = parse_cpulist(runv["cpus_allowed"])
    except ValueError as exc:
        raise KnobError(f"cpus_allowed: {exc}") from None
    bad = sorted(set(cpus) - set(host_cpus()))
    if not cpus or bad:
        raise KnobError(f"cpus_allowed: CPUs {bad or cpus} are not available to this process")
    return cpus


# -- reporting ---------------------------------------------------------------------------------


def _merge_jobs(result, q: int) -> dict[str, Any]:
    """One fio job per request queue: every CPU's job on it, merged."""
    dirs = []
    for name in ("read", "write"):
        ios = nbytes = errors = 0
        clat, slat, lat = LatHist(), LatHist(), LatHist()
        for cpu in result.cpus:
            d = cpu["jobs"][q][name]
            ios += d["ios"]
            nbytes += d["bytes"]
            errors += d["errors"]
            clat.merge(LatHist.from_bytes(d["clat"]))
            slat.merge(LatHist.from_bytes(d["slat"]))
            lat.merge(LatHist.from_bytes(d["lat"]))
        dirs.append(
            {"ios": ios, "bytes": nbytes, "errors": errors, "clat": clat, "slat": slat, "lat": lat}
        )
    depth: dict[int, int] = {}
    for cpu in result.cpus:
        for d, c in enumerate(cpu["jobs"][q]["depth_counts"]):
            if c:
                depth[d] = depth.get(d, 0) + c
    return {"dirs": dirs, "depth": depth}


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


def fio_json(result, config: dict[str, Any], spec) -> dict[str, Any]:
    job = spec.job
    runtime_ms = max((c["measured_ns"] for c in result.cpus), default=0) // 1_000_000
    plist = (
        parse_percentile_list(job.percentile_list) if job.percentile_list else DEFAULT_PERCENTILES
    )
    cpu = _cpu_totals(result)
    jobs = []
    job_opts = {k: str(v) for k, v in config["job"].items()}
    for qi, qinfo in enumerate(result.queues):
        merged = _merge_jobs(result, qi)
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
        for name, d in zip(("read", "write"), merged["dirs"], strict=True):
            entry[name] = dir_stats_json(
                io_bytes=d["bytes"],
                runtime_ms=runtime_ms if d["ios"] else 0,
                total_ios=d["ios"],
                clat=d["clat"],
                lat=d["lat"],
                slat=d["slat"],
                plist=plist,
            )
            all_lat.merge(d["lat"])
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
                "latency_ns": lat_ns,
                "latency_us": lat_us,
                "latency_ms": lat_ms,
            }
        )
        jobs.append(entry)
    now = time.time()
    return {
        "fio version": f"mqrt-{__version__}",
        "timestamp": int(now),
        "timestamp_ms": int(now * 1000),
        "time": time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(now)),
        "global options": {
            k: str(v) for k, v in config.get("nullb", config.get("nvme", {})).items()
        },
        "jobs": jobs,
        "mqrt": _mqrt_object(result, config, cpu),
    }


def _mqrt_object(result, config, cpu) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "version": __version__,
        "config": config,
        "host": {**result.host, "python": sys.version.split()[0], "topology": result.topology},
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
            }
            for c in result.cpus
        ],
        "queues": result.queues,
        "device": result.device,
        "driver": _sum_driver(result),
        "messages": result.messages,
    }


def _sum_driver(result) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in result.cpus:
        for k, v in c.get("driver", {}).items():
            out[k] = out.get(k, 0) + v
    return out


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


def render_text(report: dict[str, Any], out) -> None:
    """fio's human summary, one block per job, then mqrt's own lines."""
    m = report["mqrt"]
    for job in report["jobs"]:
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
    s = m["summary"]
    inv = m["invariants"]
    print(
        f"\nmqrt: {len(m['cpus'])} CPUs ({m['host']['topology']}), "
        f"{s['cpu_us_per_io']:.2f} us of CPU per I/O, "
        f"first I/O {s['start_to_first_io_s'] * 1000:.0f} ms after the command started",
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
    if "reference" in m:
        _render_reference(report, out)
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
        "merges",
    )
    print("mqrt: " + ", ".join(f"{k}={totals.get(k, 0)}" for k in keys), file=out)


def _render_reference(report: dict[str, Any], out) -> None:
    """This run next to the bare references measured right after it."""
    ref = report["mqrt"]["reference"]
    rtt = ref["wakeup_rtt_ns"]
    pct = {}
    iops = 0.0
    for job in report["jobs"]:
        for name in ("read", "write"):
            iops += job[name]["iops"]
            pct = pct or job[name]["clat_ns"].get("percentile", {})
    line = f"mqrt: reference: eventfd wake-up round trip {rtt / 1000:.1f} us"
    if pct:
        p50, p99 = pct.get("50.000000"), pct.get("99.000000")
        if p50 and p99:
            line += (
                f"; clat p50 {p50 / 1000:.1f} us ({p50 / rtt:.1f}x), "
                f"p99 {p99 / 1000:.1f} us ({p99 / rtt:.1f}x)"
            )
    print(line, file=out)
    loop = ref.get("sq_cq_loop_iops")
    if loop:
        print(
            f"mqrt: reference: bare SQ -> device -> CQ loop {_si(loop)} IOPS; "
            f"this run {_si(iops)} = {100 * iops / loop:.1f}% of it",
            file=out,
        )


class _Progress:
    """A one-line live status on stderr, only when it is a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.last = None

    def __call__(self, snap: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        iops = 0.0
        if self.last is not None:
            dt = now - self.last[0]
            if dt > 0:
                iops = (snap["completed"] - self.last[1]) / dt
        self.last = (now, snap["completed"])
        sys.stderr.write(
            f"\rmqrt: [R] {snap['elapsed_s']:.1f}s [{_si(iops)} IOPS] "
            f"[inflight {snap['inflight']}] [eta {snap['remaining_s']:.0f}s]   "
        )
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.last is not None:
            sys.stderr.write("\r" + " " * 70 + "\r")
            sys.stderr.flush()


def main(args: argparse.Namespace) -> int:
    from mqrt.cli import UsageError

    try:
        spec, config = build(_given(args))
    except KnobError as exc:
        raise UsageError(str(exc)) from None
    out = sys.stdout
    if args.output:  # opened before the run: a bad path must not cost the results
        try:
            out = open(args.output, "w")  # noqa: SIM115
        except OSError as exc:
            raise UsageError(f"-o: cannot write {args.output}: {exc.strerror}") from None
    try:
        return _run_and_report(spec, config, args, out)
    finally:
        if out is not sys.stdout:
            out.close()


def _run_and_report(spec, config, args: argparse.Namespace, out) -> int:
    from mqrt.blk_mq import BlkMqError
    from mqrt.cli import UsageError
    from mqrt.runtime import RunError, run

    progress = _Progress(not args.quiet and args.output_format == "normal")
    spec.progress = progress
    try:
        result = run(spec)
    except BlkMqError as exc:
        raise UsageError(str(exc)) from None
    except RunError as exc:
        print(f"mqrt: error: {exc}", file=sys.stderr)
        return 1
    finally:
        progress.done()
    report = fio_json(result, config, spec)
    if "nvme" in config and not result.interrupted:
        from mqrt.microbench import reference_figures

        report["mqrt"]["reference"] = reference_figures(args.reference)
    if args.output_format == "json":
        json.dump(report, out, indent=2)
        out.write("\n")
    else:
        render_text(report, out)
    if result.interrupted:
        print("mqrt: interrupted: the figures cover the time before Ctrl-C", file=sys.stderr)
        return 130
    return 0 if not result.invariants.get("violations") else 3

"""``mqrt bench``: run fio-shaped jobs on emulated CPUs through blk-mq (or the
legacy single queue, or no block layer) and a driver, and report them the way fio
does: a human summary or fio-shaped JSON, with an ``mqrt`` object (configuration,
host, the sweep's points, invariants, per-CPU and per-hctx counters).

Options carry fio's names for the job (``--rw``, ``--bs``, ``--iodepth`` ...) and
null_blk's and nvme's for the devices (``--irqmode``, ``--completion_nsec``,
``--submit_queues`` ...); dashes and underscores are both accepted.  A bad value is a
one-line error naming the option and what it accepts.  A list of values sweeps
(:mod:`mqrt.bench.sweep`); a fio job file gives the jobs (:mod:`mqrt.bench.jobfile`).  Without
any option, a small mq-versus-sq sweep over 1..N CPUs runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any

from mqrt.errors import UsageError
from mqrt.lib import signals
from mqrt.lib.knobs import Knob, KnobError, canonical, parse_knobs

#: The most emulated CPUs: each is a process (the 16-bit fields of a request would
#: hold 65536; memory runs out long before, see cpu_memory_bytes()).
MAX_CPUS = 1024
#: What one CPU process takes of its own (USS, measured: 7.5 MB at 16 CPUs, 8.4 MB at
#: 128, 9.1 MB at 512) and, with a margin, what each other CPU adds to it (its
#: handles on every ctx list, ...).
CPU_MEMORY_BYTES = 8 << 20
CPU_MEMORY_PER_CPU_BYTES = 4 << 10


def cpu_memory_bytes(nr_cpus: int) -> int:
    """About how much memory ``nr_cpus`` CPU processes take together."""
    return nr_cpus * (CPU_MEMORY_BYTES + nr_cpus * CPU_MEMORY_PER_CPU_BYTES)


def _mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return None


#: Options of the run itself (not of the job or the driver).
RUN_KNOBS: tuple[Knob, ...] = (
    Knob(
        "cpus",
        "int",
        2,
        f"Number of emulated CPUs, 1..{MAX_CPUS} and at most what the host's available "
        "memory holds (worker processes, each ~8 MB of memory of its own and a few kB "
        "more per other CPU: 512 CPUs took 4.6 GB). Default: 2",
        1,
        MAX_CPUS,
    ),
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
    Knob(
        "scheduler",
        "choice",
        "none",
        "I/O scheduler of every queue (sysfs queue/scheduler; fio's ioscheduler): none, "
        "mq-deadline, or default (the kernel's choice: mq-deadline for a device of one "
        "hw queue, none for more); --mode mq only. Default: none",
        choices={c: c for c in ("none", "mq-deadline", "default")},
    ),
    Knob("io_timeout", "int", 5000, "Request timeout in ms. Default: 5000 (null_blk)", 1, 3600000),
    Knob(
        "nomerges",
        "int",
        0,
        "Merging (sysfs queue/nomerges): 0 all merges, 1 only the one-hit merge (the "
        "newest request of the plug or ctx list), 2 none. Default: 0",
        0,
        2,
    ),
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
    Knob(
        "async_depth",
        "int",
        0,
        "Writes take tags below this shallow depth, as mq-deadline's async_depth "
        "limits them (0: no limit). Default: 0",
        0,
        10240,
    ),
    Knob(
        "sbitmap",
        "choice",
        "current",
        "Which kernel's sbitmap the tags run: legacy (v6.1: per-wait-queue wait_cnt "
        "wake-ups, per-word shallow depth), current (v6.6: completion counting, "
        "per-word shallow depth) or newest (v6.17: shallow depth of the whole map). "
        "Default: current (the 6.6 LTS; its wake-up is every kernel's since 6.2)",
        choices={"legacy": "legacy", "current": "current", "newest": "newest"},
    ),
    Knob("seed", "int", 0, "Seed for everything random in the run. Default: 0", 0, 1 << 62),
    Knob(
        "inspector",
        "int",
        0,
        "Attach a read-only inspector to each run that reads every one of its debugfs "
        "and sysfs files this many times a second (mqrt inspect RUN --watch): what "
        "watching a run costs it; 0: none. Default: 0",
        0,
        100,
    ),
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
    sw = p.add_argument_group(
        "sweep (any numeric or choice option may be a list: 1,2,4 or 1-8 or 1-8:x2)"
    )
    sw.add_argument(
        "jobfile", nargs="?", metavar="JOBFILE",
        help="a fio job file: its groups of jobs (split by stonewall) run in turn; "
        "command-line options override it",
    )  # fmt: skip
    sw.add_argument(
        "--repeat", type=_positive_int, default=None, metavar="N",
        help="runs per point; the median run stands for the point. Default: 1 (3 for the "
        "default sweep)",
    )  # fmt: skip
    sw.add_argument(
        "--inject", metavar="NAME=PCT:MAX_US,...", default="",
        help="hold race windows open: at each named point (see mqrt.lib.inject.POINTS: "
        "sbq.clear.before_wake, tag.get.before_sleep, ...) wait up to MAX_US "
        "microseconds, PCT percent of the time (seeded by --seed)",
    )  # fmt: skip
    tl = p.add_argument_group(
        "timeline (sysfs writes during the run, made in turn by a writer task on CPU 0; "
        "times after the run's start: 2s, 2.5s, 500ms, 250us, a bare number is seconds)"
    )
    tl.add_argument(
        "--at", action="append", default=[], metavar="TIME:WRITE",
        help="write once at TIME; WRITE is [DEV/]ATTR=VALUE or [DEV/]VERB[=ARG], DEV a "
        "queue of the run (nullb0, nvme0n1, ...; none: every queue in turn). Attributes: "
        f"{_attributes_help()}. E.g. --at 2s:nullb0/queue/nr_requests=32. Repeatable",
    )  # fmt: skip
    tl.add_argument(
        "--every", action="append", default=[], metavar="PERIOD[@FROM[..TO]]:WRITE",
        help="write every PERIOD (>= 1ms) from FROM (default 0) while before TO (default: "
        "the run's end); a tick due while another write runs starts late, ticks that "
        "passed meanwhile are skipped (counted). E.g. --every 50ms@1s..3s:queue/nr_requests=16. "
        "Repeatable",
    )  # fmt: skip
    out = p.add_argument_group("output")
    out.add_argument(
        "--output-format",
        "--output_format",
        type=_output_formats,
        default=("normal",),
        metavar="FMT[,FMT]",
        help="normal (fio's text), json (fio's JSON), json+ (json with each latency "
        "histogram's bins) or terse (fio's terse v3 lines), or several, comma separated "
        "(fio prints JSON first). Default: normal",
    )
    out.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    out.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="on stderr, a line at each step of every run: its segment and owner pid (for "
        "ps, top or a debugger), the start, the deadline, a stop, a hung process, the "
        "report",
    )
    out.add_argument(
        "--reference",
        action="store_true",
        help="after an nvme run, also time the bare SQ -> device -> CQ loop (~1 s) and "
        "give this run's IOPS as a share of it (the eventfd wake-up round trip, next to "
        "the latency percentiles, is always measured)",
    )
    out.add_argument(
        "--trace", action="store_true",
        help="record every CPU's events (tag get/free, sleeps, wake-ups, timeouts...) in "
        "shared-memory rings; costs a few percent of IOPS",
    )  # fmt: skip
    out.add_argument(
        "--trace-dump", "--trace_dump", metavar="FILE",
        help="with --trace: write the trace here (msgpack) if a run fails; read it with "
        "mqrt race show FILE",
    )  # fmt: skip
    out.add_argument(
        "--profile", metavar="DIR",
        help="cProfile every CPU into DIR/cpuN.prof (DIR/runK/ when there are several "
        "runs) and print, on stderr, where the CPU time per I/O goes by stage",
    )  # fmt: skip
    out.add_argument(
        "--plot", metavar="FILE.png",
        help="draw IOPS versus CPUs per mode and the latency percentiles (needs mqrt[plot])",
    )  # fmt: skip
    p.set_defaults(func=main)


def _attributes_help() -> str:
    from mqrt.block.blk_sysfs import ATTRIBUTES

    return "; ".join(a.help for a in ATTRIBUTES.values())


#: fio's --output-format values.
OUTPUT_FORMATS = ("normal", "json", "json+", "terse")


def _output_formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip() for f in text.split(","))
    bad = [f for f in formats if f not in OUTPUT_FORMATS]
    if bad or not formats:
        raise argparse.ArgumentTypeError(
            f"bad value {bad[0] if bad else text!r}; allowed: {', '.join(OUTPUT_FORMATS)}, "
            "comma separated"
        )
    return formats


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 1000:
        raise argparse.ArgumentTypeError(f"must be 1..1000, got {text!r}")
    return n


def _given(args: argparse.Namespace) -> dict[str, Any]:
    return {k[5:]: v for k, v in vars(args).items() if k.startswith("knob_") and v is not None}


def build(given: dict[str, Any], timeline: list | None = None):
    """Validate every option and build the RunSpec (UsageError-free: KnobError);
    ``timeline``: the run's parsed --at/--every writes (mqrt.bench.timeline), checked
    here against the queues the configuration makes."""
    spec, config, queues = _build(given, timeline or [])
    if timeline:
        from mqrt.bench.timeline import TimelineError, bind

        if spec.mode == "raw":
            raise TimelineError(
                f"{timeline[0].source}: {timeline[0].text!r}: --mode raw has no block "
                "layer, so no queue attributes"
            )
        if spec.mode == "sq":
            for w in timeline:
                if w.attr.startswith("queue/iosched/") or (
                    w.attr == "queue/scheduler" and w.value != "none"
                ):
                    raise TimelineError(
                        f"{w.source}: {w.text!r}: --mode sq has no elevator (use --mode mq)"
                    )
        bind(timeline, queues, spec.nr_cpus)
        spec.timeline = list(timeline)
        config["timeline"] = [f"{w.kind} {w.text}" for w in timeline]
    return spec, config


def _build(given: dict[str, Any], timeline: list):
    """build() without binding the timeline: the RunSpec, the report's configuration
    and the queues the run will have (mqrt.block.blk_sysfs.QueueInfo); ``timeline``
    says whether the tag sets must be declared for nr_hw_queues writes."""
    from mqrt.block.blk_sysfs import QueueInfo
    from mqrt.block.elevator import check_mode
    from mqrt.device import null_blk, nvme
    from mqrt.device.nvme_model import DEVICE_KNOBS
    from mqrt.workers.ioengine import JOB_FILE_KNOBS, JOB_KNOBS, JobSpec

    given = {canonical(k): v for k, v in given.items()}
    job_names = {k.name for k in (*JOB_KNOBS, *JOB_FILE_KNOBS)}
    run_names = {k.name for k in RUN_KNOBS}
    nullb_names = {k.name for k in null_blk.NULLB_KNOBS}
    nvme_names = {k.name for k in (*nvme.NVME_KNOBS, *DEVICE_KNOBS)}
    unknown = set(given) - job_names - run_names - nullb_names - nvme_names
    if unknown:
        raise KnobError(f"unknown option {sorted(unknown)[0]!r}")
    job = JobSpec.from_options({k: v for k, v in given.items() if k in job_names})
    runv = parse_knobs(RUN_KNOBS, {k: v for k, v in given.items() if k in run_names})
    _apply_mode(given, runv)
    check_mode(runv["scheduler"], runv["mode"])
    if runv["driver"] == "nvme":
        return _build_nvme(given, job, runv, nullb_names, nvme_names, timeline)
    wrong = sorted(set(given) & (nvme_names - nullb_names))
    if wrong:
        raise KnobError(f"{wrong[0]}: an nvme option; add --driver nvme")
    nullb = null_blk.parse_config({k: v for k, v in given.items() if k in nullb_names})
    max_hw_queues = _max_hw_queues(nullb, runv, timeline)
    # null_add_dev(): nullbN, each queue with the set's hw_queue_depth tags
    queues = [
        QueueInfo(
            f"nullb{i}",
            i,
            nullb.hw_queue_depth,
            tag_set="nullb_tag_set" if nullb.shared_tags else f"nullb{i}.tag_set",
            max_hw_queues=max_hw_queues,
        )
        for i in range(nullb.nr_devices)
    ]
    cpus_allowed = _cpus_allowed(runv)
    dev_bytes = nullb.gb << 30
    if job.min_bs % nullb.blocksize:
        raise KnobError(
            f"bs: must be a multiple of the device blocksize {nullb.blocksize}, got {job.bs}"
        )
    if runv["mode"] == "raw":
        # Raw mode splits each tag space's slots between the CPUs that use it, and
        # each device's queue keeps its own free lists.
        if nullb.shared_tags and nullb.nr_devices > 1:
            raise KnobError("shared_tags: --mode raw gives each device its own slots; use 0")
        if nullb.shared_tag_bitmap and nullb.hw_queue_depth < runv["cpus"]:
            raise KnobError(
                f"hw_queue_depth: --mode raw with shared_tag_bitmap needs a tag per CPU "
                f"(>= {runv['cpus']}), got {nullb.hw_queue_depth}"
            )

    def setup(layout, topology):
        ops, queues = null_blk.setup(
            nullb,
            layout,
            topology,
            rq_affinity=runv["rq_affinity"],
            timeout_ms=runv["io_timeout"],
            seed=runv["seed"],
            generation=_generation(runv),
            async_depth=runv["async_depth"],
            nomerges=runv["nomerges"],
            elevator=runv["scheduler"] if runv["mode"] == "mq" else "none",
            max_hw_queues=max_hw_queues,
        )
        return ops, queues, dev_bytes

    spec, config = _spec(job, runv, setup, cpus_allowed, "nullb", null_blk.describe(nullb))
    return spec, config, queues


def _max_hw_queues(nullb, runv: dict[str, Any], timeline: list) -> int:
    """The most submit queues each nullb tag set is declared with: ``max_hw_queues``,
    or the CPU count (the kernel's nr_cpu_ids bound) when the timeline writes
    nr_hw_queues; 0 (the count cannot change) otherwise."""
    given = nullb.max_hw_queues
    if not given and not any(w.attr == "nr_hw_queues" for w in timeline):
        return 0
    cpus = runv["cpus"]
    if not given:
        given = cpus
    submit = min(nullb.submit_queues, cpus)
    if not submit <= given <= cpus:
        raise KnobError(
            f"max_hw_queues: must be in {submit}..{cpus} (submit_queues..cpus), got {given}"
        )
    if nullb.poll_queues:
        raise KnobError(
            "max_hw_queues: the hw queue count changes only without poll_queues (one queue map)"
        )
    if runv["mode"] != "mq":
        raise KnobError(f"max_hw_queues: --mode {runv['mode']} has a fixed hw queue count")
    return given


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
    from mqrt.runtime.spec import RunSpec
    from mqrt.workers.ioengine import JOB_FILE_KNOBS, JOB_KNOBS

    need, avail = cpu_memory_bytes(runv["cpus"]), _mem_available()
    if avail is not None and need > avail:
        raise KnobError(
            f"cpus: {runv['cpus']} CPUs need about {need / (1 << 30):.1f} GiB of memory, "
            f"this host has {avail / (1 << 30):.1f} GiB available"
        )
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
        "job": {
            **{k.name: getattr(job, k.name) for k in JOB_KNOBS},
            **{
                k.name: getattr(job, k.name)
                for k in JOB_FILE_KNOBS
                if getattr(job, k.name) != k.default
            },
        },
        "run": runv,
        driver: driver_config,
    }
    return spec, config


def _build_nvme(given, job, runv, nullb_names, nvme_names, timeline):
    from mqrt.device import nvme

    wrong = sorted(set(given) & (nullb_names - nvme_names))
    if wrong:
        raise KnobError(f"{wrong[0]}: a nullb option; it does not apply to --driver nvme")
    cfg = nvme.parse_config({k: v for k, v in given.items() if k in nvme_names})
    if job.min_bs % cfg.lba_size:
        raise KnobError(f"bs: must be a multiple of the lba_size {cfg.lba_size}, got {job.bs}")
    cpus_allowed = _cpus_allowed(runv)
    dev_bytes = cfg.ns_gb << 30
    # nr_hw_queues=N: up to the I/O queues the probe creates (nvme_setup_io_queues())
    max_hw_queues = 0
    if any(w.attr == "nr_hw_queues" for w in timeline):
        if cfg.poll_queues:
            raise KnobError(
                "poll_queues: the hw queue count changes only without poll queues (one queue map)"
            )
        if runv["mode"] != "mq":
            raise KnobError(f"mode: --mode {runv['mode']} has a fixed hw queue count")
        max_hw_queues = min(cfg.nr_io_queues or runv["cpus"], runv["cpus"])

    def setup(layout, topology):
        ops, queues = nvme.setup(
            cfg,
            layout,
            topology,
            rq_affinity=runv["rq_affinity"],
            timeout_ms=runv["io_timeout"],
            generation=_generation(runv),
            async_depth=runv["async_depth"],
            nomerges=runv["nomerges"],
            elevator=runv["scheduler"] if runv["mode"] == "mq" else "none",
            resizable=bool(max_hw_queues),
        )
        return ops, queues, dev_bytes

    from mqrt.block.blk_sysfs import QueueInfo

    # the namespaces' queues, nvme0n1.., on the I/O tag set (one SQ slot kept empty)
    queues = [
        QueueInfo(
            f"nvme0n{i + 1}",
            i,
            cfg.io_queue_depth - 1,
            tag_set="nvme_tag_set",
            max_hw_queues=max_hw_queues,
        )
        for i in range(cfg.nr_namespaces)
    ]
    spec, config = _spec(job, runv, setup, cpus_allowed, "nvme", nvme.describe(cfg))
    return spec, config, queues


def _generation(runv):
    from mqrt.lib.sbitmap import SbqGeneration

    return SbqGeneration(runv["sbitmap"])


def _cpus_allowed(runv) -> list[int] | None:
    if not runv["cpus_allowed"]:
        return None
    from mqrt.block.blk_mq_cpumap import host_cpus, parse_cpulist

    try:
        cpus = parse_cpulist(runv["cpus_allowed"])
    except ValueError as exc:
        raise KnobError(f"cpus_allowed: {exc}") from None
    bad = sorted(set(cpus) - set(host_cpus()))
    if not cpus or bad:
        raise KnobError(f"cpus_allowed: CPUs {bad or cpus} are not available to this process")
    return cpus


# -- reporting ---------------------------------------------------------------------------------


#: Records per CPU ring with --trace.
TRACE_ENTRIES = 4096

#: What ``mqrt bench`` with no option runs: the blk-mq paper's comparison in small.
DEFAULT_RUNTIME_S = 2.0
DEFAULT_REPEAT = 3


def default_sweep() -> dict[str, Any]:
    """mq versus sq over 1, 2, 4 ... up to this process's host CPUs (at most 4 points
    per mode), nullb completing inline, so the block layer is what is measured."""
    n = len(os.sched_getaffinity(0))
    cpus = [1]
    while cpus[-1] * 2 <= n and len(cpus) < 4:
        cpus.append(cpus[-1] * 2)
    if cpus[-1] != n and len(cpus) < 4:
        cpus.append(n)
    return {
        "mode": "mq,sq",
        "cpus": ",".join(map(str, cpus)),
        "irqmode": "none",
        "runtime": str(DEFAULT_RUNTIME_S),
    }


def _all_knobs() -> dict[str, Knob]:
    from mqrt.workers.ioengine import JOB_FILE_KNOBS

    return {k.name: k for knobs in (*(g for _t, g in _groups()), JOB_FILE_KNOBS) for k in knobs}


def _jobfile_sections(path: str, given: dict[str, Any], knobs: dict[str, Knob]) -> list:
    """The job file's sections as (name, mqrt options, section, report options); its
    notes (options without effect, jobs run one after the other) go to stderr."""
    from mqrt.bench.fio_options import ALIASES, FIO_FLAGS, FIO_NAMES, translate
    from mqrt.bench.jobfile import parse_jobfile
    from mqrt.workers.ioengine import JOB_FILE_KNOBS

    file_only = {k.name for k in JOB_FILE_KNOBS}
    mqrt_only = {
        n: k for n, k in knobs.items() if n not in FIO_NAMES and n not in ALIASES
        and n not in file_only
    }  # fmt: skip
    flags = {*(n for n, k in mqrt_only.items() if k.kind == "bool"), *FIO_FLAGS}
    out: list = []
    notes: list[str] = []
    for i, sec in enumerate(parse_jobfile(path, None, flags=flags)):
        tr = translate(sec.options, mqrt_only, sec.line_of, knobs)
        notes += [n for n in tr.notes if n not in notes]
        options = {**tr.options, **given}
        if "bs" in given:  # the command line's bs is every direction's
            options.pop("blocksizes", None)
        if "cpus" not in options:
            options["cpus"] = "1"  # fio's numjobs default: one clone, one CPU
        member = (sec.name, options, sec, tr.report)
        if i == 0 or tr.stonewall:
            out.append([member])  # a new group: it waits for the ones before
        else:
            out[-1].append(member)  # fio runs it beside the jobs before it
    for note in notes:
        print(f"mqrt: {note}", file=sys.stderr)
    return [g[0] if len(g) == 1 else _group(g, given) for g in out]


def _group(members: list, given: dict[str, Any]) -> tuple:
    """Jobs of one group (no stonewall between them) as one point: each job's clones
    (numjobs, default 1) on CPUs of their own, in file order."""
    names = [m[0] for m in members]
    _, _, sec0, report0 = members[0]
    if "cpus" in given:
        raise sec0.located(
            KnobError(
                f"cpus: a group of jobs side by side ({', '.join(names)}) takes one CPU "
                "per clone (numjobs); --cpus does not apply"
            )
        )
    return ("+".join(names), {"_members": members}, sec0, report0)


def _typed(config: dict[str, Any], name: str) -> Any:
    for section in config.values():
        if isinstance(section, dict) and name in section:
            return section[name]
    return None


def plan_points(args: argparse.Namespace) -> tuple[list, dict[str, list[Any]], int, bool]:
    """Every point of the command, built and validated before anything runs: the
    points (each with its RunSpec), the axes with typed values, the repetitions, and
    whether this is the default sweep."""
    from mqrt.bench.sweep import points, split_axes
    from mqrt.bench.timeline import TimelineError
    from mqrt.bench.timeline import parse as parse_timeline

    given = _given(args)
    knobs = _all_knobs()
    cli_timeline = parse_timeline(
        getattr(args, "at", None) or [], getattr(args, "every", None) or [], "--"
    )
    is_default = not given and not args.jobfile and not cli_timeline
    repeat = args.repeat or (DEFAULT_REPEAT if is_default else 1)
    sections: list[tuple[str | None, dict[str, Any], Any, dict[str, str]]] = []
    if is_default:
        sections.append((None, default_sweep(), None, {}))
    elif args.jobfile:
        sections = _jobfile_sections(args.jobfile, given, knobs)
    else:
        sections.append((None, given, None, {}))
    planned = []
    axes_all: dict[str, list[Any]] = {}
    for name, options, sec, report_opts in sections:
        timeline = _section_timeline(sec)
        if "_members" in options:  # every member's writes, each once (a global's)
            for _m, _o, msec, _r in options["_members"][1:]:
                timeline += [w for w in _section_timeline(msec) if w not in timeline]
        timeline += cli_timeline
        if "_members" in options:
            p = _plan_group(options["_members"], timeline)
            p.params = {"job": name}
            planned.append(p)
            axes_all.setdefault("job", []).append(name)
            continue
        try:
            base, axes = split_axes(options, knobs)
        except KnobError as exc:
            raise sec.located(exc) if sec is not None else exc from None
        for p in points(base, axes):
            try:
                spec, config = build(dict(p.given), timeline)
            except TimelineError:
                raise  # it names its option and where it was given
            except KnobError as exc:
                where = f" (at {_point_label(name, p.params)})" if axes or name else ""
                err = KnobError(f"{exc}{where}")
                raise (sec.located(err) if sec is not None else err) from None
            p.params = {k: _typed(config, k) for k in p.params}
            if len(sections) > 1:
                p.params = {"job": name, **p.params}
            if spec.job.offset_increment:  # each clone (CPU) at its own offset
                spec.cpu_jobs = spec.job.clones(spec.nr_cpus)
            if report_opts:  # fio's reporting options of the job file, for the report
                config["fio_report"] = dict(report_opts)
            p.spec, p.config = spec, config
            planned.append(p)
            for k, v in p.params.items():
                vals = axes_all.setdefault(k, [])
                if v not in vals:
                    vals.append(v)
    for i, p in enumerate(planned):
        p.index = i
    return planned, axes_all, repeat, is_default


def _section_timeline(sec) -> list:
    """A job section's ``at=`` and ``every=`` lines, parsed (errors with file:line)."""
    from mqrt.bench.timeline import parse_at, parse_every

    if sec is None:
        return []
    parsers = {"at": parse_at, "every": parse_every}
    return [parsers[key](value, f"{file}:{line}: {key}") for key, value, file, line in sec.timeline]


def _plan_group(members: list, timeline: list | None = None):
    """One point running fio's jobs of a group side by side: every member's clones
    on CPUs of their own (member after member, as fio's cpus_allowed_policy=split
    deals them out), one RunSpec."""
    from mqrt.bench.sweep import Point
    from mqrt.workers.ioengine import JOB_FILE_KNOBS, JOB_KNOBS, JobSpec

    job_names = {k.name for k in (*JOB_KNOBS, *JOB_FILE_KNOBS)}
    cpu_jobs: list = []
    job_members: list[tuple[str, list[int]]] = []
    first_given: dict[str, Any] | None = None
    for mname, options, sec, _report in members:
        given = {canonical(k): v for k, v in options.items()}
        for k, v in given.items():
            own_list = k in ("blocksizes", "rate", "rate_iops_rw")
            if "," in str(v) and not own_list and (k in job_names or k == "cpus"):
                raise sec.located(
                    KnobError(f"{k}: jobs side by side in a group cannot sweep ({v!r})")
                )
        clones = int(given.pop("cpus", 1))
        try:
            job = JobSpec.from_options({k: v for k, v in given.items() if k in job_names})
        except KnobError as exc:
            raise sec.located(exc) from None
        first = len(cpu_jobs)
        cpu_jobs += job.clones(clones)
        job_members.append((mname, list(range(first, first + clones))))
        if first_given is None:
            first_given = given
    assert first_given is not None
    sec0 = members[0][2]
    from mqrt.bench.timeline import TimelineError

    try:
        spec, config = build({**first_given, "cpus": len(cpu_jobs)}, timeline)
    except TimelineError:
        raise
    except KnobError as exc:
        raise sec0.located(exc) from None
    spec.job = max(cpu_jobs, key=lambda j: j.ramp_time + j.runtime)
    spec.cpu_jobs = cpu_jobs
    spec.job_members = job_members
    config["jobs"] = {m: {"cpus": cpus} for m, cpus in job_members}
    report = members[0][3]
    if report:
        config["fio_report"] = dict(report)
    p = Point(index=0, params={}, given=first_given)
    p.spec, p.config = spec, config
    return p


def _point_label(section: str | None, params: dict[str, Any]) -> str:
    from mqrt.bench.sweep import format_params

    label = format_params(params)
    return f"job {section}: {label}" if section else label


def main(args: argparse.Namespace) -> int:

    try:
        planned, axes, repeat, is_default = plan_points(args)
        if args.inject:
            from mqrt.lib.inject import parse

            table = parse(args.inject)
            for p in planned:
                p.spec.inject = table
    except KnobError as exc:
        raise UsageError(str(exc)) from None
    if args.plot:
        from mqrt.plot import check_available

        check_available()
    out = sys.stdout
    if args.output:  # opened before the run: a bad path must not cost the results
        try:
            out = open(args.output, "w")  # noqa: SIM115
        except OSError as exc:
            raise UsageError(f"-o: cannot write {args.output}: {exc.strerror}") from None
    try:
        return _run_and_report(planned, axes, repeat, is_default, args, out)
    finally:
        if out is not sys.stdout:
            out.close()


def _run_and_report(planned, axes, repeat, is_default, args, out) -> int:
    from mqrt.bench.report import run_summary
    from mqrt.bench.sweep import format_params
    from mqrt.bench.text import Progress
    from mqrt.block.blk_mq_structs import BlkMqError
    from mqrt.inspect.watcher import Inspector
    from mqrt.runtime.owner import run
    from mqrt.runtime.spec import RunError

    job0 = planned[0].spec.job
    bins = "json+" in args.output_format
    progress = Progress(
        not args.quiet, len(planned) * repeat, job0.runtime + job0.ramp_time + 0.15, args.verbose
    )
    t0 = time.monotonic()
    interrupted = False
    failure: dict[str, Any] | None = None
    messages: list[str] = []
    log_first: dict[str | None, int] = {}  #: each job-file section's first job number
    nr_runs = 0
    next_log = 1
    try:
        for p in planned:
            for rep in range(repeat):
                label = format_params(p.params)
                if repeat > 1:
                    label = f"{label} #{rep + 1}".strip()
                progress.start_run(label)
                p.spec.progress = progress
                p.spec.on_event = progress.event
                p.spec.on_start = progress.announce
                inspector = Inspector(p.config["run"]["inspector"])
                p.spec.on_published = inspector.attach
                if args.trace or args.trace_dump:
                    p.spec.trace_entries = TRACE_ENTRIES
                    p.spec.trace_dump = args.trace_dump
                if args.profile:
                    nr_runs += 1
                    p.spec.profile_dir = _profile_dir(args.profile, nr_runs, len(planned) * repeat)
                try:
                    with inspector:
                        result = run(p.spec)
                except signals.Abort:
                    raise
                except KeyboardInterrupt:  # before a run's CPUs ran: keep what was measured
                    interrupted = True
                    break
                except BlkMqError as exc:
                    raise UsageError(str(exc)) from None
                except RunError as exc:
                    # A process died or hung: report what was measured, and why it ended.
                    with signals.deferred():
                        failure = _failure(exc, p.params, p.spec.nr_cpus)
                        if exc.partial is not None:
                            with contextlib.suppress(Exception):  # as much as the CPUs left
                                summary = run_summary(exc.partial, p.config, p.spec, bins)
                                p.runs.append(summary | {"partial": True})
                    break
                with signals.deferred():  # the figures exist: a signal here keeps them
                    progress.end_run()
                    if p.spec.profile_dir:
                        from mqrt.bench.profile import format_table, profile_files

                        cpu_s = sum(c["usr_s"] + c["sys_s"] for c in result.cpus)
                        table = format_table(profile_files(p.spec.profile_dir), cpu_s)
                        print(table, file=sys.stderr)
                    p.runs.append(run_summary(result, p.config, p.spec, bins))
                    # fio numbers its jobs through the job file: a section's jobs
                    # come after those of the sections before it
                    first = log_first.setdefault(p.params.get("job"), next_log)
                    next_log = max(next_log, first + len(result.cpus) * len(result.queues))
                    if p.spec.job.logging:  # fio's logs, written again by each run
                        from mqrt.bench.fiolog import write_logs

                        try:
                            write_logs(result, p.spec.job, first=first)
                        except OSError as exc:
                            messages.append(f"logs not written: {exc}")
                    for msg in result.messages:
                        if msg not in messages:
                            messages.append(msg)
                if result.interrupted or signals.received():
                    interrupted = True
                    break
            if interrupted or failure:
                break
    except signals.Abort:
        raise
    except KeyboardInterrupt:  # between runs (or in the progress line): keep the figures
        interrupted = True
    finally:
        progress.done()
    # The figures exist: a signal from here on skips the optional work, never the report.
    try:
        progress.event("reporting")
        return _report(
            planned, axes, repeat, is_default, args, out, t0, interrupted, messages, failure
        )
    except signals.Abort:
        raise
    except KeyboardInterrupt:  # landed outside the report's own deferral: print it anyway
        return _report(planned, axes, repeat, is_default, args, out, t0, True, messages, failure)


def _profile_dir(top: str, run: int, nr_runs: int) -> str:
    """Where run number ``run`` (from 1) writes its CPUs' profiles: ``top`` itself for
    a single run, else ``top/runK``."""
    path = top if nr_runs == 1 else os.path.join(top, f"run{run}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--profile: cannot create {path}: {exc.strerror}") from None
    return path


def _failure(exc: Exception, params: dict[str, Any], nr_cpus: int) -> dict[str, Any]:
    """The JSON ``error`` of a run that could not complete: which process, its pid,
    why, and which figures are partial (the point it ended, the CPUs whose figures
    it has, the device's counters as last published)."""
    result = getattr(exc, "partial", None)
    dead = (
        result.dead[0] if result is not None and result.dead else getattr(exc, "dead", None) or {}
    )
    reported = sorted(c["cpu"] for c in result.cpus) if result is not None else []
    hung = dead.get("hung", {})
    return {
        "role": dead.get("role"),
        "cpu": dead.get("cpu"),
        "pid": dead.get("pid"),
        "reason": dead.get("how", str(exc)),
        **({"state": hung["state"], "doing": hung["phase"]} if hung else {}),
        "message": str(exc),
        "partial": {
            "point": params,
            "cpus_reported": reported,
            "cpus_missing": sorted(set(range(nr_cpus)) - set(reported)),
            "device_counters": "as last published"
            if any(d["role"] == "device" for d in (result.dead if result else []))
            else "complete",
            "later_points": "not run",
        },
    }


def _report(
    planned, axes, repeat, is_default, args, out, t0, interrupted, messages, failure=None
) -> int:
    from mqrt.bench.report import assemble

    report = assemble(
        planned, axes, repeat, wall_s=time.monotonic() - t0, interrupted=interrupted,
        messages=messages,
    )  # fmt: skip
    if failure is not None:
        report["mqrt"]["error"] = failure
        with signals.deferred():
            _print_report(report, args, False, out)
        print(f"mqrt: error: {failure.get('message') or failure['reason']}", file=sys.stderr)
        return 1
    if any("nvme" in p.config for p in planned if p.runs) and not interrupted:
        from mqrt.microbench.refs import reference_figures

        try:  # deferred: a signal ends the reference's wait, never a finalizer
            with signals.deferred():
                report["mqrt"]["reference"] = reference_figures(args.reference)
        except signals.Abort:
            raise
        except KeyboardInterrupt:  # optional: the run's figures are printed without it
            interrupted = report["mqrt"]["interrupted"] = True
    with signals.deferred():  # the first signal while printing is honoured after it
        _print_report(report, args, is_default, out)
    interrupted = interrupted or bool(signals.received())
    if interrupted:
        print(signals.stopped_message(), file=sys.stderr)
        return signals.exit_status() or 130
    return 0 if not report["mqrt"]["invariants"]["violations"] else 3


def _print_report(report, args, is_default, out) -> None:
    from mqrt.bench.text import render_report

    formats = args.output_format
    if "json" in formats or "json+" in formats:
        json.dump(report, out, indent=2)
        out.write("\n")
    if "terse" in formats:
        from mqrt.bench.terse import render_terse

        render_terse(report, out)
    if "normal" in formats:
        render_report(report, out)
        if is_default:
            print(
                "mqrt: this was the default sweep; go further with e.g. "
                "mqrt bench --mode mq,sq,raw --cpus 1-8 --driver nvme --repeat 5 "
                "--plot scaling.png (mqrt bench --help lists every option)",
                file=out,
            )
    if args.plot and report["mqrt"]["points"]:
        from mqrt.plot import plot_report

        plot_report(report, args.plot)
        print(f"mqrt: plot written to {args.plot}", file=sys.stderr)

"""``mqrt race``: switch a historical sbitmap or shared-tag bug back on, provoke it,
and catch it.

``mqrt race list [--json]``
    the catalogue (:mod:`mqrt.race.catalogue`): name, kernel commit, what goes wrong.
``mqrt race run NAME [--seed S] [--timeout T] [--fixed] [--json]``
    run the bug's scenario with the old code until a detector
    (:mod:`mqrt.runtime.detectors`) fires or ``T`` seconds pass; each attempt uses the
    next seed.  With ``--fixed`` the same scenario runs on our (fixed) code until it
    has completed ``--requests`` I/Os cleanly or the time is up.  A report is written
    either way: the finding, the tag maps in debugfs format, who sleeps where, the
    configuration and the seed to run it again.
``mqrt race run --all``
    the whole catalogue, one after the other.
``mqrt race show DUMP``
    the whole event trace of a failed run, merged across CPUs in time order.

Exit status: 0 when every run did what it was asked (the bug reproduced; with
``--fixed``, the run stayed clean), 1 otherwise, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from mqrt.errors import UsageError
from mqrt.race.catalogue import CATALOGUE
from mqrt.race.entry import Bug
from mqrt.race.load import busy_loops, run_in_children

#: Records per CPU in the event trace of a race run.
TRACE_ENTRIES = 4096
#: Defaults: how long a bug may take to show, and how many clean I/Os make --fixed pass.
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_FIXED_TIMEOUT_S = 900.0
DEFAULT_FIXED_REQUESTS = 1_000_000


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "race",
        help="reproduce historical sbitmap / shared-tag races and hangs",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rsub = p.add_subparsers(dest="race_command", metavar="ACTION")
    lp = rsub.add_parser("list", help="the catalogue of bugs")
    lp.add_argument("--json", action="store_true", help="a JSON list of objects")
    lp.set_defaults(func=main_list)
    rp = rsub.add_parser("run", help="provoke a bug (or, with --fixed, show it is gone)")
    rp.add_argument("name", nargs="?", metavar="NAME", help="a name from `mqrt race list`")
    rp.add_argument("--all", action="store_true", help="run every bug of the catalogue")
    rp.add_argument("--seed", type=int, default=0, help="first seed (attempt i uses S+i)")
    rp.add_argument(
        "--timeout", type=float, default=None, metavar="T",
        help=f"seconds to try. Default: {DEFAULT_TIMEOUT_S:.0f} "
        f"({DEFAULT_FIXED_TIMEOUT_S:.0f} with --fixed)",
    )  # fmt: skip
    rp.add_argument("--fixed", action="store_true", help="run the scenario on the fixed code")
    rp.add_argument(
        "--requests", type=int, default=DEFAULT_FIXED_REQUESTS, metavar="N",
        help=f"with --fixed: clean I/Os needed to pass. Default: {DEFAULT_FIXED_REQUESTS}",
    )  # fmt: skip
    rp.add_argument(
        "--seeds", type=int, default=1, metavar="N",
        help="independent tries per bug (seeds S, S+1000, ...), each up to the timeout, "
        "and a table of how hard each was: reproduced (or clean) of N, median and worst "
        "time and requests. Default: 1",
    )  # fmt: skip
    rp.add_argument(
        "--inject", choices=("on", "off", "both"), default=None,
        help="the scenarios' injected delays: on (the race windows widened), off (as "
        "narrow as the code makes them), or both, one after the other, for the entries "
        "that have any. Default: both with --seeds N > 1 (without --fixed), else on",
    )  # fmt: skip
    rp.add_argument(
        "--no-inject", dest="inject", action="store_const", const="off",
        help="the same as --inject off",
    )  # fmt: skip
    rp.add_argument(
        "--parallel", type=int, default=1, metavar="K",
        help="run K scenarios at once, each in its own process (with --fixed: show the "
        "detectors stay quiet on a crowded host). Default: 1",
    )  # fmt: skip
    rp.add_argument(
        "--busy", type=int, default=0, metavar="N",
        help="N busy loops spinning on the host's cores for the whole run. Default: 0",
    )  # fmt: skip
    rp.add_argument("--json", action="store_true", help="print a JSON object per bug")
    rp.add_argument(
        "--markdown", action="store_true",
        help="with --seeds N > 1: print the table as Markdown (the README's)",
    )  # fmt: skip
    rp.add_argument(
        "--report-dir", default="mqrt-race-reports", metavar="DIR",
        help="where reports are written. Default: ./mqrt-race-reports",
    )  # fmt: skip
    rp.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    rp.set_defaults(func=main_run)
    sp = rsub.add_parser("show", help="print a trace dump as a merged, time-ordered view")
    sp.add_argument("dump", metavar="DUMP", help="a .trace file written by a failed run")
    sp.set_defaults(func=main_show)
    p.set_defaults(func=lambda args: p.print_help() or 0)


def main_show(args: argparse.Namespace) -> int:
    from mqrt.lib.trace import render_dump

    try:
        text = render_dump(args.dump)
    except OSError as exc:
        raise UsageError(f"race show: cannot read {args.dump}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"race show: {args.dump} is not an mqrt trace dump ({exc})") from None
    sys.stdout.write(text)
    return 0


def main_list(args: argparse.Namespace) -> int:
    rows = [
        {
            "name": b.name,
            "commit": b.commit,
            "subject": b.subject,
            "what": b.what,
            "detectors": list(b.detectors),
            "interleaving": b.interleaving,
            "window": b.window,
            "timeline": list(b.scenario.timeline),
        }
        for b in CATALOGUE.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(b.name) for b in CATALOGUE.values())
    cw = max(len(b.commit) for b in CATALOGUE.values())
    for b in CATALOGUE.values():
        kind = "race" if b.interleaving else "logic"
        print(f"{b.name:<{width}}  {b.commit:<{cw}}  {kind}  {b.what}")
        print(f"{'':<{width}}  {'':<{cw}}  {'':4}  ({b.subject})")
        if b.scenario.timeline:
            print(f"{'':<{width}}  {'':<{cw}}  {'':4}  timeline: {', '.join(b.scenario.timeline)}")
    n = sum(b.interleaving for b in CATALOGUE.values())
    print(
        f"\n{len(CATALOGUE)} bugs: {n} races (need two CPUs to interleave in a window), "
        f"{len(CATALOGUE) - n} logic bugs (they fire at the first task to meet their condition)"
    )
    return 0


def main_run(args: argparse.Namespace) -> int:

    if args.all == bool(args.name):
        raise UsageError("race run: give a NAME or --all")
    if args.name and args.name not in CATALOGUE:
        raise UsageError(
            f"race run: no bug {args.name!r} (see mqrt race list: {', '.join(CATALOGUE)})"
        )
    if args.timeout is not None and not 0 < args.timeout <= 86400:
        raise UsageError(f"--timeout: must be in (0, 86400] seconds, got {args.timeout}")
    if args.requests < 1:
        raise UsageError(f"--requests: must be >= 1, got {args.requests}")
    if not 1 <= args.seeds <= 1000:
        raise UsageError(f"--seeds: must be in 1..1000, got {args.seeds}")
    if not 1 <= args.parallel <= 64:
        raise UsageError(f"--parallel: must be in 1..64, got {args.parallel}")
    if args.parallel > 1 and not args.fixed:
        raise UsageError("--parallel: only with --fixed (a bug's timing is its own run's)")
    if not 0 <= args.busy <= 256:
        raise UsageError(f"--busy: must be in 0..256, got {args.busy}")
    bugs = list(CATALOGUE.values()) if args.all else [CATALOGUE[args.name]]
    timeout = args.timeout or (DEFAULT_FIXED_TIMEOUT_S if args.fixed else DEFAULT_TIMEOUT_S)
    mode = args.inject or ("both" if args.seeds > 1 and not args.fixed else "on")
    if mode == "both" and args.seeds == 1:
        raise UsageError("--inject both: needs --seeds N > 1 (it prints a table)")
    groups = [
        (bug, inject)
        for bug in bugs
        for inject in ([mode == "on"] if mode != "both" else [True, False])
        if inject or bug.scenario.inject or mode == "off"
    ]
    seeds = [args.seed + SEED_STRIDE * k for k in range(args.seeds)]
    progress = None if args.quiet or args.json else _progress
    with busy_loops(args.busy):
        if args.parallel > 1 or args.busy:
            flat = run_in_children(
                [(bug.name, seed, inject) for bug, inject in groups for seed in seeds],
                parallel=args.parallel,
                timeout=timeout,
                fixed=args.fixed,
                requests=args.requests,
                report_dir=args.report_dir,
                progress=progress,
            )
            runs = [flat[i : i + len(seeds)] for i in range(0, len(flat), len(seeds))]
        else:
            runs = [
                [
                    run_bug(
                        bug,
                        seed=seed,
                        timeout=timeout,
                        fixed=args.fixed,
                        requests=args.requests,
                        report_dir=args.report_dir,
                        progress=progress,
                        inject=inject,
                    )
                    for seed in seeds
                ]
                for bug, inject in groups
            ]
    ok = True
    outcomes = []
    for (bug, inject), tries in zip(groups, runs, strict=True):
        for out in tries:
            if inject or mode == "off":  # a natural window may well be too narrow
                ok &= out["clean"] if args.fixed else out["reproduced"]
            if not args.json and args.seeds == 1:
                _print_outcome(out)
        outcomes.append(tries[0] if args.seeds == 1 else difficulty(bug, tries))
    if args.json:
        print(
            json.dumps(outcomes[0] if len(outcomes) == 1 and not args.all else outcomes, indent=2)
        )
    elif args.seeds > 1:
        load = f" --parallel {args.parallel}" if args.parallel > 1 else ""
        load += f" --busy {args.busy}" if args.busy else ""
        print_difficulty(outcomes, args.fixed, mode, sys.stdout, load, args.markdown)
    return 0 if ok else 1


#: --seeds: try k starts at seed S + SEED_STRIDE * k (its attempts use the seeds after it)
SEED_STRIDE = 1000


def difficulty(bug: Bug, tries: list[dict[str, Any]]) -> dict[str, Any]:
    """How hard ``bug`` was over independent tries: how many reproduced (or ran
    clean, with --fixed), the median and worst time and requests, the detectors."""
    fixed = tries[0]["fixed"]
    good = [t for t in tries if (t["clean"] if fixed else t["reproduced"])]
    secs = sorted(t["seconds"] for t in good)
    reqs = sorted(t["requests"] for t in good)
    inject = tries[0]["inject"] and bool(bug.scenario.inject)
    return {
        "name": bug.name,
        "commit": bug.commit,
        "fixed": fixed,
        "inject": inject,
        "window": (
            "injected " + bug.scenario.injected_window()
            if inject
            else "natural"
            if bug.interleaving
            else "none (logic bug)"
        ),
        "tries": len(tries),
        "succeeded": len(good),
        "median_s": statistics.median(secs) if secs else None,
        "worst_s": max(secs) if secs else None,
        "median_requests": int(statistics.median(reqs)) if reqs else None,
        "worst_requests": max(reqs) if reqs else None,
        "detectors": sorted({t["finding"]["detector"] for t in tries if t["finding"]}),
        "runs": tries,
    }


def print_difficulty(
    rows: list[dict[str, Any]], fixed: bool, mode: str, out, load: str = "", markdown: bool = False
) -> None:
    """The --seeds table: a row per bug and window (injected delays, or the race
    window as the code makes it)."""
    from rich.console import Console
    from rich.table import Table

    title = (
        f"mqrt race run --seeds {rows[0]['tries']}"
        + (" --fixed" if fixed else "")
        + ("" if mode == "both" or (fixed and mode == "on") else f" --inject {mode}")
        + load
    )
    table = Table(title=title, title_justify="left")
    verdict = "clean" if fixed else "reproduced"
    for col in ("bug", "commit", "window", verdict, "median s", "worst s", "median requests",
                "worst requests", "detectors"):  # fmt: skip
        left = col in ("bug", "commit", "window", "detectors")
        table.add_column(col, justify="left" if left else "right",
                         ratio=3 if col == "window" else None)  # fmt: skip

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    if markdown:
        cols = [c.header for c in table.columns]
        print(f"`{title}`\n", file=out)
        print("| " + " | ".join(str(c) for c in cols) + " |", file=out)
        print("|" + "---|" * len(cols), file=out)
    for r in rows:
        cells = (
            r["name"], r["commit"], r["window"], f"{r['succeeded']}/{r['tries']}",
            num(r["median_s"], ".1f"), num(r["worst_s"], ".1f"), num(r["median_requests"], ","),
            num(r["worst_requests"], ","), ", ".join(r["detectors"]) or "-",
        )  # fmt: skip
        if markdown:
            print("| " + " | ".join(cells) + " |", file=out)
    if markdown:
        return
    for r in rows:
        table.add_row(
            r["name"], r["commit"], r["window"], f"{r['succeeded']}/{r['tries']}",
            num(r["median_s"], ".1f"), num(r["worst_s"], ".1f"), num(r["median_requests"], ","),
            num(r["worst_requests"], ","), ", ".join(r["detectors"]) or "-",
        )  # fmt: skip
    Console(file=out, width=160, highlight=False).print(table)


def _progress(text: str) -> None:
    print(f"mqrt race: {text}", file=sys.stderr)


def _print_outcome(out: dict[str, Any]) -> None:
    name = out["name"]
    if out["fixed"]:
        state = "clean" if out["clean"] else f"NOT clean ({out['finding']['detector']})"
        print(
            f"{name} (fixed): {state} over {out['requests']:,} requests in "
            f"{out['seconds']:.1f} s, {out['attempts']} attempt(s)"
        )
    elif out["reproduced"]:
        f = out["finding"]
        print(
            f"{name}: reproduced in {out['seconds']:.1f} s after {out['requests']:,} "
            f"requests (seed {out['seed_found']}): {f['detector']}: {f['message']}"
        )
    else:
        print(f"{name}: not reproduced in {out['seconds']:.1f} s ({out['requests']:,} requests)")
    print(f"  report: {out['report']}")


def run_bug(
    bug: Bug,
    *,
    seed: int = 0,
    timeout: float = DEFAULT_TIMEOUT_S,
    fixed: bool = False,
    requests: int = DEFAULT_FIXED_REQUESTS,
    report_dir: str | None = None,
    progress=None,
    inject: bool = True,
) -> dict[str, Any]:
    """Attempts of the bug's scenario (seed, seed+1, ...) until a detector fires, or
    (``fixed``) until ``requests`` I/Os ran clean, or ``timeout`` seconds pass.
    ``inject`` False runs the scenario without its injected delays."""
    from mqrt.runtime.owner import run

    t0 = time.monotonic()
    total = 0
    attempts = 0
    finding = None
    seed_found = None
    trace_dump = None
    config: dict[str, Any] = {}
    while True:
        left = timeout - (time.monotonic() - t0)
        if left <= 0.2:
            break
        s = seed + attempts
        spec, config = build_scenario(bug, s, min(bug.scenario.attempt_s, left), inject)
        if report_dir:
            os.makedirs(report_dir, exist_ok=True)
            spec.trace_dump = os.path.join(report_dir, f"{_base_name(bug, fixed, seed)}.trace")
        attempts += 1
        if fixed:
            result = run(spec)
        else:
            with bug.switched_on():
                result = run(spec)
        total += sum(j[d]["ios"] for c in result.cpus for j in c["jobs"] for d in ("read", "write"))
        total += sum(s["partial"]["completed"] for s in result.stopped)  # as last published
        if result.finding is not None:
            finding, seed_found = result.finding, s
            trace_dump = result.trace_dump
            break
        if fixed and total >= requests:
            break
        if result.interrupted:
            break
        if progress is not None:
            progress(f"{bug.name}: attempt {attempts} (seed {s}) clean, {total:,} requests")
    seconds = time.monotonic() - t0
    out = {
        "name": bug.name,
        "commit": bug.commit,
        "fixed": fixed,
        "reproduced": finding is not None and not fixed,
        "clean": finding is None,
        "seconds": round(seconds, 3),
        "requests": total,
        "attempts": attempts,
        "seed": seed,
        "seed_found": seed_found,
        "inject": inject,
        "timeline": list(bug.scenario.timeline),
        "finding": finding,
        "trace_dump": trace_dump,
    }
    out["report"] = write_report(out, bug, config, report_dir) if report_dir else None
    return out


def build_scenario(bug: Bug, seed: int, runtime: float, inject: bool = True):
    """The RunSpec of one attempt: the scenario's options, per-queue jobs, injection
    points (unless not ``inject``) and the detectors."""
    from mqrt.bench.main import build
    from mqrt.bench.timeline import parse_at
    from mqrt.workers.ioengine import JOB_KNOBS, JobSpec

    sc = bug.scenario
    given = {**sc.given, "runtime": runtime, "seed": seed}
    spec, config = build(given, timeline=[parse_at(t, "timeline") for t in sc.timeline])
    if sc.queue_jobs:
        job_names = {k.name for k in JOB_KNOBS}
        base = {k: v for k, v in given.items() if k in job_names}
        nr_queues = int(sc.given.get("nr_devices", sc.given.get("nr_namespaces", 1)))
        spec.queue_jobs = [
            JobSpec.from_options({**base, **sc.queue_jobs.get(q, {})}) for q in range(nr_queues)
        ]
        config["queue_jobs"] = {str(q): o for q, o in sc.queue_jobs.items()}
    spec.detect = True
    spec.trace_entries = TRACE_ENTRIES
    points = sc.inject if inject else {}
    spec.inject = dict(points) or None
    spec.inject_irqs = sc.inject_irqs
    config["inject"] = {k: list(v) for k, v in points.items()}
    if sc.inject_irqs and points:
        config["inject_irqs"] = True
    config["timeline"] = list(sc.timeline)
    return spec, config


def write_report(out: dict[str, Any], bug: Bug, config: dict[str, Any], report_dir: str) -> str:
    """The human report next to a JSON copy; returns the text report's path."""
    os.makedirs(report_dir, exist_ok=True)
    base = os.path.join(report_dir, _base_name(bug, out["fixed"], out["seed"]))
    f = out["finding"]
    lines = [
        f"mqrt race: {bug.name} ({'fixed code' if out['fixed'] else 'bug switched on'})",
        f'kernel: {bug.commit} "{bug.subject}"',
        "",
        _wrap(bug.explanation),
        "",
        f"outcome: {_outcome_line(out)}",
        f"seconds: {out['seconds']:.2f}, requests: {out['requests']:,}, "
        f"attempts: {out['attempts']} (seeds {out['seed']}..{out['seed'] + out['attempts'] - 1})",
        f"rerun: mqrt race run {bug.name} --seed {out['seed_found'] or out['seed']}"
        + (" --fixed" if out["fixed"] else ""),
    ]
    if f is not None:
        snap = f.get("snapshot", {})
        lines += ["", f"finding: {f['detector']} at {f['at_s']:.2f} s: {f['message']}", ""]
        lines.append("sleeping tasks:")
        for s in snap.get("sleeping", []):
            lines.append(f"  {s.get('task', 'cpu' + str(s['cpu']))} on {s['queued_on']}")
        for name, m in snap.get("maps", {}).items():
            lines += ["", f"debugfs {name} tags:", m["tags"].rstrip()]
            held = ", ".join(f"{h['tag']}:{h['state']}" for h in m["held"]) or "none"
            lines.append(f"requests holding tags: {held}")
        lines += ["", "hctx nr_active:"]
        for h in snap.get("hctx", []):
            lines.append(f"  {h['queue']} hctx{h['hctx']}: nr_active={h['nr_active']}")
        if snap.get("events"):
            lines += ["", "last events per CPU:", snap["events"].rstrip()]
        if out.get("trace_dump"):
            lines.append(f"whole trace: mqrt race show {out['trace_dump']}")
            if snap.get("sleeping"):
                from mqrt.lib.trace import load_msgpack
                from mqrt.race.proof import sleep_proof

                proof = sleep_proof(load_msgpack(out["trace_dump"]), snap["sleeping"])
                lines += ["", "the sleepers, from the trace:", *proof]
    lines += ["", "configuration:", json.dumps(config, indent=2, default=str)]
    path = base + ".txt"
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(base + ".json", "w") as fh:
        json.dump({**out, "config": config, "explanation": bug.explanation}, fh, indent=2,
                  default=str)  # fmt: skip
    return path


def _base_name(bug: Bug, fixed: bool, seed: int) -> str:
    return f"{bug.name}-{'fixed' if fixed else 'bug'}-seed{seed}"


def _outcome_line(out: dict[str, Any]) -> str:
    if out["fixed"]:
        return "clean" if out["clean"] else f"a detector fired: {out['finding']['detector']}"
    return "reproduced" if out["reproduced"] else "not reproduced"


def _wrap(text: str, width: int = 88) -> str:
    import textwrap

    return textwrap.fill(text, width)

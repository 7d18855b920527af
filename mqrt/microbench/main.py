"""``mqrt microbench``: the foundation's costs, measured side by side with the peers a
user would otherwise reach for, in one run on this machine.

Every case is repeated (``--repeat``, default 5) and the median is reported with the
spread; compare ratios within one run, not absolute numbers across runs.

Cases
    atomic.*                   one mqrt.lib._atomic call from Python on shared memory
    peer.atomics.*             the same operation with the PyPI ``atomics`` package
    ring.spsc.batch            SpscRing, 64-byte entries, batches of 32, producer and
                               consumer pinned to different cores
    ring.mpsc.2producers       MpscRing, 2 producer processes, batches of 32
    peer.mp_queue              multiprocessing.Queue put/get of 64-byte bytes
    peer.mp_pipe               multiprocessing.Pipe send_bytes/recv_bytes, 64 bytes
    peer.faster_fifo.batch     faster-fifo put_many/get_many of 32 x 64 bytes, with
                               identity dumps/loads (no pickling)
    sbitmap.get_put            sbitmap_queue get + clear, one process
    sbitmap.get_put.contended  the same from 2 processes on one bitmap (per-process
                               cost per get+clear)
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import sys

from mqrt import __version__
from mqrt.errors import UsageError
from mqrt.lib.shm import exit_on_sigterm
from mqrt.microbench.cases import CASES
from mqrt.microbench.harness import Case, Result, available, host_cpus, run
from mqrt.microbench.targets import check_targets

SCHEMA = "mqrt.microbench/1"


def _fmt(value: float, unit: str) -> str:
    if unit == "ops/s":
        return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{value / 1e3:.0f} k"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.1f}"


def render_table(results: dict[str, Result], cases: list[Case], checks, repeat: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mqrt microbench (median of {repeat}; spread = min..max)")
    table.add_column("case")
    table.add_column("median", justify="right")
    table.add_column("unit")
    table.add_column("spread", justify="right")
    for case in cases:
        r = results.get(case.name)
        if r is None:
            continue
        spread = f"{_fmt(min(r.samples), r.unit)}..{_fmt(max(r.samples), r.unit)}"
        table.add_row(case.name, _fmt(r.value, r.unit), r.unit, spread)
    console = Console(width=max(100, Console().width))
    console.print(table)
    if checks:
        t = Table(title="targets")
        t.add_column("check")
        t.add_column("this run", justify="right")
        t.add_column("target")
        t.add_column("")
        for c in checks:
            t.add_row(c["check"], f"{c['value']:,}", c["target"], "met" if c["met"] else "MISSED")
        console.print(t)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "microbench",
        help="measure atomics, rings and sbitmap against their peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print JSON (schema mqrt.microbench/1)")
    p.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="repetitions per case; the median is reported. Default: 5",
    )
    p.add_argument(
        "--quick", action="store_true", help="a tenth of the work per repetition (a smoke test)"
    )
    p.add_argument(
        "--case",
        action="append",
        metavar="PATTERN",
        help="run only cases matching this glob (repeatable), e.g. 'ring.*'",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:

    if args.repeat < 1:
        raise UsageError(f"--repeat must be >= 1, got {args.repeat}")
    cases = CASES
    if args.case:
        cases = [c for c in CASES if any(fnmatch.fnmatchcase(c.name, pat) for pat in args.case)]
        if not cases:
            names = ", ".join(c.name for c in CASES)
            raise UsageError(f"--case {' '.join(args.case)} matches no case; cases: {names}")
    skipped = [c for c in cases if not available(c)]
    cases = [c for c in cases if c not in skipped]
    notes = [f"{c.name} skipped: the '{c.needs}' package is not installed" for c in skipped]
    scale = 0.1 if args.quick else 1.0

    progress_cb = None
    status_ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
    if sys.stderr.isatty() and not args.json:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        prog = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), transient=True
        )
        task = prog.add_task("microbench", total=len(cases) * args.repeat)

        def progress_cb(name: str, done: int, total: int) -> None:
            prog.update(task, completed=done, description=name)

        status_ctx = prog

    with exit_on_sigterm(), status_ctx:
        results, interrupted = run(cases, args.repeat, scale, progress_cb)
    if interrupted:
        notes.append("interrupted: partial results (fewer repetitions for some cases)")
    checks = check_targets(results)
    if args.json:
        doc = {
            "schema": SCHEMA,
            "mqrt_version": __version__,
            "repeat": args.repeat,
            "quick": args.quick,
            "cpus": host_cpus(),
            "results": {
                name: {"value": r.value, "unit": r.unit, "samples": r.samples}
                for name, r in results.items()
            },
            "checks": checks,
            "notes": notes,
        }
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render_table(results, cases, checks, args.repeat)
        for note in notes:
            print(f"note: {note}")
    return 130 if interrupted else 0

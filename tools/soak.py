"""A soak: one long ``mqrt bench`` run, its memory sampled while it goes, and a
verdict at the end.

    python tools/soak.py --minutes 10 -- --cpus 8 --shared_tags 1 --nr_devices 2 \\
        --hw_queue_depth 8

Every ``--every`` seconds the unique memory (USS) of the run's whole process tree
(the owner, its CPUs, the device) is sampled.  At the end it prints the samples and
the run's own account: I/Os completed, timeouts (the faults' recovery at work),
violations (lost requests, in flight at the end; double completions; broken
invariants), stale completions dropped, leaked tags and owned requests; and
whether memory stayed flat: the last third's median within ``--flat-pct`` of the
second third's (the first third is warm-up; a run of fewer than six samples is too
short to judge, and its memory is not).  Exit status 0 when all of these
hold, 1 otherwise.

A soak of the live transitions gives the run a timeline and says how many writes of
each attribute it must have made; every one must end without an error or a violation
(a reference taken or a request started while a queue was frozen or quiesced), and
none but the one running at the deadline may be aborted:

    python tools/soak.py --minutes 2 --expect freeze=1000 -- --cpus 4 \
        --shared_tags 1 --nr_devices 2 --every 100ms:freeze
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time

import psutil


def tree_uss(pid: int) -> int:
    """Unique memory of ``pid`` and all its descendants, bytes (0 if gone)."""
    total = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().uss
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--every", type=float, default=15.0, help="seconds between samples")
    ap.add_argument("--flat-pct", type=float, default=5.0)
    ap.add_argument(
        "--expect", action="append", default=[], metavar="ATTR=N",
        help="the run must have made at least N writes of the timeline attribute ATTR",
    )  # fmt: skip
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then mqrt bench options")
    args = ap.parse_args(argv)
    expect: dict[str, int] = {}
    for e in args.expect:
        attr, sep, n = e.rpartition("=")
        if not sep or not attr or not n.isdigit():
            ap.error(f"--expect: ATTR=N with N a count, got {e!r}")
        expect[attr] = int(n)
    bench = [a for a in args.bench_args if a != "--"]
    runtime = int(args.minutes * 60)
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mqrt", "bench", "-q", "--output-format", "json",
             "--runtime", str(runtime), *bench],
            stdout=out, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        t0 = time.monotonic()
        samples: list[tuple[float, int]] = []
        while proc.poll() is None:
            time.sleep(args.every)  # a sampling period, not synchronisation
            if proc.poll() is None:
                samples.append((time.monotonic() - t0, tree_uss(proc.pid)))
                print(
                    f"soak: {samples[-1][0]:6.0f} s  {samples[-1][1] / 2**20:8.1f} MiB", flush=True
                )
        out.seek(0)
        text = out.read()
    if proc.returncode != 0 or not text:
        print(f"soak: mqrt bench exited with {proc.returncode}")
        return 1
    report = json.loads(text)
    run = report["mqrt"]["points"][0]["run"]
    inv = run["invariants"]
    jobs = report["jobs"]
    ios = sum(j[d]["total_ios"] for j in jobs for d in ("read", "write"))
    timeouts = sum(c["blk_mq"].get("timeouts", 0) for c in run["cpus"])
    # memory is judged from six samples on (the first third is warm-up, and a short
    # run's few samples are all warm-up)
    third = len(samples) // 3 if len(samples) >= 6 else 0
    mid = statistics.median(s for _, s in samples[third : 2 * third]) if third else 0
    end = statistics.median(s for _, s in samples[2 * third :]) if third else 0
    growth = 100.0 * (end - mid) / mid if mid else 0.0
    trans = run.get("transitions", {}).get("list", [])
    verdict = {
        "ios": ios,
        "timeouts": timeouts,
        # lost (in flight at the end) and double-completed requests, broken invariants
        "violations": inv.get("violations", 0),
        # a completion that came after its request was timed out and ended: dropped
        "stale_completions_dropped": inv.get("stale_completions", 0),
        "leaked_tags": inv.get("leaked_tags", 0),
        "owned_requests": inv.get("owned_requests", 0),
        "queue_refs": inv.get("queue_refs", 0),
        "nr_active_negative": inv.get("nr_active_negative", 0),
        # a stop closes the write running at the deadline: only the last may be aborted
        "aborted_before_the_end": sum(
            bool(t.get("aborted")) for t in sorted(trans, key=lambda t: t["start_ns"])[:-1]
        ),
        "transitions": {
            attr: {k: t[k] for k in ("count", "errors", "aborted", "violations")}
            for attr, t in run.get("transitions", {}).get("summary", {}).items()
        },
        "memory_mid_mib": round(mid / 2**20, 1),
        "memory_end_mib": round(end / 2**20, 1),
        "memory_growth_pct": round(growth, 2),
    }
    print("soak: " + json.dumps(verdict))
    ok = (
        ios > 0
        and not inv.get("skipped")
        and verdict["violations"] == 0
        and verdict["leaked_tags"] == 0
        and verdict["owned_requests"] == 0
        and verdict["queue_refs"] == 0
        and verdict["nr_active_negative"] == 0
        and all(t["errors"] == 0 and t["violations"] == 0 for t in verdict["transitions"].values())
        and verdict["aborted_before_the_end"] == 0
        and all(verdict["transitions"].get(a, {}).get("count", 0) >= n for a, n in expect.items())
        and abs(growth) <= args.flat_pct
    )
    print(f"soak: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

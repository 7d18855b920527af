#!/usr/bin/env python3
"""A/B-compare two `mqrt bench` variants on a noisy host: interleaved, paired runs.

Runs the two variants alternately (A B, B A, A B, ...) so slow drifts of the host
hit both alike, and reports each side's median and the median of the per-pair
ratios B/A, which is what to quote for "B costs N %".

    python tools/ab_bench.py --pairs 8 --common "--cpus 2 --irqmode none --runtime 3" \\
        --b=--trace            # the cost of the event trace (note the =)
    python tools/ab_bench.py --a="--sbitmap legacy" --b="--sbitmap current"

Each run is one `mqrt bench ... --output-format json --quiet` process; its IOPS is
the sum over the JSON's points, and its CPU time per I/O (the CPUs' user + system
time over the I/Os done, weighted over the points) is reported beside it: on a VM
whose neighbours steal time, CPU µs per I/O varies less than IOPS.  A run that
fails stops the comparison with its error.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys


def run_once(args: list[str]) -> tuple[float, float]:
    """IOPS and CPU µs per I/O of one `mqrt bench` run with ``args``."""
    cmd = [sys.executable, "-m", "mqrt", "bench", *args, "--output-format", "json", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"ab_bench: {shlex.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    report = json.loads(proc.stdout)
    points = report["mqrt"]["points"]
    iops = float(sum(p["iops"] for p in points))
    return iops, sum(p["cpu_us_per_io"] * p["iops"] for p in points) / iops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6, help="A/B pairs to run (default 6)")
    parser.add_argument("--common", default="", help="arguments both variants get")
    parser.add_argument("--a", default="", help="arguments of variant A (the baseline)")
    parser.add_argument("--b", default="", help="arguments of variant B")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be >= 1")
    common = shlex.split(args.common)
    variants = {"A": common + shlex.split(args.a), "B": common + shlex.split(args.b)}
    iops: dict[str, list[float]] = {"A": [], "B": []}
    cpu: dict[str, list[float]] = {"A": [], "B": []}
    for i in range(args.pairs):
        order = ("A", "B") if i % 2 == 0 else ("B", "A")
        for name in order:
            x, c = run_once(variants[name])
            iops[name].append(x)
            cpu[name].append(c)
        print(
            f"pair {i + 1}/{args.pairs}: A {iops['A'][-1] / 1e3:8.1f}k {cpu['A'][-1]:6.2f} µs/io"
            f"  B {iops['B'][-1] / 1e3:8.1f}k {cpu['B'][-1]:6.2f} µs/io",
            flush=True,
        )
    for name in ("A", "B"):
        print(
            f"{name} ({shlex.join(variants[name]) or 'defaults'}): "
            f"IOPS median {statistics.median(iops[name]) / 1e3:.1f}k "
            f"(range {min(iops[name]) / 1e3:.1f}k..{max(iops[name]) / 1e3:.1f}k), "
            f"CPU median {statistics.median(cpu[name]):.2f} µs/io "
            f"(range {min(cpu[name]):.2f}..{max(cpu[name]):.2f})"
        )
    for what, series in (("IOPS", iops), ("CPU µs/io", cpu)):
        ratios = [b / a for a, b in zip(series["A"], series["B"], strict=True)]
        print(
            f"{what} B/A per pair: median {statistics.median(ratios):.3f}, "
            f"range {min(ratios):.3f}..{max(ratios):.3f} over {len(ratios)} pairs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

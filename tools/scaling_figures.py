"""The README's cost-per-I/O figures: 1, 2, 8 and 256 emulated CPUs on this host,
the mq/sq/raw ratios at 2 CPUs, and ``sbitmap.get_put``, each the median of several
runs taken in interleaved rounds (a round runs every configuration once, so a noisy
spell of the host hits them all alike), with the targets checked.

    python tools/scaling_figures.py --repeat 5
    python tools/scaling_figures.py --repeat 3 --only 1cpu,2cpu --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

COMMON = ["--irqmode", "none", "--iodepth", "32", "--output-format", "json", "-q"]
CONFIGS: dict[str, list[str]] = {
    "1cpu": ["--cpus", "1"],
    "2cpu": ["--cpus", "2"],
    "8cpu": ["--cpus", "8"],
    "32cpu": ["--cpus", "32", "--submit_queues", "16"],
    "256cpu": ["--cpus", "256", "--submit_queues", "128"],
    "modes": ["--cpus", "2", "--mode", "mq,sq,raw"],
}


def bench(args: list[str], runtime: float) -> list[dict]:
    """One ``mqrt bench`` run; per point: params, IOPS, CPU per I/O, first I/O."""
    cmd = [sys.executable, "-m", "mqrt", "bench", *COMMON, "--runtime", str(runtime), *args]
    out = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {out.returncode}\n{out.stderr}")
    points = []
    for p in json.loads(out.stdout)["mqrt"]["points"]:
        s = p["run"]["summary"]
        points.append({
            "params": p["params"], "iops": p["iops"], "cpu_us_per_io": s["cpu_us_per_io"],
            "start_to_first_io_s": s["start_to_first_io_s"],
        })  # fmt: skip
    return points


def get_put_ns() -> float:
    cmd = [sys.executable, "-m", "mqrt", "microbench", "--json", "--case", "sbitmap.get_put"]
    out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)["results"]["sbitmap.get_put"]["value"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds a run (default 3)")
    ap.add_argument("--only", default="", help="comma-separated configs: " + ",".join(CONFIGS))
    ap.add_argument("--json", action="store_true", help="print the raw runs as JSON")
    a = ap.parse_args()
    names = [n for n in (a.only.split(",") if a.only else [*CONFIGS, "get_put"]) if n]
    runs: dict[str, list] = {n: [] for n in names}
    for r in range(a.repeat):
        for n in names:
            runs[n].append(get_put_ns() if n == "get_put" else bench(CONFIGS[n], a.runtime))
        print(f"round {r + 1}/{a.repeat} done", file=sys.stderr, flush=True)
    if a.json:
        print(json.dumps(runs, indent=1))
        return

    def med(name: str, key: str, point: int = 0) -> float:
        return statistics.median(run[point][key] for run in runs[name])

    print("| run | IOPS (median) | CPU per I/O | start → first I/O |")
    print("|---|---|---|---|")
    for n in names:
        if n in ("get_put", "modes"):
            continue
        print(
            f"| {n} | {med(n, 'iops') / 1e3:.0f} k | {med(n, 'cpu_us_per_io'):.2f} µs "
            f"| {med(n, 'start_to_first_io_s'):.2f} s |"
        )
    if "modes" in runs:
        mq, sq, raw = (med("modes", "iops", i) for i in range(3))
        print(f"\n2 CPUs: mq {mq / 1e3:.0f} k, sq {sq / 1e3:.0f} k, raw {raw / 1e3:.0f} k IOPS; "
              f"mq/sq {mq / sq:.2f}, raw/mq {raw / mq:.2f}")  # fmt: skip
    if "8cpu" in runs and "2cpu" in runs:
        print(f"8 CPUs / 2 CPUs IOPS: {med('8cpu', 'iops') / med('2cpu', 'iops'):.0%}")
    if "256cpu" in runs and "2cpu" in runs:
        ratio = med("256cpu", "cpu_us_per_io") / med("2cpu", "cpu_us_per_io")
        print(f"256 CPUs / 2 CPUs CPU per I/O: {ratio:.2f}x")
    if "get_put" in runs:
        print(f"sbitmap.get_put: {statistics.median(runs['get_put']):.0f} ns")


if __name__ == "__main__":
    main()

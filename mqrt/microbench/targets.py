"""The targets ``mqrt microbench`` checks on a run's medians: absolute bounds, how
many times better than a peer a case must be, and the most one case may cost over
another (the event trace over the bare data path).
"""

from __future__ import annotations

from typing import Any

from mqrt.microbench.harness import Result

#: (case, peer or None, how many times better it must be, or an absolute bound)
TARGETS: list[tuple[str, str | None, float]] = [
    ("atomic.cmpxchg", None, 80.0),
    ("atomic.fetch_add", None, 80.0),
    ("atomic.test_and_set_bit", None, 80.0),
    ("atomic.cmpxchg", "peer.atomics.cmpxchg", 50.0),
    ("atomic.fetch_add", "peer.atomics.fetch_add", 50.0),
    ("atomic.test_and_set_bit", "peer.atomics.test_and_set_bit", 50.0),
    ("ring.spsc.batch", "peer.mp_queue", 15.0),
    ("ring.spsc.batch", "peer.faster_fifo.batch", 4.0),
    ("ring.mpsc.2producers", None, 1e6),
    ("sbitmap.get_put", None, 400.0),
]

#: (case, baseline, the most it may cost over the baseline, in %).  The trace's cost
#: on a CPU's per-I/O work without its event loop is an upper bound of its IOPS cost
#: in ``mqrt bench``, where each I/O also pays for the event loop.
OVERHEADS: list[tuple[str, str, float]] = [
    ("blk_mq.io.traced", "blk_mq.io", 10.0),
]


def _speedup(results: dict[str, Result], ours: str, peer: str) -> float:
    a, b = results[ours], results[peer]
    return b.value / a.value if a.unit == "ns/op" else a.value / b.value


def check_targets(results: dict[str, Result]) -> list[dict[str, Any]]:
    """The targets, evaluated on this run's medians: one dict per check (``check``,
    ``value``, ``target``, ``met``); a check whose cases did not run is left out."""
    checks = []
    for case, peer, bound in TARGETS:
        if case not in results or (peer is not None and peer not in results):
            continue
        r = results[case]
        if peer is not None:
            ratio = _speedup(results, case, peer)
            checks.append(
                {
                    "check": f"{case} vs {peer}",
                    "value": round(ratio, 1),
                    "target": f">= {bound:g}x",
                    "met": ratio >= bound,
                }
            )
        elif r.unit == "ns/op":
            checks.append(
                {
                    "check": case,
                    "value": round(r.value, 1),
                    "target": f"<= {bound:g} ns/op",
                    "met": r.value <= bound,
                }
            )
        else:
            checks.append(
                {
                    "check": case,
                    "value": round(r.value),
                    "target": f">= {bound:,.0f} ops/s",
                    "met": r.value >= bound,
                }
            )
    for case, base, pct in OVERHEADS:
        if case in results and base in results:
            cost = (results[case].value / results[base].value - 1.0) * 100.0
            checks.append(
                {
                    "check": f"{case} over {base}",
                    "value": round(cost, 1),
                    "target": f"<= {pct:g} %",
                    "met": cost <= pct,
                }
            )
    return checks

"""The events behind a finding, read from a failed run's whole trace: for each task
asleep for a tag when the detector fired, the sleep itself, then what happened on the
tag sets it could have been woken from -- tags freed (and by whom), wake-ups issued
and how many tasks they woke, and whether the sleeper was ever woken.  A user reads
why the detector fired without having to trust it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from mqrt.lib.trace import Ev, Record, TraceDump

#: Events that free a tag back to its sbitmap.
_FREES = (Ev.END, Ev.TAG_PUT)


def sleep_proof(dump: TraceDump, sleeping: list[dict[str, Any]]) -> list[str]:
    """Lines of proof for every sleeper of the snapshot (``{"cpu", "queued_on"}``)."""
    records = dump.records
    if not records:
        return ["the trace is empty"]
    t0 = records[0].t_ns
    lines = []
    for s in sleeping:
        cpu = s["cpu"]
        sleep = _last(records, cpu, Ev.TAG_SLEEP)
        if sleep is None:
            lines.append(f"cpu{cpu}: its sleep is older than the trace (it holds "
                         f"{_span_ms(records):.1f} ms of events)")  # fmt: skip
            continue
        i, rec = sleep
        after = records[i + 1 :]
        frees = [r for r in after if r.ev in _FREES]
        by_cpu = Counter(r.cpu for r in frees)
        by_queue = Counter(r.q for r in frees)
        wakes = [r for r in after if r.ev == Ev.WAKE_UP]
        woken = [r for r in after if r.ev == Ev.TAG_WAKE and r.cpu == cpu]
        lines.append(
            f"cpu{cpu}: TAG_SLEEP on queue {rec.q} hctx{rec.hctx} ws[{rec.arg}] at "
            f"+{(rec.t_ns - t0) / 1e9:.6f} s (on {s['queued_on']} at the finding)"
        )
        if frees:
            who = ", ".join(f"cpu{c} {n}" for c, n in sorted(by_cpu.items()))
            where = ", ".join(f"queue {q} {n}" for q, n in sorted(by_queue.items()))
            lines.append(f"  since then: {len(frees)} tags freed ({who}; {where})")
        else:
            lines.append("  since then: no tag freed")
        lines.append(
            f"  {len(wakes)} wake-ups issued, waking {sum(r.arg for r in wakes)} task(s); "
            + (f"cpu{cpu} woken {len(woken)} time(s)" if woken else f"cpu{cpu} never woken")
        )
        late = sorted(c for c, t in _ring_starts(records).items() if t > rec.t_ns)
        if late:
            lines.append(
                "  (the rings of " + ", ".join(f"cpu{c}" for c in late) + " start after the "
                "sleep: their earlier events are not counted)"
            )
    return lines


def _ring_starts(records: list[Record]) -> dict[int, int]:
    """Each CPU's oldest event still in its ring."""
    starts: dict[int, int] = {}
    for r in records:
        starts.setdefault(r.cpu, r.t_ns)
    return starts


def _last(records: list[Record], cpu: int, ev: int) -> tuple[int, Record] | None:
    for i in range(len(records) - 1, -1, -1):
        r = records[i]
        if r.cpu == cpu and r.ev == ev:
            return i, r
    return None


def _span_ms(records: list[Record]) -> float:
    return (records[-1].t_ns - records[0].t_ns) / 1e6

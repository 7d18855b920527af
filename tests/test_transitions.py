"""A live queue's transitions in real runs: freeze, quiesce and the frozen
nr_requests write made by CPU 0's sysfs writer while every CPU submits.  Each check
counts: references and request starts inside the frozen or quiesced stretch (read
from shared memory by the store itself), the run's totals and its end-of-run
invariants (every request ended once, no tag, nr_active or queue reference left)."""

from __future__ import annotations

from typing import Any

from mqrt.bench.main import build
from mqrt.bench.timeline import parse_at, parse_every
from mqrt.runtime.owner import run

#: 2 CPUs keeping 16 I/Os each on timer completions of 1 ms: a freeze always finds
#: I/O in flight to wait for.
LOADED = {"cpus": "2", "irqmode": "timer", "completion_nsec": "1000000", "iodepth": "16"}


def _run(given: dict[str, str], at: list[str] = (), every: list[str] = ()) -> Any:  # type: ignore[assignment]
    writes = [parse_at(t, "--at") for t in at] + [parse_every(t, "--every") for t in every]
    spec, _ = build({**LOADED, **given}, writes)
    result = run(spec)
    inv = result.invariants
    assert inv["violations"] == 0 and inv["problems"] == [], inv
    assert inv["leaked_tags"] == 0 and inv["owned_requests"] == 0 and inv["queue_refs"] == 0
    jobs = [j for c in result.cpus for j in c["jobs"]]
    assert all(j["inflight"] == 0 for j in jobs)
    return result


def _counters(result: Any, name: str) -> int:
    return sum(c["blk_mq"][name] for c in result.cpus)


def _made(result: Any, minimum: int = 1) -> list[dict[str, Any]]:
    """The transitions the writer finished.  A host that keeps CPU 0 off its cores
    makes ticks late or skips them (counted), and may end the run in the middle of
    one (closed, reported aborted): each tick is accounted for, at least
    ``minimum`` were made, and nothing failed."""
    writes = result.sysfs["writes"]
    trans = result.sysfs["transitions"]
    # a tick writes each of its queues in turn: a transition each
    assert sum(w["started"] for w in writes) == len(
        {(t["write"], t["scheduled_ns"]) for t in trans}
    )
    done = [t for t in trans if not t.get("aborted")]
    assert len(done) >= minimum and len(trans) - len(done) <= 1, trans
    assert all("error" not in t for t in trans), trans
    return done


def test_freeze_waits_for_the_io_in_flight_and_lets_nothing_through():
    result = _run({"runtime": "1.5"}, every=["150ms@200ms..1s:freeze=30ms"])
    made = _made(result)
    assert all(t["attr"] == "freeze" for t in made)
    for t in made:
        assert t["freeze_wait_ns"] >= t["grace_period_ns"] > 0
        # frozen: no reference taken, no request started
        assert t["refs_while_frozen"] == 0 and t["started_while_frozen"] == 0
    # freezes that found requests in flight waited for every one of them (the checks
    # above), and submitters found the queue frozen and slept until it thawed
    assert any(t["in_flight"] > 0 for t in made)
    assert _counters(result, "freeze_waits") > 0


def test_quiesce_stops_every_dispatch_and_the_queue_resumes():
    result = _run({"runtime": "1.5"}, every=["50ms@100ms..800ms:quiesce=10ms"])
    for t in _made(result, 2):
        assert t["started_while_quiesced"] == 0 and t["queues"] == 1
    # requests queued meanwhile were dispatched after each unquiesce: every I/O
    # submitted completed (checked by _run)
    assert sum(j["submitted"] for c in result.cpus for j in c["jobs"]) > 0


def test_quiesce_tagset_covers_both_queues_of_a_shared_tag_set():
    result = _run(
        {"runtime": "1.5", "nr_devices": "2", "shared_tags": "1"},
        every=["100ms@100ms..800ms:nullb0/quiesce_tagset=10ms"],
    )
    for t in _made(result, 2):
        assert t["queues"] == 2 and t["started_while_quiesced"] == 0


def test_nr_requests_write_freezes_and_quiesces_the_queue_under_load():
    result = _run(
        {"runtime": "2", "nr_devices": "2", "shared_tags": "1"},
        at=["0.2s:nullb0/queue/nr_requests=8", "0.4s:queue/nr_requests=64"],
    )
    made = _made(result, 3)
    # one tag set: the two queues share its bitmap (the second write finds 64 already)
    assert [(t["dev"], t["nr_requests_before"], t["nr_requests"]) for t in made] == [
        ("nullb0", 64, 8), ("nullb0", 8, 64), ("nullb1", 64, 64),
    ]  # fmt: skip
    assert all(t["freeze_wait_ns"] >= t["grace_period_ns"] > 0 for t in made)

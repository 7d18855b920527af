"""A live queue's transitions in real runs: freeze, quiesce and the frozen
nr_requests write made by CPU 0's sysfs writer while every CPU submits.  Each check
counts: references and request starts inside the frozen or quiesced stretch (read
from shared memory by the store itself), the run's totals and its end-of-run
invariants (every request ended once, no tag, nr_active or queue reference left)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from mqrt.bench.main import build
from mqrt.bench.timeline import parse_at, parse_every
from mqrt.runtime.owner import run

#: 2 CPUs keeping 16 I/Os each on timer completions of 1 ms: a freeze always finds
#: I/O in flight to wait for.
LOADED = {"cpus": "2", "irqmode": "timer", "completion_nsec": "1000000", "iodepth": "16"}


def _run(given: dict[str, str], at: list[str] = (), every: list[str] = (), base=LOADED) -> Any:  # type: ignore[assignment]
    writes = [parse_at(t, "--at") for t in at] + [parse_every(t, "--every") for t in every]
    spec, _ = build({**base, **given}, writes)
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


#: blk_mq_map_queues() for 4 CPUs, one thread a core (--cpus_per_core 1): CPU i ->
#: hctx i % nr.
KERNEL_MAP = {nr: [cpu % nr for cpu in range(4)] for nr in (1, 2, 4)}


def _allocs_by_map(result: Any) -> dict[tuple[int, int, int], list[int]]:
    """(cpu, queue, map generation) -> the requests that CPU allocated on each hctx
    while it followed that map (from each CPU's cumulative snapshots)."""
    out: dict[tuple[int, int, int], list[int]] = {}
    for c in result.cpus:
        last: dict[int, list[int]] = {}
        for snap in c["hctx_maps"]:
            q = snap["q"]
            prev = last.get(q, [0] * len(snap["alloc"]))
            delta = [a - b for a, b in zip(snap["alloc"], prev, strict=True)]
            key = (c["cpu"], q, snap["map_gen"])
            out[key] = [a + b for a, b in zip(out.get(key, [0] * len(delta)), delta, strict=True)]
            last[q] = snap["alloc"]
            nr = snap["nr_hw_queues"]
            assert snap["hctx"] == KERNEL_MAP[nr][c["cpu"]], snap
    return out


def _check_nr_hw_queues(result: Any, chain: list[tuple[int, int]] | None, minimum: int = 1) -> None:
    """The transitions made ``chain`` (before, after; None: any chain of at least
    ``minimum``, each starting where the one before left the set), each on both
    queues with nothing stranded, and every CPU's requests under each map went to the
    hctx blk_mq_map_queues() gives it."""
    made = _made(result, len(chain) if chain else minimum)
    got = [(t["nr_hw_queues_before"], t["nr_hw_queues"]) for t in made]
    if chain is not None:
        assert got == chain
    assert all(a[1] == b[0] for a, b in itertools.pairwise(got)), got
    for t in made:
        # one transition for the tag set: both queues frozen and remapped, nothing
        # left on a list of the old map; a write of the count the set has is a no-op
        assert t["queues"] == 2
        if t["nr_hw_queues_before"] != t["nr_hw_queues"]:
            assert t["stranded"] == 0 and t["freeze_wait_ns"] > 0 and t["map_gen"] > 0
        else:
            assert "freeze_wait_ns" not in t
    nr_by_gen = {0: got[0][0]}
    for t in made:
        if "map_gen" in t:
            nr_by_gen[t["map_gen"]] = t["nr_hw_queues"]
    allocs = _allocs_by_map(result)
    for (cpu, q, gen), per_hctx in allocs.items():
        want = KERNEL_MAP[nr_by_gen[gen]][cpu]
        # every request this CPU allocated under a map went to the hctx it names
        assert [h for h, n in enumerate(per_hctx) if n] in ([], [want]), (cpu, q, gen, per_hctx)
    # under 4 queues each CPU's I/O went to its own hctx: all four were used, where
    # the 4-queue map lasted long enough (a host that holds the writer back makes a
    # write late, and the stretch between two writes short)
    long_4 = [
        b["start_ns"] - a["end_ns"] >= 300_000_000
        for a, b in itertools.pairwise(made)
        if a["nr_hw_queues"] == 4
    ] + [got[0][0] == 4 and made[0]["start_ns"] >= 300_000_000]
    for q in (0, 1) if any(long_4) else ():
        used = {
            h
            for (_cpu, qq, gen), per_hctx in allocs.items()
            if qq == q and nr_by_gen[gen] == 4
            for h, n in enumerate(per_hctx)
            if n
        }
        assert used == {0, 1, 2, 3}


SHARED_SET = {"cpus": "4", "cpus_per_core": "1", "nr_devices": "2", "shared_tags": "1"}


def test_update_nr_hw_queues_1_4_1_under_load_on_a_shared_tag_set():
    result = _run({**SHARED_SET, "runtime": "3"}, at=["1s:nr_hw_queues=4", "2s:nr_hw_queues=1"])
    _check_nr_hw_queues(result, [(1, 4), (4, 1)])


def test_update_nr_hw_queues_with_a_shared_tag_bitmap():
    result = _run(
        {**SHARED_SET, "runtime": "3", "shared_tag_bitmap": "1"},
        at=["1s:nullb1/nr_hw_queues=4", "2s:nullb0/nr_hw_queues=1"],
    )
    _check_nr_hw_queues(result, [(1, 4), (4, 1)])


def test_update_nr_hw_queues_4_1_4_on_nvme_namespaces():
    """nvme: the count goes down and back up to the I/O queues the probe created
    (both namespaces' queues are on the one I/O tag set)."""
    nvme = {"driver": "nvme", "cpus": "4", "cpus_per_core": "1", "iodepth": "16"}
    result = _run(
        {"runtime": "3", "nr_namespaces": "2"},
        at=["1s:nr_hw_queues=1", "2s:nr_hw_queues=4"],
        base=nvme,
    )
    _check_nr_hw_queues(result, [(4, 1), (1, 4)])


def test_update_nr_hw_queues_switches_the_elevators_to_none_and_back():
    result = _run(
        {**SHARED_SET, "runtime": "3", "scheduler": "mq-deadline"},
        at=["1s:nr_hw_queues=4", "2s:nr_hw_queues=1"],
    )
    _check_nr_hw_queues(result, [(1, 4), (4, 1)])
    for t in _made(result, 2):
        assert t["elevators"] == ["mq-deadline", "mq-deadline"]
    for q in result.queues:  # back on both queues, and it saw the I/O after the changes
        assert q["elevator"]["name"] == "mq-deadline" and q["elevator"]["dispatched"] > 0, q


def test_update_nr_hw_queues_every_100ms():
    result = _run(
        {**SHARED_SET, "runtime": "2.5"},
        every=["200ms@200ms..2s:nr_hw_queues=4", "200ms@300ms..2s:nr_hw_queues=1"],
    )
    _check_nr_hw_queues(result, None, minimum=4)


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["nullb", "nvme"])
def test_update_nr_hw_queues_soak(driver):
    """At least 100 changes 4 <-> 1 under load, every 10 ms, on the two queues of
    one tag set: nothing lost, completed twice or leaked (_run), every CPU on the
    hctx each map gives it."""
    if driver == "nullb":
        given = {**SHARED_SET, "completion_nsec": "200000"}
        base = LOADED
    else:
        given = {"driver": "nvme", "cpus": "4", "cpus_per_core": "1", "nr_namespaces": "2"}
        base = {"iodepth": "16"}
    result = _run(
        {**given, "runtime": "4"},
        every=["20ms@100ms..3.5s:nr_hw_queues=4", "20ms@110ms..3.5s:nr_hw_queues=1"],
        base=base,
    )
    _check_nr_hw_queues(result, None, minimum=100)

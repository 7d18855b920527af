"""mq-deadline in real runs (CPU worker processes, nullb and nvme, shared tags, two
queues) and the scheduler switched under load by CPU 0's sysfs writer: every I/O
submitted completes once, the elevator saw each request inserted, dispatched and
finished, and the end-of-run invariants (no tag, request, nr_active, queue reference
or elevator entry left) hold."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mqrt.bench.main import build
from mqrt.bench.timeline import parse_at, parse_every
from mqrt.runtime.owner import run
from tests.test_cli import mqrt

#: 2 CPUs keeping 16 I/Os each (nullb: on timer completions of 200 us): the elevator
#: holds requests, and a switch finds I/O in flight.
LOADED = {
    "cpus": "2",
    "iodepth": "16",
    "rw": "randrw",
    "runtime": "1.2",
}
NULLB_TIMER = {"irqmode": "timer", "completion_nsec": "200000"}


def _run(given: dict[str, str], at: list[str] = (), every: list[str] = ()) -> Any:  # type: ignore[assignment]
    writes = [parse_at(t, "--at") for t in at] + [parse_every(t, "--every") for t in every]
    spec, _ = build({**LOADED, **given}, writes)
    result = run(spec)
    inv = result.invariants
    assert inv["violations"] == 0 and inv["problems"] == [], inv
    assert inv["leaked_tags"] == 0 and inv["owned_requests"] == 0 and inv["queue_refs"] == 0
    assert inv["leaked_sched_tags"] == 0
    assert inv["elv_queued"] == 0
    jobs = [j for c in result.cpus for j in c["jobs"]]
    assert all(j["inflight"] == 0 for j in jobs)
    return result


def _blk(result: Any, name: str) -> int:
    return sum(c["blk_mq"][name] for c in result.cpus)


def _requests_ended_once(result: Any) -> None:
    """Every request the CPUs made was issued and ended once, and every bio merged
    into one ended with it: requests = completed, bios = requests + merges."""
    assert _blk(result, "completed") == _blk(result, "requests")
    assert _blk(result, "bios") == _blk(result, "requests") + _blk(result, "merges")


@pytest.mark.parametrize(
    "given",
    [
        pytest.param(
            {"nr_devices": "2", "shared_tags": "1", "submit_queues": "2", **NULLB_TIMER},
            id="nullb",
        ),
        pytest.param({"driver": "nvme", "nr_namespaces": "2", "nr_io_queues": "2"}, id="nvme-2ns"),
    ],
)
def test_mq_deadline_on_shared_tags_every_request_through_the_elevator_once(given):
    result = _run({**given, "scheduler": "mq-deadline"})
    _requests_ended_once(result)
    elvs = [q["elevator"] for q in result.queues]
    assert [e["name"] for e in elvs] == ["mq-deadline", "mq-deadline"]
    # each request was inserted, dispatched and finished once by its queue's elevator
    # (no requeue in these runs)
    assert sum(e["inserted"] for e in elvs) == _blk(result, "requests")
    for e in elvs:
        assert e["inserted"] > 0
        assert e["inserted"] == e["dispatched"] == e["completed"]
        assert e["queued"] == 0 and e["owned_by_driver"] == 0


@pytest.mark.parametrize(
    "given",
    [
        pytest.param(
            {"nr_devices": "2", "shared_tags": "1", "submit_queues": "2", "hw_queue_depth": "4",
             **NULLB_TIMER},
            id="nullb",
        ),
        pytest.param(
            {"driver": "nvme", "nr_namespaces": "2", "nr_io_queues": "2", "io_queue_depth": "5"},
            id="nvme-2ns",
        ),
    ],
)  # fmt: skip
def test_fewer_driver_tags_than_sched_tags_requests_wait_for_one_at_dispatch(given):
    """queue_depth 4 (nr_requests 8 sched tags per hctx) on a set two queues share,
    32 I/Os kept: requests wait in the elevator for a sched tag and at dispatch for a
    driver tag (hctx->dispatch, then a restart or the delayed rerun); every one ends
    once, and no sched tag, driver tag or tags->rqs[] entry is left."""
    result = _run({**given, "scheduler": "mq-deadline"})
    _requests_ended_once(result)
    assert _blk(result, "driver_tag_waits") > 0
    elvs = [q["elevator"] for q in result.queues]
    assert sum(e["inserted"] for e in elvs) == _blk(result, "requests")
    for e in elvs:
        assert e["inserted"] > 0 and e["inserted"] == e["dispatched"] == e["completed"]


def test_default_scheduler_follows_the_kernel_choice():
    one = _run({"scheduler": "default", "runtime": "0.3"})
    assert one.queues[0]["elevator"]["name"] == "mq-deadline"
    two = _run({"scheduler": "default", "runtime": "0.3", "submit_queues": "2"})
    assert two.queues[0]["elevator"]["name"] == "none"
    assert two.queues[0]["elevator"]["inserted"] == 0


def test_sequential_writes_merge_in_the_elevator():
    result = _run(
        {"scheduler": "mq-deadline", "rw": "write", "bs": "4k", "iodepth": "32", "runtime": "0.6"}
    )
    _requests_ended_once(result)
    assert _blk(result, "write_merges") > 0


@pytest.mark.parametrize(
    "depth", [pytest.param({}, id="default-depth"), pytest.param({"hw_queue_depth": "4"}, id="4")]
)
def test_scheduler_switch_under_load_exact_totals(depth):
    """Switches both ways under load; with 4 driver tags (8 sched tags) requests also
    wait for driver tags at dispatch while the switches freeze and drain the queue."""
    result = _run(
        {"nr_devices": "2", "shared_tags": "1", "runtime": "1.5", **NULLB_TIMER, **depth},
        every=[
            "100ms@100ms..1.3s:queue/scheduler=mq-deadline",
            "100ms@150ms..1.3s:queue/scheduler=none",
        ],
        at=["500ms:nullb0/queue/iosched/fifo_batch=4"],
    )
    _requests_ended_once(result)
    trans = result.sysfs["transitions"]
    switches = [t for t in trans if t["attr"] == "queue/scheduler" and not t.get("aborted")]
    assert all("error" not in t for t in switches), switches
    # a loaded host makes ticks late or skips them (counted): the ticks made
    # alternate, so most are real switches, each frozen and quiesced
    real = [t for t in switches if t["scheduler_before"] != t["scheduler"]]
    assert real, trans
    assert {(t["scheduler_before"], t["scheduler"]) for t in real} <= {
        ("none", "mq-deadline"),
        ("mq-deadline", "none"),
    }
    for t in real:
        assert t["freeze_wait_ns"] >= t["grace_period_ns"] > 0
    # mq-deadline's epochs handled requests, each finished
    assert sum(q["elevator"]["inserted"] for q in result.queues) > 0


def test_job_file_ioscheduler_sweeps_the_scheduler(tmp_path):
    path = tmp_path / "jobs.fio"
    path.write_text("[seqwrite]\nrw=write\nbs=4k\nruntime=300ms\nioscheduler={none,mq-deadline}\n")
    out = mqrt("bench", str(path), "--output-format", "json", "--quiet")
    assert out.returncode == 0, out.stderr
    points = json.loads(out.stdout)["mqrt"]["points"]
    assert [p["params"]["scheduler"] for p in points] == ["none", "mq-deadline"]
    elvs = [p["run"]["queues"][0]["elevator"] for p in points]
    assert [e["name"] for e in elvs] == ["none", "mq-deadline"]
    assert elvs[0]["inserted"] == 0 < elvs[1]["inserted"] == elvs[1]["completed"]

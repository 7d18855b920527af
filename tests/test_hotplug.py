"""CPU hotplug (``cpuN/online``): the state machine and blk-mq's callbacks step by step
in one process (mqrt.testing), then real runs that take a CPU offline and back under
load, checked by exact totals and the end-of-run invariants (no request stranded in
an offline CPU's ctx, no hctx left INACTIVE with an online CPU)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from mqrt.bench.main import build
from mqrt.bench.timeline import TimelineError, parse_at, parse_every
from mqrt.block import blk_mq_cpuhp
from mqrt.block.blk_mq_structs import RQ_U16_CPU, RQ_U16_HCTX
from mqrt.block.blk_mq_types import RQF_HOME_SHIFT, BlkStatus, HctxState, ReqOp, Rqf
from mqrt.block.blk_sysfs import Sleep
from mqrt.lib.wait import WaitEvent
from mqrt.runtime.owner import run
from mqrt.testing import Rig, ScriptOps
from tests.test_blk_mq import clean, script_setup

READ = int(ReqOp.READ)


@pytest.fixture
def hotplug_rig():
    rigs: list[Rig] = []

    def make(nr_cpus: int, **kw: Any) -> tuple[Rig, ScriptOps]:
        ops = ScriptOps()
        rig = Rig(script_setup(ops, **kw), nr_cpus=nr_cpus, hotplug=True)
        rigs.append(rig)
        return rig, ops

    yield make
    for rig in rigs:
        rig.close()


def down(rig: Rig, cpu: int) -> Generator[Any, None, dict[str, Any]]:
    """``cpuN/online=0`` as the sysfs writer makes it, with CPU 0's block layer."""
    mq = rig.mqs[0]
    return blk_mq_cpuhp.store_online(mq, mq.clock, Sleep, cpu, False)


def up(rig: Rig, cpu: int) -> dict[str, Any]:
    mq = rig.mqs[0]
    try:
        next(blk_mq_cpuhp.store_online(mq, mq.clock, Sleep, cpu, True))
    except StopIteration as done:
        return done.value
    raise AssertionError("bringing a CPU up never sleeps")


def step(task: Generator[Any, None, dict[str, Any]]) -> Any:
    """Run a store to its next yield; its report (a dict) when it ends."""
    try:
        return next(task)
    except StopIteration as done:
        return done.value


def rq_fields(mq: Any, rq: Any) -> tuple[int, int, int]:
    """(ctx cpu, hctx, rq_flags) of a request, from shared memory."""
    half = rq.base >> 1
    return mq.buf16[half + RQ_U16_CPU], mq.buf16[half + RQ_U16_HCTX], int(rq.rq_flags)


def test_inactive_hctx_hands_out_no_tag_and_its_last_cpu_waits_for_its_requests(hotplug_rig):
    rig, ops = hotplug_rig(2, nr_hw_queues=2)
    mq0, mq1 = rig.mqs
    q1 = mq1.queues[0]
    hctx1 = q1.hctxs[1]
    assert q1.hctx_by_op[READ] is hctx1  # cpu1 alone on hctx1
    mq1.submit_bio(q1, READ, 0, 8, 0)
    (first,) = ops.started
    task = down(rig, 1)
    # INACTIVE, then the drain: one request of hctx1 in flight, looked at every 5 ms
    assert step(task) == Sleep(blk_mq_cpuhp.DRAIN_POLL_NS)
    assert hctx1.test_state(HctxState.INACTIVE)
    assert rig.hotplug.target(1) == 0 and not rig.hotplug.active(1) and rig.hotplug.online(1)
    # cpu1's task allocates again: the tag it takes on hctx1 goes back, the task moves
    # to cpu0 and allocates there, on cpu0's ctx, its bios still cpu1's
    mq1.submit_bio(q1, READ, 800, 8, 0)
    second = ops.started[1]
    ctx_cpu, h, flags = rq_fields(mq1, second)
    assert (ctx_cpu, h) == (0, 0) and flags & Rqf.MIGRATED and flags >> RQF_HOME_SHIFT == 1
    assert blk_mq_cpuhp.hctx_requests(mq0, hctx1) == 1  # only the first holds an hctx1 tag
    assert mq1.stats["task_moves"] == 1 and rig.hotplug.on_cpu(1) == 0
    # the drain ends with the first request; the task is already where it must be
    assert step(task) == Sleep(blk_mq_cpuhp.DRAIN_POLL_NS)
    mq0.end_request(first, BlkStatus.OK)
    report = step(task)
    assert report["in_flight"] == 1 and report["inactive"] == 1 and report["moved"] == 0
    assert report["drain_polls"] == 2 and report["target"] == 0
    assert not rig.hotplug.online(1) and rig.hotplug.nr_offline() == 1
    # the moved request ends on cpu0: its bio goes back to cpu1, where its job is
    rig.cpus[0].done.clear()
    mq0.end_request(second, BlkStatus.OK)
    ((owner, _q, _info),) = rig.cpus[0].done
    assert owner == 1 and mq0.stats["migrated_ends"] == 1
    # back online: INACTIVE cleared, the task comes home at its next look
    assert up(rig, 1) == {"online": 1, "reactivated": 1}
    assert not hctx1.test_state(HctxState.INACTIVE)
    assert mq1.follow_task() and rig.hotplug.on_cpu(1) == 1
    mq1.submit_bio(q1, READ, 1600, 8, 0)
    assert rq_fields(mq1, ops.started[2]) == (1, 1, 0)
    mq1.end_request(ops.started[2], BlkStatus.OK)
    clean(rig)
    assert blk_mq_cpuhp.stranded(rig.arena, rig.queues, rig.hotplug) == []


def test_dead_splices_exactly_the_dead_cpus_ctx_to_its_hctx_dispatch(hotplug_rig):
    from mqrt.block import blk_mq_freeze as freeze

    rig, ops = hotplug_rig(3, depth=16)  # one hctx for the three CPUs
    mq0, mq1, mq2 = rig.mqs
    q0 = mq0.queues[0]
    assert step(freeze.quiesce_queue(mq0, q0)) is None  # what is submitted stays queued
    for i in range(3):
        mq1.submit_bio(mq1.queues[0], READ, 1000 * i, 8, 0)
    for i in range(2):
        mq2.submit_bio(mq2.queues[0], READ, 9000 + 1000 * i, 8, 0)
    assert ops.calls == 0
    hctx = q0.hctxs[0]
    lst1, idx1 = q0.ctx_lists[(1, hctx.type)]
    lst2, _ = q0.ctx_lists[(2, hctx.type)]
    waiting = lst1.snapshot()
    assert len(waiting) == 3 and len(lst2) == 2
    task = down(rig, 1)
    # not the hctx's last online CPU: no INACTIVE, no drain; the writer waits for cpu1's
    # task to move (the kernel's sched_cpu_wait_empty())
    event = step(task)
    assert isinstance(event, WaitEvent) and not event.cond()
    assert not hctx.test_state(HctxState.INACTIVE)
    assert mq1.follow_task() and event.cond()
    report = step(task)
    assert report["moved"] == 3 and report["inactive"] == 0 and report["in_flight"] == 0
    # cpu1's three, in order, at the tail of hctx->dispatch; its ctx empty and unmarked
    assert hctx.dispatch.snapshot() == waiting and len(lst1) == 0 and len(lst2) == 2
    word, bit = hctx.pending_bit(idx1)
    assert not mq0.a.test_bit(word, bit)
    # the hctx's run is the unquiesce's (a quiesced queue runs nothing)
    assert rig.cpus[0].runs == {} and rig.cpus[0].remote_runs == []
    assert blk_mq_cpuhp.stranded(rig.arena, rig.queues, rig.hotplug) == []
    freeze.unquiesce_queue(mq0, q0)
    rig.cpus[0].run_kblockd()
    assert ops.calls == 5 and [rq.id for rq in ops.started[:3]] == waiting
    for rq in list(ops.started):
        mq0.end_request(rq, BlkStatus.OK)
    assert up(rig, 1)["reactivated"] == 0
    clean(rig)


def test_an_away_tasks_requests_take_no_ctx_merge_and_end_with_their_job():
    """cpu1's task, moved to cpu0 while cpu1 is offline, puts its requests on cpu0's
    ctx list: cpu0's own bios do not merge into them (their bios are cpu1's), and cpu1
    tries no ctx-list merge; plug merges stay, their chain ended at home."""
    from tests.test_blk_merge import merge_setup

    ops = ScriptOps()
    rig = Rig(merge_setup(ops), nr_cpus=2, hotplug=True)
    try:
        mq0, mq1 = rig.mqs
        q0, q1 = mq0.queues[0], mq1.queues[0]
        task = down(rig, 1)
        step(task)  # cpu1 is not its hctx's last CPU: straight to the wait for its task
        assert mq1.follow_task() and isinstance(step(task), dict)
        mq0.stop_hw_queues(q0)  # what is submitted waits on the ctx lists
        mq0.submit_bio(q0, READ, 500, 8, 0)  # cpu0 now looks at its ctx list for merges
        mq1.submit_bio(q1, READ, 100, 8, 1)
        mq0.submit_bio(q0, READ, 108, 8, 2)  # adjacent, on the same list: no merge
        mq1.submit_bio(q1, READ, 116, 8, 3)  # cpu1 away: no ctx-list merge either
        mq1.start_plug(2)
        mq1.submit_bio(q1, READ, 200, 8, 4)
        mq1.submit_bio(q1, READ, 208, 8, 5)  # a plug merge
        mq1.finish_plug()
        hctx = q0.hctxs[0]
        lst0, _ = q0.ctx_lists[(0, hctx.type)]
        # the plug's request went to hctx->dispatch (the stopped queue refused it)
        assert len(lst0) == 4 and len(hctx.dispatch) == 1
        assert len(q0.ctx_lists[(1, hctx.type)][0]) == 0
        assert mq0.stats["ctx_merges"] == mq1.stats["ctx_merges"] == 0
        assert sum(mq1.merges_by_op) == 1
        mq0.start_stopped_hw_queues(q0, False)
        assert sorted(rq.setup()[1:4] for rq in ops.started) == [
            (100, 8, 1), (108, 8, 1), (116, 8, 1), (200, 16, 2), (500, 8, 1),
        ]  # fmt: skip
        for rq in list(ops.started):
            mq0.end_request(rq, BlkStatus.OK)
        # cpu0's request ends with its own job; cpu1's go home, the merged one with
        # its chain kept by cpu1
        owners = [cpu for cpu, _q, _info in rig.cpus[0].done]
        assert sorted(owners) == [0, 0, 1, 1, 1] and mq0.stats["migrated_ends"] == 3
        up(rig, 1)
        clean(rig)
    finally:
        rig.close()


def test_kblockd_runs_and_completion_ipis_skip_an_offline_cpu(hotplug_rig):
    rig, _ops = hotplug_rig(3, nr_hw_queues=2)
    mq0 = rig.mqs[0]
    q = mq0.queues[0]
    hp = rig.hotplug
    (hctx,) = [h for h in q.hctxs if len(h.cpumask) == 2]
    cpu_a, cpu_b = hctx.cpumask
    assert {mq0._next_cpu(hctx) for _ in range(40)} == {cpu_a, cpu_b}
    if cpu_a == 0:
        cpu_a, cpu_b = cpu_b, cpu_a  # take the one that is not the boot CPU down
    task = down(rig, cpu_a)
    event = step(task)
    assert isinstance(event, WaitEvent)
    rig.mqs[cpu_a].follow_task()
    step(task)
    assert not hp.online(cpu_a)
    assert {mq0._next_cpu(hctx) for _ in range(40)} == {cpu_b}
    up(rig, cpu_a)
    assert {mq0._next_cpu(hctx) for _ in range(40)} == {cpu_a, cpu_b}
    clean(rig)


def test_a_stopped_offline_rolls_back():
    """A run that ends while a CPU is going down (the store closed at its yield) leaves
    it online and active, its hctx active."""
    ops = ScriptOps()
    rig = Rig(script_setup(ops, nr_hw_queues=2), nr_cpus=2, hotplug=True)
    try:
        mq1 = rig.mqs[1]
        q1 = mq1.queues[0]
        mq1.submit_bio(q1, READ, 0, 8, 0)
        task = down(rig, 1)
        assert isinstance(step(task), Sleep)
        assert q1.hctxs[1].test_state(HctxState.INACTIVE)
        task.close()
        hp = rig.hotplug
        assert hp.online(1) and hp.active(1) and hp.target(1) == 1
        assert not q1.hctxs[1].test_state(HctxState.INACTIVE)
        rig.mqs[0].end_request(ops.started[0], BlkStatus.OK)
        clean(rig)
    finally:
        rig.close()


def test_cpu_online_writes_are_checked():
    base = {"cpus": "2"}
    for text, why in [
        ("1s:cpu0/online=0", "cpu0/online: CPU 0 is the boot CPU"),
        ("1s:cpu1/online=2", r"cpu1/online: must be 0 \(offline\) or 1 \(online\), got '2'"),
        ("1s:cpu1/online", "cpu1/online needs a value"),
        ("1s:nullb0/cpu1/online=0", "cpu1/online is not a queue attribute: no device"),
    ]:
        with pytest.raises(TimelineError, match=why):
            build(base, [parse_at(text, "--at")])
    with pytest.raises(TimelineError, match=r"cpu2/online: this run has CPUs 1\.\.1"):
        build(base, [parse_at("1s:cpu2/online=0", "--at")])
    with pytest.raises(TimelineError, match=r"cpu1/online: this run has one CPU, CPU 0"):
        build({"cpus": "1"}, [parse_at("1s:cpu1/online=0", "--at")])
    spec, _config = build(base, [parse_at("1s:cpu1/online=0", "--at")])
    assert spec.timeline[0].value == (1, 0) and spec.timeline[0].attr == "cpuN/online"


# -- real runs -------------------------------------------------------------------------------

#: 2 CPUs on 2 hw queues (each hctx one CPU), 16 I/Os each on timer completions of 1
#: ms: an offline CPU is its hctx's last, and it always has I/O in flight to wait for.
LOADED = {
    "cpus": "2",
    "submit_queues": "2",
    "irqmode": "timer",
    "completion_nsec": "1000000",
    "iodepth": "16",
}


def _run(given: dict[str, str], at: list[str] = (), every: list[str] = ()) -> Any:  # type: ignore[assignment]
    writes = [parse_at(t, "--at") for t in at] + [parse_every(t, "--every") for t in every]
    spec, _ = build(given, writes)
    result = run(spec)
    inv = result.invariants
    assert inv["violations"] == 0 and inv["problems"] == [], inv
    assert inv["leaked_tags"] == 0 and inv["owned_requests"] == 0 and inv["queue_refs"] == 0
    assert inv["leaked_sched_tags"] == 0
    jobs = [j for c in result.cpus for j in c["jobs"]]
    assert all(j["inflight"] == 0 for j in jobs)
    blk = {k: sum(c["blk_mq"][k] for c in result.cpus) for k in result.cpus[0]["blk_mq"]}
    # every bio submitted came back once, every request ended once
    assert blk["bios"] == sum(j["submitted"] for j in jobs) > 0
    assert blk["completed"] == blk["requests"]
    assert blk["stale_completions"] == 0
    return result


def _offline_onlines(result: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The finished transitions, offline and online.  A loaded host may make ticks
    late, skip them (counted) or end the run in one (reported aborted): each tick is
    accounted for and nothing failed."""
    writes = result.sysfs["writes"]
    trans = result.sysfs["transitions"]
    assert sum(w["started"] for w in writes) == len(trans)
    assert all("error" not in t for t in trans), trans
    done = [t for t in trans if not t.get("aborted")]
    assert len(trans) - len(done) <= 1
    return [t for t in done if t["online"] == 0], [t for t in done if t["online"] == 1]


def test_offline_of_an_hctxs_last_cpu_waits_for_its_requests_and_its_task_moves():
    result = _run(
        {**LOADED, "runtime": "1.4"},
        every=["100ms@200ms..1.1s:cpu1/online=0", "100ms@250ms..1.1s:cpu1/online=1"],
    )
    off, on = _offline_onlines(result)
    off = [t for t in off if not t.get("noop")]
    on = [t for t in on if not t.get("noop")]
    assert len(off) >= 3 and len(on) >= 2
    for t in off:
        # cpu1 alone on hctx1: INACTIVE, its requests in flight waited for (looked at
        # every 5 ms; those counted may all end before the first look), none left on
        # its ctx when it died; its task went to cpu0
        assert t["inactive"] == 1 and t["target"] == 0 and t["moved"] == 0
        assert t["drain_wait_ns"] >= t["drain_polls"] * blk_mq_cpuhp.DRAIN_POLL_NS
    # the drain found cpu1's requests in flight (a freeze-like wait, not a no-op)
    assert sum(t["in_flight"] for t in off) > 0
    assert all(t["reactivated"] == 1 for t in on)
    # cpu1's task went away and came back, and submitted meanwhile: its requests
    # on cpu0's ctx ended with their bios sent home
    moves = result.cpus[1]["blk_mq"]["task_moves"]
    assert 2 <= moves <= len(off) + len(on) + 1  # + an offline the run's end rolled back
    assert result.cpus[0]["blk_mq"]["task_moves"] == 0
    assert sum(c["blk_mq"]["migrated_ends"] for c in result.cpus) > 0


@pytest.mark.parametrize(
    "given",
    [
        pytest.param({}, id="nullb"),
        pytest.param({"nr_devices": "2", "shared_tags": "1"}, id="nullb-shared-tags"),
        pytest.param({"poll_queues": "2", "hipri": "1"}, id="nullb-polled"),
        pytest.param(
            {"driver": "nvme", "nr_io_queues": "2", "latency_ns": "500000"},
            id="nvme",
        ),
        pytest.param(
            {"driver": "nvme", "nr_io_queues": "2", "latency_ns": "500000", "nr_namespaces": "2"},
            id="nvme-2ns",
        ),
        # requests wait in the elevator with a sched tag, for a driver tag at dispatch:
        # the drain counts the sched tags (blk_mq_hctx_has_requests())
        pytest.param(
            {"nr_devices": "2", "shared_tags": "1", "scheduler": "mq-deadline",
             "hw_queue_depth": "4"},
            id="nullb-mq-deadline",
        ),
    ],
)  # fmt: skip
def test_offline_online_cycles_under_load(given):
    g = {**LOADED, "runtime": "1.5", **given}
    if g.get("driver") == "nvme":
        for nullb_only in ("submit_queues", "irqmode", "completion_nsec"):
            g.pop(nullb_only)
    result = _run(g, every=["50ms@100ms:cpu1/online=0", "50ms@125ms:cpu1/online=1"])
    off, on = _offline_onlines(result)
    assert len(off) >= 3 and len(on) >= 3
    done_off = [t for t in off if not t.get("noop")]
    assert all(t["inactive"] >= 1 for t in done_off)  # cpu1 is each hctx's last CPU
    assert sum(t["in_flight"] for t in done_off) > 0
    assert sum(c["blk_mq"]["migrated_ends"] for c in result.cpus) > 0


def test_offline_of_one_cpu_of_a_shared_hctx_moves_what_waits_in_its_ctx():
    # three CPUs on one hw queue throttled to 40 MB/s: the driver refuses, requests
    # wait on the ctx lists, and cpu1's are moved to the hctx's dispatch list when it dies
    result = _run(
        {"cpus": "3", "submit_queues": "1", "mbps": "40", "iodepth": "16", "runtime": "1.5"},
        every=["20ms@100ms:cpu1/online=0", "20ms@110ms:cpu1/online=1"],
    )
    off, _on = _offline_onlines(result)
    assert len(off) >= 3
    assert all(t.get("noop") or (t["inactive"] == 0 and t["in_flight"] == 0) for t in off)


def test_the_report_summarises_offline_and_online_apart():
    from mqrt.bench.report import transitions

    def t(value: str, **fields: int) -> dict[str, Any]:
        return {"write": "x", "attr": "cpuN/online", "value": value, "duration_ns": 10, **fields}

    tr = transitions({"transitions": [t("0", moved=2), t("1", reactivated=1), t("0", moved=4)]})
    s = tr["summary"]
    assert set(s) == {"cpuN/online=0", "cpuN/online=1"}
    assert s["cpuN/online=0"]["count"] == 2 and s["cpuN/online=0"]["fields_median"] == {"moved": 3}
    assert s["cpuN/online=1"]["fields_median"] == {"reactivated": 1}


def test_a_remap_leaves_no_hctx_inactive_with_an_online_cpu():
    """An hctx INACTIVE since its last CPU went down, remapped (nr_hw_queues 2 -> 1)
    while that CPU is offline, then given CPUs again (1 -> 2) after it came back:
    INACTIVE does not outlive the map it was set under, and the CPU allocates there."""
    from tests.test_update_nr_hw_queues import nrhw_setup, update

    ops = ScriptOps()
    rig = Rig(
        nrhw_setup(ops, nr_hw_queues=2, max_hw_queues=2, nr_queues=1), nr_cpus=2, hotplug=True
    )
    try:
        mq0, mq1 = rig.mqs
        task = down(rig, 1)
        event = step(task)
        assert not isinstance(event, dict) and mq1.follow_task()  # the task moves to cpu0
        assert step(task)["inactive"] == 1
        assert mq0.queues[0].hctxs[1].test_state(HctxState.INACTIVE)
        assert update(mq0, mq0.queues[0], 1)["nr_hw_queues"] == 1
        assert not mq0.queues[0].hctxs[1].test_state(HctxState.INACTIVE)  # no CPU maps it
        up(rig, 1)
        assert mq1.follow_task()
        assert update(mq0, mq0.queues[0], 2)["nr_hw_queues"] == 2
        q1 = mq1.queues[0]
        mq1.submit_bio(q1, READ, 0, 8, 0)
        assert rq_fields(mq1, ops.started[-1]) == (1, 1, 0)
        mq1.end_request(ops.started[-1], BlkStatus.OK)
        assert blk_mq_cpuhp.stranded(rig.arena, rig.queues, rig.hotplug) == []
    finally:
        rig.close()

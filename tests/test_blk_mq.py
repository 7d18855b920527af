"""The block layer's data path, step by step in one process (mqrt.testing):
plugging and merging, direct issue, the dispatch list and its reruns, completion
affinity, exactly-once completion, timeouts, requeue, fair share, reserved tags."""

from __future__ import annotations

import time

import pytest

from mqrt.block.blk_mq_debugfs import check_invariants
from mqrt.block.blk_mq_setup import alloc_tag_set, init_queue
from mqrt.block.blk_mq_structs import RQ_ALLOCATED, RQ_GEN_SHIFT, RQ_OFF_IO_START, TagSet
from mqrt.block.blk_mq_types import (
    BLK_MQ_RESOURCE_DELAY_NS,
    BlkStatus,
    HctxState,
    ReqOp,
    Rqf,
    RqState,
)
from mqrt.testing import Rig, ScriptOps
from tests.helpers import scripted_rigs

READ = int(ReqOp.READ)


def script_setup(
    ops, depth=8, nr_hw_queues=1, reserved=0, nr_queues=1, timeout_ms=0, rq_affinity=1,
    async_depth=0,
):  # fmt: skip
    def setup(layout, topology):
        tset = TagSet(
            ops=ops,
            nr_hw_queues=nr_hw_queues,
            queue_depth=depth,
            reserved_tags=reserved,
            timeout_ms=timeout_ms,
        )
        alloc_tag_set(tset, layout, topology)
        queues = [
            init_queue(tset, layout, f"q{i}", rq_affinity=rq_affinity, async_depth=async_depth)
            for i in range(nr_queues)
        ]
        return ops, queues

    return setup


@pytest.fixture
def rig_factory():
    with scripted_rigs(script_setup) as make:
        yield make


def clean(rig) -> dict:
    inv = check_invariants(rig.arena, rig.queues)
    assert inv["problems"] == [], inv
    return inv


def test_direct_issue_then_end_request_frees_the_tag(rig_factory):
    rig, ops = rig_factory()
    q = rig.mq.queues[0]
    rig.mq.submit_bio(q, READ, 800, 8, 123)
    assert ops.calls == 1 and ops.last_flags == [True]
    rq = ops.started[0]
    assert rq.state is RqState.IN_FLIGHT and rq.state_word & RQ_ALLOCATED
    gen = rq.gen
    rig.mq.end_request(rq, BlkStatus.OK)
    ((cpu, qi, info),) = rig.sys.done
    assert (cpu, qi) == (0, 0)
    op, nr_bios, nbytes, start, io_start, status = info
    assert (op, nr_bios, nbytes, start, status) == (READ, 1, 4096, 123, 0)
    assert io_start >= start
    assert rq.state is RqState.IDLE and rq.gen == gen + 1
    clean(rig)


def test_plug_merges_adjacent_bios_into_one_request(rig_factory):
    rig, ops = rig_factory()
    q = rig.mq.queues[0]
    rig.mq.start_plug()
    for i in range(4):
        rig.mq.submit_bio(q, READ, 1000 + 8 * i, 8, 0)
    rig.mq.submit_bio(q, READ, 5000, 8, 0)  # not adjacent: a new request
    rig.mq.finish_plug()
    assert ops.calls == 2 and ops.last_flags == [False, True]
    first = ops.started[0].setup()
    assert first[1:4] == (1000, 32, 4)  # sector, nr_sectors, nr_bios
    for rq in list(ops.started):
        rig.mq.end_request(rq)
    assert [d[2][1] for d in rig.sys.done] == [4, 1]
    assert rig.mq.counters()["merges"] == 3
    clean(rig)


def test_plug_flushes_at_32_requests(rig_factory):
    rig, ops = rig_factory(depth=64)
    q = rig.mq.queues[0]
    rig.mq.start_plug()
    for i in range(33):
        rig.mq.submit_bio(q, READ, 10_000 * i, 8, 0)
    assert ops.calls == 32  # BLK_MAX_REQUEST_COUNT reached: flushed before the 33rd
    rig.mq.finish_plug()
    assert ops.calls == 33
    for rq in list(ops.started):
        rig.mq.end_request(rq)
    clean(rig)


def test_resource_puts_the_request_on_dispatch_and_reruns_after_3ms(rig_factory):
    rig, ops = rig_factory(ScriptOps([BlkStatus.RESOURCE, BlkStatus.RESOURCE]))
    q = rig.mq.queues[0]
    hctx = q.hctxs[0]
    rig.mq.submit_bio(q, READ, 0, 8, 0)
    # Direct issue said busy, the synchronous run said busy again: the request waits
    # on hctx->dispatch, SCHED_RESTART is set, and a rerun is due in 3 ms.
    assert ops.calls == 2 and not ops.started
    assert hctx.dispatch.snapshot() and hctx.test_state(HctxState.SCHED_RESTART)
    assert rig.sys.runs == {(0, 0): BLK_MQ_RESOURCE_DELAY_NS}
    assert hctx.dispatch_busy > 0
    assert rig.sys.run_kblockd() == 1
    assert len(ops.started) == 1 and not hctx.dispatch.snapshot()
    rig.mq.end_request(ops.started[0])
    assert not hctx.test_state(HctxState.SCHED_RESTART)  # cleared by the free's restart
    clean(rig)


def test_dev_resource_waits_for_the_next_completion(rig_factory):
    rig, ops = rig_factory()
    q = rig.mq.queues[0]
    hctx = q.hctxs[0]
    rig.mq.submit_bio(q, READ, 0, 8, 0)  # in flight, holds a tag
    ops.script = [BlkStatus.DEV_RESOURCE, BlkStatus.DEV_RESOURCE]
    rig.mq.submit_bio(q, READ, 80, 8, 0)
    assert len(ops.started) == 1 and hctx.dispatch.snapshot()
    assert rig.sys.runs == {}  # DEV_RESOURCE: no timed rerun, a completion restarts
    rig.mq.end_request(ops.started[0])
    assert rig.sys.runs == {(0, 0): 0}  # blk_mq_sched_restart(): an async run
    rig.sys.run_kblockd()
    assert len(ops.started) == 2
    rig.mq.end_request(ops.started[1])
    assert rig.mq.counters()["restarts"] >= 1
    clean(rig)


def test_a_request_completes_exactly_once(rig_factory):
    rig, ops = rig_factory()
    q = rig.mq.queues[0]
    rig.mq.submit_bio(q, READ, 0, 8, 0)
    rq = ops.started[0]
    gen = rq.gen
    assert rig.mq.complete_request(rq, gen)
    assert rq.state is RqState.COMPLETE
    assert not rig.mq.complete_request(rq, gen)  # a second completion is dropped
    assert rig.sys.run_softirqs() == 1  # one hw queue: completion via the softirq
    assert len(rig.sys.done) == 1
    # The tag is reused: a completion carrying the old generation is stale.
    rig.mq.submit_bio(q, READ, 0, 8, 0)
    again = ops.started[1]
    if again.id == rq.id:
        assert not rig.mq.complete_request(again, gen)
    assert rig.mq.counters()["stale_completions"] >= 1
    assert rig.mq.complete_request(again, again.gen)
    rig.sys.run_softirqs()
    assert len(rig.sys.done) == 2
    clean(rig)


def test_timeout_work_times_out_a_lost_request(rig_factory):
    rig, ops = rig_factory(timeout_ms=1)
    q = rig.mq.queues[0]
    rig.mq.submit_bio(q, READ, 0, 8, 0)
    rq = ops.started[0]
    assert rig.mq.timeout_work(0) == 0 or rq.deadline_ns <= time.monotonic_ns()
    time.sleep(0.005)
    rig.mq.timeout_work(0)
    assert ops.timed_out == [rq.id]
    rig.sys.run_softirqs()
    ((_, _, info),) = rig.sys.done
    assert info[5] == BlkStatus.TIMEOUT
    assert rig.mq.timeout_work(0) == 0  # nothing left
    clean(rig)


def test_requeue_goes_back_through_the_ctx(rig_factory):
    rig, ops = rig_factory()
    q = rig.mq.queues[0]
    rig.mq.submit_bio(q, READ, 0, 8, 0)
    rq = ops.started.pop()
    rig.mq.requeue_request(rq, True)
    assert rq.state is RqState.IDLE and rq.state_word & RQ_ALLOCATED
    assert q.requeue_list.snapshot() == [rq.id] and rig.sys.requeue_kicks == [0]
    rig.sys.run_requeue()
    assert ops.calls == 2 and ops.started == [rq]
    rig.mq.end_request(rq)
    clean(rig)


# -- the issue time a bio's end hands its job (fio's slat | clat split) -----------------------


class StepClock:
    """A clock that says what the test set (the block layer's ``clock``)."""

    def __init__(self, t: int):
        self.t = t

    def __call__(self) -> int:
        return self.t


def start_and_issue(rig, rq) -> tuple[int, int, int]:
    """The bio's (start, issue) its end handed over, and the request's
    io_start_time_ns (the kernel's: its last start)."""
    ((_cpu, _q, info),) = rig.sys.done
    return info[3], info[4], rig.mq.a.read(rq.base + RQ_OFF_IO_START)


def test_a_requeued_request_keeps_its_first_issue(rig_factory):
    """Started at 100, sent back by the driver (nvme's retry after an Abort or a
    reset) twice, started again at 2000 and 4000: the bio's issue stays 100, so the
    job books the stall as clat; io_start_time_ns is the kernel's, the last start."""
    rig, ops = rig_factory(depth=1)
    clock = rig.mq.clock = StepClock(100)
    q = rig.mq.queues[0]
    rig.mq.submit_bio(q, READ, 0, 8, 50)
    rq = ops.started.pop()
    for requeued_at, restarted_at in ((1_000, 2_000), (3_000, 4_000)):
        clock.t = requeued_at
        rig.mq.requeue_request(rq, True)
        clock.t = restarted_at
        rig.sys.run_requeue()
        assert ops.started.pop() is rq and rq.rq_flags & Rqf.REQUEUED
    clock.t = 5_000
    rig.mq.end_request(rq)
    assert start_and_issue(rig, rq) == (50, 100, 4_000)
    # The tag's next request is a new one: its own first issue.
    rig.sys.done.clear()
    clock.t = 6_000
    rig.mq.submit_bio(q, READ, 0, 8, 5_900)
    (again,) = ops.started
    assert again is rq and not rq.rq_flags & Rqf.REQUEUED
    clock.t = 7_000
    rig.mq.end_request(rq)
    assert start_and_issue(rig, rq) == (5_900, 6_000, 6_000)
    clean(rig)


def test_a_request_refused_with_resource_was_issued_when_first_refused(rig_factory):
    """BLK_STS_RESOURCE before the driver started it: the submission handed it over
    at 100 (fio's submit returned); the wait on hctx->dispatch until kblockd's run
    started it at 5000 is clat."""
    rig, ops = rig_factory(ScriptOps([BlkStatus.RESOURCE, BlkStatus.RESOURCE]))
    clock = rig.mq.clock = StepClock(100)
    q = rig.mq.queues[0]
    rig.mq.submit_bio(q, READ, 0, 8, 50)
    assert ops.calls == 2 and not ops.started
    clock.t = 5_000
    assert rig.sys.run_kblockd() == 1
    (rq,) = ops.started
    clock.t = 6_000
    rig.mq.end_request(rq)
    assert start_and_issue(rig, rq) == (50, 100, 5_000)
    clean(rig)


def test_a_request_failed_before_it_was_started_was_issued_as_it_ended(rig_factory):
    """->queue_rq failed it outright (a dead controller's BLK_STS_IOERR): never
    started, so no io_start_time_ns of this life; its issue is its end, not what a
    former request of the tag left there."""
    rig, ops = rig_factory(ScriptOps([0, BlkStatus.IOERR]), depth=1)
    clock = rig.mq.clock = StepClock(100)
    q = rig.mq.queues[0]
    rig.mq.submit_bio(q, READ, 0, 8, 50)  # the tag's former request, started at 100
    (rq,) = ops.started
    rig.mq.end_request(rq)
    rig.sys.done.clear()
    clock.t = 9_000
    rig.mq.submit_bio(q, READ, 0, 8, 8_900)
    ((_cpu, _q, info),) = rig.sys.done
    assert (info[3], info[4], info[5]) == (8_900, 9_000, BlkStatus.IOERR)
    clean(rig)


@pytest.mark.parametrize("irqmode", [0, 1])
def test_null_blk_requeues_keep_the_first_issue(irqmode):
    """null_blk's requeue fault, both ways it alternates (BLK_STS_RESOURCE, then
    blk_mq_requeue_request() from ->queue_rq): the bio's issue is its first
    ->queue_rq at 100; it is started at 5000, after the requeue work."""
    from mqrt.device import null_blk

    cfg = null_blk.parse_config({"irqmode": irqmode, "requeue": "1,100,0,2"})
    rig = Rig(lambda layout, topology: null_blk.setup(cfg, layout, topology))
    try:
        mq, q = rig.mq, rig.mq.queues[0]
        clock = mq.clock = StepClock(100)
        mq.submit_bio(q, READ, 0, 8, 50)
        assert mq.counters()["busy"] == 1 and q.requeue_list.snapshot()
        (rq_id,) = q.requeue_list.snapshot()
        rq = mq.rqs[0][rq_id]
        clock.t = 5_000
        rig.sys.run_requeue()
        rig.sys.run_softirqs()
        assert start_and_issue(rig, rq) == (50, 100, 5_000)
        assert not check_invariants(rig.arena, rig.queues)["problems"]
    finally:
        rig.close()


def test_nowait_allocation_fails_when_the_map_is_full(rig_factory):
    rig, _ops = rig_factory(depth=4)
    q = rig.mq.queues[0]
    ids = [rig.mq.alloc_request(q, READ, 0, 8, 0, nowait=True) for _ in range(4)]
    assert sorted(ids) == [0, 1, 2, 3]
    assert rig.mq.alloc_request(q, READ, 0, 8, 0, nowait=True) == -1


def test_reserved_tags_come_first_in_the_numbering(rig_factory):
    rig, _ops = rig_factory(depth=8, reserved=2)
    q = rig.mq.queues[0]
    res = sorted(
        rig.mq.alloc_request(q, READ, 0, 8, 0, reserved=True, nowait=True) for _ in range(2)
    )
    assert res == [0, 1]
    assert rig.mq.alloc_request(q, READ, 0, 8, 0, reserved=True, nowait=True) == -1
    normal = {rig.mq.alloc_request(q, READ, 0, 8, 0, nowait=True) for _ in range(6)}
    assert normal == set(range(2, 8))


def test_fair_share_holds_an_active_queue_to_its_share(rig_factory):
    rig, _ops = rig_factory(depth=16, nr_queues=2)
    q0, q1 = rig.mq.queues
    assert q0.shared and q1.shared
    assert rig.mq.alloc_request(q1, READ, 0, 8, 0, nowait=True) >= 0  # q1 becomes active
    got = 0
    while rig.mq.alloc_request(q0, READ, 0, 8, 0, nowait=True) >= 0:
        got += 1
    # Two active users of 16 tags: each may hold max(ceil(16 / 2), 4) = 8.
    assert got == 8
    assert q0.hctxs[0].tags.active_queues == 2
    assert q0.hctxs[0].tags.fair_share() == 8


def test_rq_affinity_2_completes_on_the_submitting_cpu(rig_factory):
    rig, ops = rig_factory(nr_cpus=2, rq_affinity=2)
    mq0, mq1 = rig.mqs
    mq0.submit_bio(mq0.queues[0], READ, 0, 8, 0)
    rq0 = ops.started[0]
    rq1 = mq1.rqs[0][rq0.id]  # CPU 1's accessor for the same request
    assert mq1.complete_request(rq1)
    ((cpu, q, rq_id, gen),) = rig.cpus[1].ipis
    assert (cpu, q, rq_id) == (0, 0, rq0.id)
    mq0.ipi_complete(q, rq_id, gen)  # the IPI arrives on CPU 0
    ((done_cpu, _q, _info),) = rig.cpus[0].done
    assert done_cpu == 0
    clean(rig)


def test_rq_affinity_1_completes_locally_when_the_cache_is_shared(rig_factory):
    rig, ops = rig_factory(nr_cpus=2, rq_affinity=1)
    mq0, mq1 = rig.mqs
    mq0.submit_bio(mq0.queues[0], READ, 0, 8, 0)
    rq1 = mq1.rqs[0][ops.started[0].id]
    assert mq1.complete_request(rq1)
    assert rig.cpus[1].ipis == [] and rig.cpus[1].run_softirqs() == 1
    # CPU 1 ended it; the bio goes back to its submitter, CPU 0.
    ((_cpu, _q, _info),) = rig.cpus[1].done
    assert rig.cpus[1].done[0][0] == 0
    clean(rig)


def test_generation_advances_once_per_request_lifetime(rig_factory):
    rig, ops = rig_factory(depth=1)
    q = rig.mq.queues[0]
    for i in range(5):
        rig.mq.submit_bio(q, READ, 8 * i, 8, 0)
        rig.mq.end_request(ops.started[-1])
    word = rig.mq.rqs[0][0].state_word
    assert word >> RQ_GEN_SHIFT == 5 and not word & RQ_ALLOCATED
    clean(rig)


def test_tags_show_uses_debugfs_keys(rig_factory):
    rig, _ops = rig_factory(depth=8, reserved=1)
    text = rig.mq.queues[0].hctxs[0].tags.show()
    for key in (
        "nr_tags=8",
        "nr_reserved_tags=1",
        "active_queues=0",
        "bitmap_tags:",
        "breserved_tags:",
        "depth=7",
        "wake_batch=",
        "ws_active=0",
    ):
        assert key in text


class BudgetOps(ScriptOps):
    """A driver with a device budget (SCSI's queue_depth per LUN): the block layer
    takes it before ->queue_rq; the driver gives it back when the request ends."""

    def __init__(self, budget: int):
        super().__init__()
        self.budget = budget

    def get_budget(self, mq, queue):
        if self.budget <= 0:
            return False
        self.budget -= 1
        return True

    def put_budget(self, mq, queue):
        self.budget += 1

    def complete(self, mq, rq):
        self.put_budget(mq, None)
        mq.end_request(rq, rq.status)


def test_no_budget_parks_the_request_until_a_completion_returns_it(rig_factory):
    rig, ops = rig_factory(BudgetOps(1))
    q = rig.mq.queues[0]
    hctx = q.hctxs[0]
    rig.mq.submit_bio(q, READ, 0, 8, 0)  # takes the only budget
    rig.mq.submit_bio(q, READ, 80, 8, 0)  # none left: ctx, then hctx->dispatch
    assert len(ops.started) == 1 and hctx.dispatch.snapshot()
    assert rig.sys.runs == {(0, 0): 0}  # SCHED_RESTART was not set yet: rerun now
    rig.sys.run_kblockd()
    assert hctx.test_state(HctxState.SCHED_RESTART)
    assert rig.sys.runs == {(0, 0): BLK_MQ_RESOURCE_DELAY_NS}  # no budget: retry in 3 ms
    rig.mq.complete_request(ops.started[0])
    rig.sys.run_softirqs()  # ->complete gives the budget back; the free restarts
    assert rig.sys.runs == {(0, 0): 0}  # mod_delayed_work: the restart runs now
    rig.sys.run_kblockd()
    assert len(ops.started) == 2 and ops.budget == 0
    rig.mq.complete_request(ops.started[1])
    rig.sys.run_softirqs()
    assert ops.budget == 1
    clean(rig)


def test_stopped_hctx_queues_until_started(rig_factory):
    rig, ops = rig_factory()
    q = rig.mq.queues[0]
    rig.mq.stop_hw_queues(q)
    rig.mq.submit_bio(q, READ, 0, 8, 0)
    assert ops.calls == 0 and q.hctxs[0].has_pending()
    rig.mq.start_stopped_hw_queues(q, False)
    assert len(ops.started) == 1
    rig.mq.end_request(ops.started[0])
    clean(rig)


def test_plug_takes_a_batch_of_tags_and_frees_what_it_did_not_use(rig_factory):
    rig, ops = rig_factory(depth=256)  # 64-bit words: a batch of 8 fits one word
    q = rig.mq.queues[0]
    rig.mq.start_plug(8)
    for i in range(3):
        rig.mq.submit_bio(q, READ, 10_000 * i, 8, 0)
    assert rig.mq.nr_batch_tags == 8 and len(rig.mq.plug.cached) == 5
    rig.mq.finish_plug()
    assert ops.calls == 3
    for rq in list(ops.started):
        rig.mq.end_request(rq)
    clean(rig)  # the 5 unused tags went back


def test_reserved_tags_are_not_held_to_the_fair_share(rig_factory):
    # __blk_mq_get_tag(): hctx_may_queue() does not apply to BLK_MQ_REQ_RESERVED
    rig, _ops = rig_factory(depth=18, reserved=2, nr_queues=2)
    q0, q1 = rig.mq.queues
    assert rig.mq.alloc_request(q1, READ, 0, 8, 0, nowait=True) >= 0  # q1 becomes active
    while rig.mq.alloc_request(q0, READ, 0, 8, 0, nowait=True) >= 0:
        pass  # q0 at its share of the 16 normal tags
    got = [rig.mq.alloc_request(q0, READ, 0, 8, 0, reserved=True, nowait=True) for _ in range(2)]
    assert all(rq >= 0 for rq in got), got


def test_no_tag_batch_below_a_shallow_depth(rig_factory):
    # blk_mq_get_tags(): no batch with a shallow depth (async_depth for writes)
    rig, ops = rig_factory(depth=256, async_depth=4)
    q = rig.mq.queues[0]
    rig.mq.start_plug(16)
    for i in range(4):
        rig.mq.submit_bio(q, int(ReqOp.WRITE), 10_000 * i, 8, 0)
    assert rig.mq.nr_batch_tags == 0  # each write took one tag below the shallow depth
    rig.mq.finish_plug()
    assert ops.calls == 4
    for rq in list(ops.started):
        rig.mq.end_request(rq)
    clean(rig)


def test_no_tag_batch_with_shared_tags(rig_factory):
    rig, _ops = rig_factory(depth=256, nr_queues=2)
    q = rig.mq.queues[0]
    rig.mq.start_plug(8)
    rig.mq.submit_bio(q, READ, 0, 8, 0)
    assert rig.mq.nr_batch_tags == 0  # TAG_QUEUE_SHARED: one tag at a time
    rig.mq.plug = None


class CountingClock:
    """A clock that moves 1000 ns at every look: the same sequence of looks gives
    the same times."""

    def __init__(self) -> None:
        self.t = 0

    def __call__(self) -> int:
        self.t += 1000
        return self.t


@pytest.mark.parametrize("rw", ["randread", "read", "randrw"])
def test_submit_bios_is_submit_bio_for_each_bio(rw):
    """io_submit()'s loop (submit_bios, whose bios that can merge nowhere skip the
    call to submit_bio) ends as submit_bio called bio by bio: the same requests,
    merges, counters and, with a clock that moves per look, the same latencies."""
    from mqrt.device import null_blk
    from mqrt.workers.ioengine import IoJob, JobSpec

    cfg = null_blk.parse_config({"irqmode": 0, "hw_queue_depth": 64})
    results = []
    for batched in (False, True):
        rig = Rig(lambda layout, topology: null_blk.setup(cfg, layout, topology))
        try:
            mq = rig.mq
            mq.clock = clock = CountingClock()
            q = mq.queues[0]
            job = IoJob(JobSpec.from_options({"rw": rw, "size": 1 << 20}), 0, 0, 1 << 30, 0)
            mq.end_io = [job.done]
            mq.end_io_merged = [job.done_merged]
            for n in (32, 7, 40, 1, 16) * 20:
                mq.start_plug(n)
                if batched:
                    ops, sectors, lens = job.next_bios(n)
                    mq.submit_bios(q, ops, sectors, lens, False)
                else:
                    for _ in range(n):
                        op, sector, nr_sectors = job.next_bio()
                        mq.submit_bio(q, op, sector, nr_sectors, clock(), False)
                job.mark_submit(n)
                mq.finish_plug()
            assert job.inflight == 0
            results.append((job.to_wire(), mq.counters()))
            clean(rig)
        finally:
            rig.close()
    assert results[0] == results[1]
    assert results[1][1]["bios"] == 20 * 96
    if rw == "read":  # sequential: plugged neighbours merge
        assert results[1][1]["merges"] > 0

"""The elevator in the block layer, step by step in one process (mqrt.testing):
the default choice, mq-deadline's insert, dispatch order, merges, async_depth,
finish at completion, and the switch on a frozen, quiesced queue."""

from __future__ import annotations

import random

import pytest

from mqrt.block import elevator as elv
from mqrt.block.blk_mq_debugfs import check_invariants
from mqrt.block.blk_mq_setup import alloc_tag_set, init_queue
from mqrt.block.blk_mq_structs import BlkMqError, TagSet
from mqrt.block.blk_mq_types import BlkMqFlag, BlkStatus, ReqOp, Rqf, RqState
from tests.dd_model import DdModel
from tests.helpers import scripted_rigs

READ, WRITE = int(ReqOp.READ), int(ReqOp.WRITE)


def sched_setup(
    ops, depth=8, nr_hw_queues=1, nr_queues=1, elevator="mq-deadline", flags=None, nomerges=0
):
    def setup(layout, topology):
        tset = TagSet(ops=ops, nr_hw_queues=nr_hw_queues, queue_depth=depth)
        if flags is not None:
            tset.flags = flags
        alloc_tag_set(tset, layout, topology)
        queues = [
            init_queue(tset, layout, f"q{i}", elevator=elevator, nomerges=nomerges)
            for i in range(nr_queues)
        ]
        return ops, queues

    return setup


@pytest.fixture
def make():
    with scripted_rigs(sched_setup) as m:
        yield m


def clean(rig) -> None:
    inv = check_invariants(rig.arena, rig.queues)
    assert inv["problems"] == [], inv
    for q in rig.mq.queues:
        if q.dd is not None:
            assert q.dd.check() == []


def complete_all(rig, ops) -> int:
    n = 0
    while ops.started:
        rig.mq.end_request(ops.started.pop(0), BlkStatus.OK)
        n += 1
    return n


# -- the default choice ------------------------------------------------------------------


def _tset(nr_hw_queues: int, flags: BlkMqFlag = BlkMqFlag.SHOULD_MERGE) -> TagSet:
    t = TagSet(ops=None, nr_hw_queues=nr_hw_queues, queue_depth=8)  # type: ignore[arg-type]
    t.flags = flags
    return t


def test_default_is_mq_deadline_for_one_hw_queue_and_none_for_many():
    assert elv.elevator_init_mq(_tset(1), "default") == "mq-deadline"
    assert elv.elevator_init_mq(_tset(4), "default") == "none"
    shared = BlkMqFlag.SHOULD_MERGE | BlkMqFlag.TAG_HCTX_SHARED
    assert elv.elevator_init_mq(_tset(4, shared), "default") == "mq-deadline"
    no_default = BlkMqFlag.SHOULD_MERGE | BlkMqFlag.NO_SCHED_BY_DEFAULT
    assert elv.elevator_init_mq(_tset(1, no_default), "default") == "none"
    assert elv.elevator_init_mq(_tset(1, no_default), "mq-deadline") == "mq-deadline"
    assert elv.elevator_init_mq(_tset(1, BlkMqFlag.NO_SCHED), "mq-deadline") == "none"
    assert elv.elevator_init_mq(_tset(4), "none") == "none"


def test_bad_choices_are_one_line_errors():
    with pytest.raises(elv.ElevatorError, match=r"^scheduler: must be one of none, mq-deadline"):
        elv.elevator_init_mq(_tset(1), "bfq")
    with pytest.raises(elv.ElevatorError, match="mq-deadline needs --mode mq"):
        elv.check_mode("mq-deadline", "sq")
    elv.check_mode("default", "raw")
    elv.check_mode("none", "sq")


def test_init_queue_refuses_an_unknown_elevator(make):
    with pytest.raises(BlkMqError, match="scheduler: must be one of"):
        make(elevator="kyber")


# -- the data path -------------------------------------------------------------------------


def test_request_goes_through_the_elevator_and_is_finished_at_its_end(make):
    rig, ops = make()
    q = rig.mq.queues[0]
    assert q.elevator() == elv.ELV_MQ_DEADLINE
    rig.mq.submit_bio(q, READ, 800, 8, 1)
    # inserted, then the hw queue runs async (kblockd): nothing issued yet
    assert ops.calls == 0
    assert q.dd.counters()["inserted"] == 1 and q.dd.has_work()
    assert rig.sys.run_kblockd() == 1
    assert ops.calls == 1
    (rq,) = ops.started
    assert rq.rq_flags & Rqf.ELV
    c = q.dd.counters()
    assert (c["dispatched"], c["completed"]) == (1, 0)
    complete_all(rig, ops)
    assert q.dd.counters()["completed"] == 1
    assert rq.state is RqState.IDLE
    clean(rig)


def test_plugged_requests_dispatch_in_sector_order(make):
    rig, ops = make(depth=16)
    q = rig.mq.queues[0]
    mq = rig.mq
    mq.start_plug()
    for sector in (800, 80, 8000, 400):
        mq.submit_bio(q, READ, sector, 8, 1)
    mq.finish_plug()
    # the flush inserted them all and ran the hw queue here (not from schedule): the
    # oldest first (nothing to follow yet), then on in sector order, then the oldest
    assert [rq.setup()[1] for rq in ops.started] == [800, 8000, 80, 400]
    assert complete_all(rig, ops) == 4
    clean(rig)


def test_an_expired_read_goes_first(make):
    rig, ops = make(depth=16)
    q = rig.mq.queues[0]
    mq = rig.mq
    t = [10**12]
    mq.clock = lambda: t[0]
    elv.store_iosched(q, "read_expire", "1")  # 1 ms
    mq.start_plug()
    mq.submit_bio(q, READ, 9000, 8, 1)
    t[0] += 5_000_000  # the first one expires before the others are inserted
    mq.submit_bio(q, READ, 100, 8, 1)
    mq.submit_bio(q, READ, 200, 8, 1)
    # insert without running: the plug's flush from schedule runs kblockd
    mq.flush_plug(mq.plug, from_schedule=True)
    mq.finish_plug()
    t[0] += 5_000_000
    rig.sys.run_kblockd()
    # the batch starts at the expired FIFO head, then goes on in sector order
    assert [rq.setup()[1] for rq in ops.started][:1] == [9000]
    complete_all(rig, ops)
    clean(rig)


def test_bios_merge_into_a_request_the_elevator_holds(make):
    rig, ops = make(depth=16)
    q = rig.mq.queues[0]
    rig.mq.submit_bio(q, WRITE, 800, 8, 1)
    rig.mq.submit_bio(q, WRITE, 808, 8, 2)  # back merge
    rig.mq.submit_bio(q, WRITE, 792, 8, 3)  # front merge
    assert rig.mq.stats["elv_merges"] == 2
    rig.sys.run_kblockd()
    (rq,) = ops.started
    assert rq.setup()[1:4] == (792, 24, 3)  # sector, nr_sectors, nr_bios
    assert q.dd.counters()["inserted"] == 1
    complete_all(rig, ops)
    assert rig.mq.merges_by_op[WRITE] == 2 and rig.mq.counters()["open_bio_chains"] == 0
    clean(rig)


@pytest.mark.parametrize("nomerges", [1, 2])
def test_nomerges_keeps_bios_out_of_the_elevators_requests(make, nomerges):
    rig, ops = make(depth=16, nomerges=nomerges)
    q = rig.mq.queues[0]
    rig.mq.submit_bio(q, WRITE, 800, 8, 1)
    rig.mq.submit_bio(q, WRITE, 808, 8, 2)
    assert rig.mq.stats["elv_merges"] == 0
    rig.sys.run_kblockd()
    assert len(ops.started) == 2
    complete_all(rig, ops)
    clean(rig)


def test_a_refused_request_waits_on_the_dispatch_list_and_reruns(make):
    rig, ops = make(depth=16)
    ops.script = [int(BlkStatus.DEV_RESOURCE)]
    q = rig.mq.queues[0]
    rig.mq.submit_bio(q, READ, 800, 8, 1)
    rig.mq.submit_bio(q, READ, 1600, 8, 1)
    rig.sys.run_kblockd()
    # one round took both; the first refused: both onto hctx->dispatch
    hctx = q.hctxs[0]
    assert ops.started == [] and ops.calls == 1
    assert not hctx.dispatch.empty() and not q.dd.has_work()
    assert rig.sys.run_kblockd() == 1  # the rerun: the dispatch list first
    assert [rq.setup()[1] for rq in ops.started] == [800, 1600] and ops.calls == 3
    assert hctx.dispatch.empty() and not q.dd.has_work()
    complete_all(rig, ops)
    assert q.dd.counters()["completed"] == 2
    clean(rig)


def test_async_depth_limits_writes_not_reads(make):
    # 64 tags: 4 words of 16; 6.6's shallow depth is per word (dd_limit_depth)
    rig, _ops = make(depth=64)
    q = rig.mq.queues[0]
    elv.store_iosched(q, "async_depth", "2")
    writes = [rig.mq.alloc_request(q, WRITE, 8 * i, 8, 1, nowait=True) for i in range(64)]
    assert sum(r >= 0 for r in writes) == 2 * 4
    reads = [rig.mq.alloc_request(q, READ, 800 + 8 * i, 8, 1, nowait=True) for i in range(64)]
    assert sum(r >= 0 for r in reads) == 64 - 8


def test_requeue_goes_back_to_the_head_of_the_elevator(make):
    rig, ops = make(depth=16)
    q = rig.mq.queues[0]
    rig.mq.submit_bio(q, READ, 800, 8, 1)
    rig.sys.run_kblockd()
    (rq,) = ops.started
    ops.started.clear()
    rig.mq.requeue_request(rq, kick=True)
    rig.sys.run_requeue()
    rig.sys.run_kblockd()
    assert ops.started == [rq]
    complete_all(rig, ops)
    c = q.dd.counters()
    assert (c["inserted"], c["dispatched"], c["completed"]) == (1, 2, 1)
    clean(rig)


def test_no_sched_set_takes_none_and_declares_no_elevator_data(make):
    rig, ops = make(flags=BlkMqFlag.NO_SCHED)
    q = rig.mq.queues[0]
    assert q.dd is None and q.elevator() == elv.ELV_NONE
    rig.mq.submit_bio(q, READ, 800, 8, 1)
    assert ops.calls == 1  # issued directly, as with none
    complete_all(rig, ops)


def test_none_queue_issues_directly_and_never_touches_the_elevator(make):
    rig, ops = make(elevator="none")
    q = rig.mq.queues[0]
    rig.mq.submit_bio(q, READ, 800, 8, 1)
    assert ops.calls == 1 and not ops.started[0].rq_flags & Rqf.ELV
    complete_all(rig, ops)
    assert q.dd.counters()["inserted"] == 0
    clean(rig)


def test_switch_requires_an_empty_elevator_and_resets_the_knobs(make):
    rig, ops = make()
    q = rig.mq.queues[0]
    elv.store_iosched(q, "fifo_batch", "3")
    assert elv.elevator_switch(q, "none", 8) == "mq-deadline"
    assert q.elevator() == elv.ELV_NONE
    rig.mq.submit_bio(q, READ, 800, 8, 1)
    assert ops.calls == 1  # direct issue now
    complete_all(rig, ops)
    assert elv.elevator_switch(q, "mq-deadline", 8) == "none"
    assert q.dd.show_knob("fifo_batch") == "16\n"
    assert q.dd.show_knob("async_depth") == "6\n"
    rig.mq.submit_bio(q, READ, 800, 8, 1)
    assert ops.calls == 1
    rig.sys.run_kblockd()
    complete_all(rig, ops)
    clean(rig)


def test_two_hctxs_share_the_queue_elevator(make):
    rig, ops = make(nr_cpus=2, nr_hw_queues=2, depth=8)
    q0 = rig.mqs[0].queues[0]
    q1 = rig.mqs[1].queues[0]
    rig.mqs[0].submit_bio(q0, READ, 800, 8, 1)
    rig.mqs[1].submit_bio(q1, READ, 80, 8, 1)
    # one run (CPU 0's hctx) dispatches both, each on its own hctx, oldest first
    rig.cpus[0].run_kblockd()
    assert [(rq.setup()[1], rq.setup()[6]) for rq in ops.started] == [(800, 0), (80, 1)]
    while ops.started:
        rig.mqs[0].end_request(ops.started.pop(0), BlkStatus.OK)
    assert q0.dd.counters()["completed"] == 2
    clean(rig)


@pytest.mark.parametrize("seed", range(8))
def test_block_layer_dispatch_order_is_the_models(make, seed):
    """Bios submitted through the block layer at stepped times, hw queue runs now and
    then: the order the driver gets requests in is the model's (tests/dd_model.py),
    with expiries, write starvation and batches in play."""
    rnd = random.Random(seed)
    rig, ops = make(depth=64)
    mq = rig.mq
    q = mq.queues[0]
    t = [10**12]
    mq.clock = lambda: t[0]
    model = DdModel(64)
    knobs = {"read_expire": 2, "write_expire": 6, "writes_starved": 1, "fifo_batch": 3}
    for name, value in knobs.items():
        elv.store_iosched(q, name, str(value))
        model.store(name, value)
    sectors = rnd.sample(range(1 << 16), 300)
    got: list[int] = []
    want: list[int] = []

    def run_and_complete() -> None:
        rig.sys.run_kblockd()
        got.extend(rq.setup()[1] for rq in ops.started)
        while model.has_work():
            want.append(model.dispatch(t[0]))
        for sector in want[len(want) - len(ops.started) :]:
            model.finish(sector)
        complete_all(rig, ops)

    outstanding = 0
    for k in sectors:
        t[0] += rnd.randrange(0, 1_500_000)
        op = rnd.choice((READ, READ, WRITE))
        sector = 64 * k  # 8 sectors each: never adjacent, no merges; the model's key
        mq.submit_bio(q, op, sector, 8, t[0])
        model.insert(sector, op, sector, 8, False, t[0])
        outstanding += 1
        if outstanding >= 40 or rnd.random() < 0.3:
            run_and_complete()
            outstanding = 0
    run_and_complete()
    assert len(got) == 300 and got == want
    assert q.dd.counters()["completed"] == model.completed == 300
    clean(rig)


def test_nr_active_counts_the_requests_of_each_queue_on_a_shared_set(make):
    """TAG_QUEUE_SHARED: a request holds its driver tag from allocation, so it counts
    in its hctx's nr_active (RQF_MQ_INFLIGHT) while it waits in the elevator, and
    its end gives it back."""
    rig, ops = make(depth=16, nr_queues=2)
    q0, q1 = rig.mq.queues
    assert q0.shared and q1.shared
    rig.mq.submit_bio(q0, READ, 800, 8, 1)
    rig.mq.submit_bio(q0, READ, 1600, 8, 1)
    rig.mq.submit_bio(q1, READ, 800, 8, 1)
    assert (q0.hctxs[0].nr_active, q1.hctxs[0].nr_active) == (2, 1)
    assert ops.calls == 0  # all three still in their queue's elevator
    rig.sys.run_kblockd()
    assert len(ops.started) == 3
    assert all(rq.rq_flags & Rqf.MQ_INFLIGHT for rq in ops.started)
    complete_all(rig, ops)
    assert (q0.hctxs[0].nr_active, q1.hctxs[0].nr_active) == (0, 0)
    assert q0.dd.counters()["completed"] == 2 and q1.dd.counters()["completed"] == 1
    clean(rig)


def test_nr_requests_write_updates_async_depth_and_the_tags_min_shallow_depth(make):
    rig, _ops = make(depth=64)
    q = rig.mq.queues[0]
    tags = q.hctxs[0].tags
    assert q.dd.show_knob("async_depth") == "48\n" and tags.bitmap_tags.min_shallow_depth == 48
    rig.mq.update_nr_requests(0, 8)  # blk_mq_update_nr_requests(): dd_depth_updated()
    assert q.dd.show_knob("async_depth") == "6\n" and tags.bitmap_tags.min_shallow_depth == 6
    assert rig.mq.alloc_request(q, WRITE, 0, 8, 1, nowait=True) >= 0

"""The busy tag iterators (blk_mq_queue_tag_busy_iter, blk_mq_tagset_busy_iter):
which requests they visit and at which generation, step by step in one process, and
in real runs where the timeout work and nvme's reset cancel go through them."""

from __future__ import annotations

import pytest

from mqrt.block.blk_mq_setup import alloc_tag_set, init_queue
from mqrt.block.blk_mq_structs import RQ_ALLOCATED, RQ_GEN_SHIFT, RQ_STATE_MASK, TagSet
from mqrt.block.blk_mq_tag import queue_tag_busy_iter, tagset_busy_iter
from mqrt.block.blk_mq_types import ReqOp, RqState
from tests.helpers import scripted_rigs
from tests.test_runtime import assert_clean, run_nullb, totals

pytestmark = pytest.mark.timing

READ = int(ReqOp.READ)


def setup_for(ops, depth=8, reserved=0, nr_queues=1, nr_hw_queues=1):
    def setup(layout, topology):
        tset = TagSet(ops=ops, nr_hw_queues=nr_hw_queues, queue_depth=depth,
                      reserved_tags=reserved)  # fmt: skip
        alloc_tag_set(tset, layout, topology)
        return ops, [init_queue(tset, layout, f"q{i}") for i in range(nr_queues)]

    return setup


@pytest.fixture
def make():
    with scripted_rigs(setup_for) as m:
        yield m


def visits(mq, q, started_only):
    """(request id, MQ_RQ_* state, generation) of every visit, in order."""
    seen = []

    def fn(rq, st):
        seen.append((rq.id, RqState(st & RQ_STATE_MASK), st >> RQ_GEN_SHIFT))
        return True

    hctx_tags = [h.tags for h in mq.queues[q].hctxs]
    if started_only:
        tagset_busy_iter(hctx_tags, mq.rqs[q], fn)
    else:
        queue_tag_busy_iter(hctx_tags, mq.rqs[q], fn, lambda rq: rq.q == q)
    return seen


def test_every_busy_tag_once_in_tag_order_at_its_generation(make):
    rig, ops = make(depth=5)
    mq = rig.mq
    for i in range(5):
        mq.submit_bio(mq.queues[0], READ, i * 64, 8, 0)
    started = sorted(ops.started, key=lambda rq: rq.tag)  # the walk goes in tag order
    assert [rq.tag for rq in started] == [0, 1, 2, 3, 4]  # every tag
    # end two of them: their tags go back and their generations move on
    mq.end_request(started[1])
    mq.end_request(started[3])
    got = visits(mq, 0, started_only=True)
    assert [g[0] for g in got] == [started[i].id for i in (0, 2, 4)]
    assert all(state is RqState.IN_FLIGHT and gen == 0 for _id, state, gen in got)
    # take both tags again (the only ones free): the same requests, a generation later
    mq.submit_bio(mq.queues[0], READ, 1000, 8, 0)
    mq.submit_bio(mq.queues[0], READ, 2000, 8, 0)
    assert {rq.id for rq in ops.started[5:]} == {started[1].id, started[3].id}
    got = visits(mq, 0, started_only=True)
    assert [(g[0], g[2]) for g in got] == [
        (rq.id, int(i in (1, 3))) for i, rq in enumerate(started)
    ]
    for rq in started:
        mq.end_request(rq)
    assert visits(mq, 0, started_only=False) == []


def test_started_only_skips_owned_requests_the_driver_has_not_started(make):
    rig, _ops = make(depth=8)
    mq = rig.mq
    rid = mq.alloc_request(mq.queues[0], READ, 0, 8, 0)  # owned, not yet issued: IDLE
    rq = mq.rqs[0][rid]
    assert rq.state_word & RQ_ALLOCATED and rq.state is RqState.IDLE
    assert visits(mq, 0, started_only=True) == []
    assert visits(mq, 0, started_only=False) == [(rid, RqState.IDLE, 0)]
    mq.start_request(rq)
    assert visits(mq, 0, started_only=True) == [(rid, RqState.IN_FLIGHT, 0)]
    assert mq.complete_request(rq, 0)  # COMPLETE still counts as started
    assert visits(mq, 0, started_only=True) == [(rid, RqState.COMPLETE, 0)]
    rig.sys.run_softirqs()
    assert visits(mq, 0, started_only=False) == []


def test_reserved_tags_first_and_a_false_stops_the_walk(make):
    rig, ops = make(depth=8, reserved=2)
    mq = rig.mq
    tags = mq.queues[0].hctxs[0].tags
    for i in range(3):
        mq.submit_bio(mq.queues[0], READ, i * 64, 8, 0)
    normal = sorted(rq.tag for rq in ops.started)
    assert all(t >= 2 for t in normal)  # normal tags follow the reserved ones
    rid = mq.alloc_request(mq.queues[0], READ, 2000, 8, 0, reserved=True)
    res = mq.rqs[0][rid]
    assert res.tag in (0, 1)
    mq.start_request(res)
    got = visits(mq, 0, started_only=True)
    assert [mq.rqs[0][i].tag for i, _s, _g in got] == [res.tag, *normal]
    seen = []
    assert not tags.busy_iter(mq.rqs[0], lambda rq, st: seen.append(rq.tag) or len(seen) < 2)
    assert seen == [res.tag, normal[0]]


def test_queue_iter_visits_only_its_queue_on_a_shared_tag_set(make):
    rig, ops = make(depth=8, nr_queues=2)
    mq = rig.mq
    mq.submit_bio(mq.queues[0], READ, 0, 8, 0)
    mq.submit_bio(mq.queues[1], READ, 0, 8, 0)
    mq.submit_bio(mq.queues[0], READ, 64, 8, 0)
    by_tag = sorted(ops.started, key=lambda rq: rq.tag)
    q0 = [rq.id for rq in by_tag if rq.q == 0]
    q1 = [rq.id for rq in by_tag if rq.q == 1]
    assert (len(q0), len(q1)) == (2, 1)
    assert [g[0] for g in visits(mq, 0, started_only=False)] == q0
    assert [g[0] for g in visits(mq, 1, started_only=False)] == q1
    assert [g[0] for g in visits(mq, 0, started_only=True)] == [rq.id for rq in by_tag]
    for rq in list(ops.started):
        mq.end_request(rq)


def test_a_real_run_times_out_exactly_the_injected_requests():
    # 2 CPUs on one queue; 7 requests (exactly: the fault's budget) are never
    # completed by null_blk: the timeout work, walking the busy tags, finds each of
    # them once and ends it with BLK_STS_TIMEOUT, while the others complete.  The
    # timeout is long enough that a saturated host does not keep a CPU from
    # completing an ordinary request for that long.
    result = run_nullb(cpus=2, irqmode="timer", completion_nsec=20_000, iodepth=8,
                       timeout="1,30,0,7", io_timeout=1000, runtime=0.8)  # fmt: skip
    assert_clean(result)
    t = totals(result)
    assert (t["timeouts"], t["errors"]) == (7, 7)
    assert t["bios"] == t["submitted"]


def test_a_real_nvme_reset_cancels_through_the_tagset_iterator():
    from tests.test_nvme import device, driver, run_nvme

    # every command the controller held at a reset (2 CPUs, 2 I/O queues: two tags
    # of the set) is cancelled once and retried, and nothing is left owned.
    result = run_nvme(fatal_error=0.2, io_timeout=30, latency_ns=20_000, runtime=0.6)
    assert_clean(result)
    dev, drv, t = device(result), driver(result), totals(result)
    assert drv["resets"] > 0 and drv["cancelled"] > 0
    assert dev["commands"] >= t["requests"]
    assert t["ios"] == t["requests"]

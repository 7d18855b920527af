"""Freeze and quiesce step by step in one process (mqrt.testing): the references
q_usage_counter holds, what a frozen or quiesced queue lets through, and the
transitions' nesting.  The same transitions under load, across processes, are in
tests/test_transitions.py."""

from __future__ import annotations

import pytest

from mqrt.block import blk_mq_freeze as freeze
from mqrt.block.blk_mq_types import BlkStatus, ReqOp
from mqrt.lib import rcu
from mqrt.lib.wait import WaitEvent
from tests.helpers import scripted_rigs
from tests.test_blk_mq import clean, script_setup

READ = int(ReqOp.READ)


@pytest.fixture
def rig_factory():
    with scripted_rigs(script_setup) as make:
        yield make


def run_until_wait(task) -> WaitEvent | None:
    """Run a transition until it sleeps (the event it sleeps on) or ends (None)."""
    try:
        return next(task)
    except StopIteration:
        return None


def test_every_request_holds_a_reference_and_merged_bios_give_theirs_back(rig_factory):
    rig, ops = rig_factory()
    mq = rig.mq
    q = mq.queues[0]
    mq.start_plug(4)
    mq.submit_bios(q, [READ] * 4, [0, 8, 800, 808], [8, 8, 8, 8], False)
    # two requests (each of two merged bios) in the plug: two references and the queue's own
    assert q.q_usage.outstanding() == 1 + 2
    mq.finish_plug()
    assert len(ops.started) == 2
    for rq in ops.started:
        mq.end_request(rq, BlkStatus.OK)
    assert q.q_usage.outstanding() == 1
    clean(rig)


def test_freeze_waits_for_requests_in_flight_and_blocks_new_ones(rig_factory):
    rig, ops = rig_factory()
    mq = rig.mq
    q = mq.queues[0]
    for i in range(5):
        mq.submit_bio(q, READ, 1000 * i, 8, 0)
    assert len(ops.started) == 5
    assert run_until_wait(freeze.freeze_queue_start(mq, q)) is None  # the grace period
    assert freeze.frozen(mq, q)
    wait = freeze.freeze_queue_wait(q)
    event = run_until_wait(wait)
    assert event is not None and event.head == q.freeze_wq_head and not event.cond()
    # no new reference while frozen: a NOWAIT allocation fails, and leaves nothing held
    assert mq.alloc_request(q, READ, 0, 8, 0, nowait=True) == -1
    assert q.q_usage.outstanding() == 5
    for n, rq in enumerate(list(ops.started), 1):
        mq.end_request(rq, BlkStatus.OK)
        assert event.cond() == (n == 5)
    assert run_until_wait(wait) is None
    freeze.unfreeze_queue(mq, q)
    assert not freeze.frozen(mq, q)
    mq.submit_bio(q, READ, 0, 8, 0)
    assert len(ops.started) == 6
    mq.end_request(ops.started[-1], BlkStatus.OK)
    assert q.q_usage.outstanding() == 1
    clean(rig)


def test_a_freeze_closed_during_its_grace_period_leaves_the_queue_live(rig_factory):
    rig, ops = rig_factory()
    mq = rig.mq
    q = mq.queues[0]
    mq.submit_bio(q, READ, 0, 8, 0)
    rcu.reader.lock()  # this CPU is inside a read-side section: the grace period waits
    try:
        start = freeze.freeze_queue_start(mq, q)
        assert run_until_wait(start) is not None
        assert freeze.frozen(mq, q) and q.q_usage.is_dying()
        assert not q.q_usage.tryget_live()
        start.close()  # a stop, mid grace period
    finally:
        rcu.reader.unlock()
    assert not freeze.frozen(mq, q) and not q.q_usage.is_dying()
    assert q.q_usage.outstanding() == 1 + 1  # the request in flight kept its reference
    mq.submit_bio(q, READ, 800, 8, 0)
    for rq in list(ops.started):
        mq.end_request(rq, BlkStatus.OK)
    assert q.q_usage.outstanding() == 1
    assert run_until_wait(freeze.freeze_queue(mq, q)) is None  # a later freeze completes
    assert q.q_usage.is_zero()
    freeze.unfreeze_queue(mq, q)
    clean(rig)


def test_freeze_nests_and_unfreeze_of_a_live_queue_is_refused(rig_factory):
    rig, _ops = rig_factory()
    mq = rig.mq
    q = mq.queues[0]
    for _ in range(2):
        assert run_until_wait(freeze.freeze_queue(mq, q)) is None  # nothing in flight
    freeze.unfreeze_queue(mq, q)
    assert freeze.frozen(mq, q) and mq.alloc_request(q, READ, 0, 8, 0, nowait=True) == -1
    freeze.unfreeze_queue(mq, q)
    with pytest.raises(RuntimeError, match="not frozen"):
        freeze.unfreeze_queue(mq, q)
    rq = mq.alloc_request(q, READ, 0, 8, 0, nowait=True)
    assert rq >= 0
    mq.end_request(mq.rqs[0][rq], BlkStatus.OK)
    clean(rig)


def test_quiesced_queue_dispatches_nothing_until_unquiesced(rig_factory):
    rig, ops = rig_factory()
    mq = rig.mq
    q = mq.queues[0]
    assert run_until_wait(freeze.quiesce_queue(mq, q)) is None
    assert q.quiesced()
    for i in range(3):
        mq.submit_bio(q, READ, 1000 * i, 8, 0)
    assert ops.calls == 0  # queued on the ctx list, no ->queue_rq
    mq.run_hw_queues(q, False)
    assert ops.calls == 0
    freeze.unquiesce_queue(mq, q)
    assert not q.quiesced()
    rig.sys.run_kblockd()  # the unquiesce runs the hw queues asynchronously
    assert ops.calls == 3
    for rq in ops.started:
        mq.end_request(rq, BlkStatus.OK)
    clean(rig)


def test_quiesce_tagset_quiesces_every_queue_of_the_set(rig_factory):
    rig, ops = rig_factory(nr_queues=2)
    mq = rig.mq
    queues = freeze.tagset_queues(mq, mq.queues[0])
    assert len(queues) == 2
    assert run_until_wait(freeze.quiesce_tagset(mq, queues)) is None
    assert all(q.quiesced() for q in mq.queues)
    mq.submit_bio(mq.queues[1], READ, 0, 8, 0)
    assert ops.calls == 0
    freeze.unquiesce_tagset(mq, queues)
    rig.sys.run_kblockd()
    assert ops.calls == 1
    mq.end_request(ops.started[0], BlkStatus.OK)
    clean(rig)

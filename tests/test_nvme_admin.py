"""The nvme driver's admin queue, its timeout handling and its resets, against a real
controller process: the admin tag set, bounded Aborts, nvme_timeout's order and
states, nvme_dev_disable's queue deletion and nvme_reset_work's identify.

Two ways to drive it: a whole run (``run_nvme``: real CPU workers), or :func:`nvme_rig`:
the driver on one emulated CPU in this process (the real block layer, stepped by hand)
in front of a real controller, where a test calls ``->timeout`` itself and waits for
the controller's answer by looking at shared memory, never by sleeping; the
controller's own counters are its final report, read once it has stopped."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pytest

from mqrt.block.blk_mq_debugfs import check_invariants
from mqrt.block.blk_mq_structs import Request
from mqrt.block.blk_mq_types import BlkMqFlag, EhRet, RqState
from mqrt.block.blk_settings import blk_set_default_limits
from mqrt.device import nvme
from mqrt.device.nvme import NvmeOps
from mqrt.device.nvme_core import END_WAIT
from mqrt.device.nvme_defs import (
    NVME_ADMIN_TIMEOUT_MS,
    NVME_AQ_DEPTH,
    NVME_AQ_MQ_TAG_DEPTH,
    NVME_NR_AEN_COMMANDS,
    NVME_SC_DNR,
    AdminOpcode,
    CtrlState,
    Status,
)
from mqrt.lib import wire
from mqrt.runtime.children import reap, recv, send
from mqrt.testing import Rig
from tests.helpers import wait_until
from tests.test_nvme import device, driver, run_nvme
from tests.test_runtime import assert_clean, totals

#: How long a test waits for the controller process to answer (only reached on a bug).
ANSWER_S = 20.0


@contextlib.contextmanager
def nvme_rig(
    io_timeout: int = 30_000, nr_cpus: int = 1, **given
) -> Iterator[tuple[Rig, NvmeOps, dict[str, int]]]:
    """The nvme driver bound to CPU 0 of a :class:`~mqrt.testing.Rig` (one emulated
    CPU, its softirqs run by hand), in front of a real controller process, probed.
    ``nr_cpus`` > 1: a topology of that many CPUs, so one I/O queue pair (and vector)
    per CPU, with only CPU 0's block layer made.  The dict is filled with the
    controller's counters when it has stopped."""
    cfg = nvme.parse_config(given)
    rig = Rig(
        lambda layout, topology: nvme.setup(cfg, layout, topology, timeout_ms=io_timeout),
        nr_cpus=nr_cpus,
        on_cpus=[0],
    )
    ops: NvmeOps = rig.ops  # type: ignore[assignment]
    fds = ops.make_fds()
    dev = None
    final: dict[str, int] = {}
    try:
        ops.bind(rig.arena, rig.mq, 0)  # again, now that the pipes and the eventfd exist
        dev = ops.start_device(rig.arena, None)
        assert isinstance(recv(dev.res), wire.Ready)
        ops.probe(rig.arena)
        yield rig, ops, final
    finally:
        if dev is not None:
            ops.shutdown(rig.arena)
            send(dev.ctl, wire.Exit())
            msg = recv(dev.res)
            if isinstance(msg, wire.DeviceResult):
                final.update(msg.counters)
            reap([dev.process])
            dev.ctl.close()
            dev.res.close()
        if ops.admin is not None:
            ops.admin.mq.close()
        for fd in fds:
            os.close(fd)
        rig.close()


def submit(rig: Rig) -> Request:
    """One 4 KiB read issued on CPU 0 of the rig: its request (in flight)."""
    mq = rig.mq
    queue = mq.queues[0]
    rq_id = mq.alloc_request(queue, 0, 0, 8, time.monotonic_ns())
    mq.try_issue_directly(queue, queue.hctx_by_op[0], rq_id)
    rq = mq.rqs[0][rq_id]
    assert rq.state == RqState.IN_FLIGHT
    return rq


def state(ops: NvmeOps, rig: Rig) -> CtrlState:
    return CtrlState(rig.arena.atomic.read32(ops.regs.offsets().ctrl_state))  # type: ignore[union-attr]


def abort_limit(ops: NvmeOps, rig: Rig) -> int:
    return rig.arena.atomic.read32(ops.regs.offsets().abort_limit)  # type: ignore[union-attr]


def device_idle(ops: NvmeOps, rig: Rig) -> bool:
    """Wait until the device workers, having fetched every I/O SQ up to its tail
    doorbell, ask to be kicked at the next entry (each SQ's event index is its tail):
    what was submitted before has been fetched."""
    a = rig.arena.atomic
    words = [q.o for q in ops.nvmeqs[1:]]

    def armed() -> bool:
        return all(
            a.read32(o.sq_event_idx) == a.read32(o.sq_tail_db) for o in words if a.read32(o.created)
        )

    return wait_until(armed, ANSWER_S)


def reap_admin_until(ops: NvmeOps, done) -> bool:
    """Reap the admin CQ (as CPU 0's vector would) until ``done()``."""
    return wait_until(lambda: (ops._reap_admin(), done())[1], ANSWER_S)


# -- the admin tag set -----------------------------------------------------------------------


def test_the_admin_tag_set_is_the_seeds_and_the_probe_went_through_it():
    """nvme_pci_alloc_admin_tag_set(): "set->nr_hw_queues = 1; set->queue_depth =
    NVME_AQ_MQ_TAG_DEPTH; set->timeout = NVME_ADMIN_TIMEOUT; ... set->flags =
    BLK_MQ_F_NO_SCHED", then "dev->ctrl.admin_q = blk_mq_init_queue(set)".  Every
    admin command of the probe took a request of that set and gave it back."""
    with nvme_rig() as (rig, ops, dev):
        tset = ops.admin_tagset
        assert tset is not None and ops.admin_q is not None
        assert tset.nr_hw_queues == 1
        assert tset.queue_depth == NVME_AQ_MQ_TAG_DEPTH == NVME_AQ_DEPTH - NVME_NR_AEN_COMMANDS - 1
        assert tset.timeout_ms == NVME_ADMIN_TIMEOUT_MS
        assert tset.flags & BlkMqFlag.NO_SCHED
        assert ops.admin_q.tag_set is tset and ops.admin_q.nr_hw_queues == 1
        used = sum(rq.gen for rq in ops.admin.rqs)  # type: ignore[union-attr]
        inv = check_invariants(rig.arena, [ops.admin_q])
        assert inv["leaked_tags"] == 0 and inv["owned_requests"] == 0, inv
    # each command the controller fetched used one request once (its generation + 1)
    assert used == dev["admin_commands"] > 0


def test_the_set_up_ops_point_every_hctx_and_iod_at_its_nvme_queue():
    """nvme_init_hctx(): "struct nvme_queue *nvmeq = &dev->queues[hctx_idx + 1];
    hctx->driver_data = nvmeq"; nvme_admin_init_hctx(): "nvmeq = &dev->queues[0]";
    nvme_pci_init_request(): "int queue_idx = (set == &dev->tagset) ? hctx_idx + 1 :
    0; ... iod->nvmeq = nvmeq".  The I/O hctxs (poll ones too) drive I/O queues 1..,
    admin_q's one hctx the admin queue; every request's iod names its queue, the
    admin requests' queue 0, which is what nvme_timeout() reads.  admin_q's id is 0
    in its own id space, and the namespaces keep ids 0.. for the CPUs' tables."""
    cfg = nvme.parse_config({"poll_queues": 1, "nr_namespaces": 2})
    rig = Rig(lambda layout, topology: nvme.setup(cfg, layout, topology), nr_cpus=2)
    ops: NvmeOps = rig.ops  # type: ignore[assignment]
    try:
        assert [q.index for q in rig.queues] == [0, 1]
        assert ops.admin_q is not None and ops.admin_q.index == 0
        tset, admin_set = rig.queues[0].tag_set, ops.admin_tagset
        assert tset is ops.tagset and tset.driver_data is ops
        assert admin_set is not None and admin_set.driver_data is ops
        for q in rig.queues:
            assert [h.driver_data for h in q.hctxs] == ops.nvmeqs[1:]
        assert [h.driver_data for h in rig.mq.queues[0].hctxs] == ops.nvmeqs[1:]
        assert [h.driver_data for h in ops.admin_q.hctxs] == [ops.nvmeqs[0]]
        depth = tset.queue_depth
        pool = rig.mq.rqs[0]
        for rq in pool[: tset.rq_region.count]:
            assert nvme._IOD_QID.unpack_from(rq.pdu, nvme._QID)[0] == rq.id // depth + 1  # type: ignore[arg-type]
        for q in rig.queues:  # each namespace's sched pool: its hctx's I/O queue too
            for i in range(q.sched_region.count):
                rq = pool[q.sched_rq_first + i]
                want = i // q.nr_sched_rqs + 1
                assert nvme._IOD_QID.unpack_from(rq.pdu, nvme._QID)[0] == want  # type: ignore[arg-type]
        for rq in ops.admin.rqs:  # type: ignore[union-attr]
            assert nvme._IOD_QID.unpack_from(rq.pdu, nvme._QID)[0] == 0  # type: ignore[arg-type]
    finally:
        if ops.admin is not None:
            ops.admin.mq.close()
        rig.close()


def test_admin_commands_beyond_the_admin_tags_are_refused_not_written():
    """The admin SQ holds NVME_AQ_DEPTH entries; "Subtract one to leave an empty queue
    entry for 'Full Queue' condition" (NVME_AQ_MQ_TAG_DEPTH): with every admin tag
    taken, a NOWAIT allocation (nvme_timeout's "BLK_MQ_REQ_NOWAIT") fails and nothing
    reaches the SQ, where before the 33rd command overwrote the first."""
    with nvme_rig() as (_rig, ops, dev):
        admin = ops.admin
        assert admin is not None
        held = [admin.alloc((AdminOpcode.IDENTIFY, 0, 1, 0, ops.data.offset)) for _ in range(40)]  # type: ignore[union-attr]
        got = [rq for rq in held if rq is not None]
        assert len(got) == NVME_AQ_MQ_TAG_DEPTH < NVME_AQ_DEPTH - 1
        for rq in got:  # all at once into the admin SQ: it has room for them all
            assert admin.execute_nowait(rq) == 0
        assert reap_admin_until(ops, lambda: all(rq.state == RqState.COMPLETE for rq in got))
        assert all(rq.status == Status.SUCCESS for rq in got)
        for rq in got:
            admin.mq.end_request(rq, 0)
    assert dev["identify_ctrl"] == 1 + NVME_AQ_MQ_TAG_DEPTH and dev["admin_errors"] == 0


# -- bounded Aborts ----------------------------------------------------------------------------


def test_the_controller_refuses_aborts_beyond_its_abort_command_limit():
    """NVMe Base Specification, Abort: the controller completes an Abort with "Abort
    Command Limit Exceeded" when "the number of concurrently outstanding Abort commands
    has exceeded the limit indicated in the Identify Controller data structure" (ACL,
    0's based).  The Aborts here bypass the driver's limit; the controller holds every
    Abort it takes (drop_abort), so the (ACL + 2)th is one too many."""
    with nvme_rig(acl=1, drop_abort=100) as (_rig, ops, dev):
        admin = ops.admin
        assert admin is not None
        rqs = []
        for _ in range(3):
            rq = admin.alloc((AdminOpcode.ABORT, 0, 1 | 0x7 << 16), END_WAIT)
            assert rq is not None and admin.execute_nowait(rq) == 0
            rqs.append(rq)
        assert reap_admin_until(ops, lambda: rqs[2].state == RqState.COMPLETE)
        assert rqs[2].status == Status.ABORT_LIMIT
        assert [rq.state for rq in rqs[:2]] == [RqState.IN_FLIGHT] * 2  # held: outstanding
    assert dev["abort_cmds"] == 3 and dev["abort_limit_exceeded"] == 1


def test_at_most_acl_plus_one_aborts_are_outstanding_then_a_second_timeout_resets():
    """core.c nvme_init_identify(): "atomic_set(&ctrl->abort_limit, id->acl + 1)";
    pci.c nvme_timeout(): "if (atomic_dec_return(&dev->ctrl.abort_limit) < 0) {
    atomic_inc(...); return BLK_EH_RESET_TIMER; } iod->aborted = 1;", abort_endio()
    gives it back, and "if (!nvmeq->qid || iod->aborted)" the next timeout resets the
    controller.  Commands the controller takes and never completes (drop_completion),
    so their Aborts find nothing to abort."""
    with nvme_rig(acl=1, drop_completion=100, latency_ns=0) as (rig, ops, dev):
        assert abort_limit(ops, rig) == 2
        rqs = [submit(rig) for _ in range(3)]
        assert device_idle(ops, rig)  # it fetched them (and, at zero latency, lost them)
        verdicts = [ops.timeout(rig.mq, rq, rq.gen) for rq in rqs]
        assert verdicts == [EhRet.RESET_TIMER] * 3
        assert ops.stats["aborts_sent"] == 2 and ops.stats["abort_limited"] == 1
        assert [rq.pdu[1] for rq in rqs] == [1, 1, 0]  # iod->aborted  # type: ignore[index]
        assert abort_limit(ops, rig) == 0
        # abort_endio(): both Aborts complete ("not aborted": the commands were lost)
        assert reap_admin_until(ops, lambda: ops.stats["abort_completions"] == 2)
        assert abort_limit(ops, rig) == 2
        # the third one may have its Abort now
        assert ops.timeout(rig.mq, rqs[2], rqs[2].gen) == EhRet.RESET_TIMER
        assert ops.stats["aborts_sent"] == 3
        # the first one times out again after its Abort: reset, which cancels everything
        assert ops.timeout(rig.mq, rqs[0], rqs[0].gen) == EhRet.DONE
        assert ops.stats["resets"] == 1 and state(ops, rig) == CtrlState.LIVE
        assert all(rq.state == RqState.COMPLETE for rq in rqs)
        assert {rq.status for rq in rqs} == {Status.HOST_ABORTED_CMD}  # no DNR: retried
        assert abort_limit(ops, rig) == 2  # identified again
    assert dev["abort_cmds"] == 3 and dev["abort_limit_exceeded"] == 0
    assert dev["sq_deletes"] == dev["cq_deletes"] == 1 and dev["identify_ctrl"] == 2


def test_bounded_aborts_under_a_storm_of_timeouts():
    """The scenario where unbounded Aborts overran the admin SQ: every command held
    300 ms against a 50 ms timeout, 500 deep on each CPU.  nvme_timeout() keeps at
    most abort_limit (ACL + 1) Aborts outstanding and re-arms the others'
    timers: the controller fetches every Abort the driver sent, never more than the
    limit in one look at its admin SQ, and refuses none."""
    result = run_nvme(delay_pct=100, delay_ns=300_000_000, io_timeout=50, iodepth=500, runtime=0.5)
    assert_clean(result)
    dev, drv = device(result), driver(result)
    assert drv["aborts_sent"] > 0 and drv["abort_limited"] > 0  # the limit was reached
    assert dev["abort_cmds"] == drv["aborts_sent"]  # none overwritten: all fetched
    assert drv["abort_completions"] == drv["aborts_sent"]
    assert dev["abort_burst_max"] <= result.device["acl"] + 1
    assert dev["abort_limit_exceeded"] == 0 and dev["admin_errors"] == 0


def test_with_every_command_in_service_bounded_aborts_leave_few_resets():
    """The same storm on a controller that takes every command into service (channels
    >= the commands in flight, as an SSD's internal queue would): each Abort finds its
    command and completes it (ABORT_REQ, retried), so a command rarely times out again
    after its Abort, and the controller is rarely reset (every overwritten Abort used
    to end in one)."""
    result = run_nvme(
        delay_pct=100, delay_ns=300_000_000, io_timeout=50, iodepth=500, runtime=0.5,
        channels=1024,
    )  # fmt: skip
    assert_clean(result)
    dev, drv = device(result), driver(result)
    assert dev["abort_cmds"] == drv["aborts_sent"] > 0
    assert dev["aborts"] * 2 >= drv["aborts_sent"]  # most Aborts found their command
    # a reset takes a command that timed out again after its Abort: one the Abort
    # did not find, or whose ABORT_REQ completion a loaded host reaped too late
    assert drv["resets"] <= max(2, drv["aborts_sent"] // 20), (drv, dev)


# -- nvme_timeout's order and states -----------------------------------------------------------


def test_a_failed_controller_is_reset_before_anything_else():
    """nvme_timeout(): "Reset immediately if the controller is failed" --
    nvme_should_reset() (CSTS.CFS, no reset under way) comes before polling the CQ and
    before any Abort; nvme_dev_disable() on a dead controller ("csts & NVME_CSTS_CFS")
    deletes no queue."""
    with nvme_rig(fatal_error=100) as (rig, ops, dev):
        cfs = ops.regs.offsets().csts_cfs  # type: ignore[union-attr]
        rq = submit(rig)
        assert wait_until(lambda: rig.arena.atomic.read32(cfs) == 1, ANSWER_S)
        assert ops.timeout(rig.mq, rq, rq.gen) == EhRet.DONE
        assert ops.stats["resets_cfs"] == ops.stats["resets"] == 1
        assert ops.stats["aborts_sent"] == ops.stats["completion_polled"] == 0
        assert rq.state == RqState.COMPLETE and rq.status == Status.HOST_ABORTED_CMD
        assert rig.arena.atomic.read32(cfs) == 0 and state(ops, rig) == CtrlState.LIVE
    assert dev["fatal_errors"] == 1 and dev["identify_ctrl"] == 2
    assert dev["sq_deletes"] == dev["cq_deletes"] == 0


def test_fatal_errors_during_a_run_each_cost_one_reset_and_no_abort():
    """nvme_timeout() with the controller failing now and then (fatal_error): every
    fatal error is found by a timeout and reset at once ("controller is down; will
    reset"), no Abort is sent to a failed controller, and nvme_reset_work() identifies
    it again each time."""
    result = run_nvme(fatal_error=0.2, io_timeout=200, latency_ns=20_000, runtime=0.6)
    assert_clean(result)
    dev, drv, t = device(result), driver(result), totals(result)
    assert dev["fatal_errors"] > 0
    assert drv["resets_cfs"] == drv["resets"] == dev["fatal_errors"]
    assert drv["aborts_sent"] == 0 and dev["sq_deletes"] == 0
    assert dev["identify_ctrl"] == 1 + drv["resets"]
    assert t["requeued"] == drv["retries"] and t["ios"] == t["requests"]


def test_a_completion_already_in_the_cq_is_polled_even_during_a_reset():
    """nvme_timeout(): "Did we miss an interrupt?" -- the CQ is polled, and a command
    found complete is "completion polled", before the controller state is looked at:
    while another CPU resets the controller, a completion whose interrupt was lost
    still ends its command at once."""
    with nvme_rig(lost_irq=100, latency_ns=10_000) as (rig, ops, _dev):
        rq = submit(rig)
        assert wait_until(ops.nvmeqs[1].cqe_pending, ANSWER_S)
        gen = rq.gen
        rig.arena.atomic.set32(ops._ctrl_state, CtrlState.RESETTING)
        assert ops.timeout(rig.mq, rq, gen) == EhRet.DONE
        assert ops.stats["completion_polled"] == 1
        assert rq.gen == gen + 1 and rq.state == RqState.IDLE  # ended (completion batch)
        assert len(rig.sys.done) == 1 and rig.sys.done[0][2][5] == 0  # its bio, no error
        rig.arena.atomic.set32(ops._ctrl_state, CtrlState.LIVE)


@pytest.mark.parametrize(
    ("ctrl", "verdict", "after"),
    [
        (CtrlState.RESETTING, EhRet.RESET_TIMER, CtrlState.RESETTING),
        (CtrlState.CONNECTING, EhRet.DONE, CtrlState.DELETING),
        (CtrlState.DELETING, EhRet.DONE, CtrlState.DELETING),
    ],
)
def test_timeouts_while_the_controller_is_not_live(ctrl, verdict, after):
    """nvme_timeout(): "case NVME_CTRL_CONNECTING: nvme_change_ctrl_state(...,
    NVME_CTRL_DELETING); fallthrough; case NVME_CTRL_DELETING: ... timeout, disable
    controller ... NVME_REQ_CANCELLED ... return BLK_EH_DONE; case
    NVME_CTRL_RESETTING: return BLK_EH_RESET_TIMER;" -- and no Abort in any of them."""
    with nvme_rig(drop_completion=100) as (rig, ops, _dev):
        rq = submit(rig)
        a = rig.arena.atomic
        a.set32(ops._ctrl_state, ctrl)
        assert ops.timeout(rig.mq, rq, rq.gen) == verdict
        assert state(ops, rig) == after and ops.stats["aborts_sent"] == 0
        if verdict == EhRet.DONE:  # cancelled, not to be retried
            assert rq.state == RqState.COMPLETE
            assert rq.status == NVME_SC_DNR | Status.HOST_ABORTED_CMD
        else:
            assert rq.state == RqState.IN_FLIGHT
        a.set32(ops._ctrl_state, CtrlState.LIVE)


def test_an_admin_command_that_times_out_resets_the_controller():
    """nvme_timeout() of an admin command (ADMIN_TIMEOUT): "if (!nvmeq->qid || ...)
    ... reset controller".  The controller never answers the Abort (drop_abort); the
    admin queue's timeout work, which CPU 0's timer runs, finds it overdue."""
    with nvme_rig(drop_completion=100, drop_abort=100, admin_timeout=50) as (rig, ops, dev):
        rq = submit(rig)
        assert ops.timeout(rig.mq, rq, rq.gen) == EhRet.RESET_TIMER
        admin = ops.admin
        assert admin is not None
        (abort,) = [r for r in admin.rqs if r.state == RqState.IN_FLIGHT]
        assert wait_until(lambda: time.monotonic_ns() > abort.deadline_ns, ANSWER_S)
        ops.timer(rig.mq, 0)
        assert ops.stats["resets_admin"] == ops.stats["resets"] == 1
        assert state(ops, rig) == CtrlState.LIVE
        assert ops.stats["abort_completions"] == 1  # cancelled, and abort_endio ran
        assert abort.state == RqState.IDLE and abort_limit(ops, rig) == 4
        assert rq.state == RqState.COMPLETE and rq.status == Status.HOST_ABORTED_CMD
    assert dev["abort_cmds"] == 1 and dev["sq_deletes"] == dev["cq_deletes"] == 1


def test_identify_sets_the_queue_limits_at_probe_and_again_after_a_reset():
    """nvme_init_identify(): MDTS -> ctrl->max_hw_sectors (min_not_zero with what it
    was) -> nvme_set_queue_limits() on admin_q and the namespaces' queues, at probe
    and again in a reset's nvme_reset_work(); this CPU's handles take them at once.
    MDTS 3: 2^3 pages of 4 KiB = 64 sectors, 64 / 8 + 1 = 9 segments."""
    with nvme_rig(mdts=3) as (rig, ops, dev):
        q, queue = rig.queues[0], rig.mq.queues[0]
        limits = (q.limits.max_hw_sectors, q.limits.max_sectors, q.limits.max_segments)
        assert limits == (64, 64, 9) and (queue.max_sectors, queue.max_segments) == (64, 9)
        assert ops.admin_q is not None and ops.admin_q.limits.max_hw_sectors == 64
        assert ops.identify["mdts"] == 3 and ops.identify["max_hw_sectors_kb"] == 32
        blk_set_default_limits(q.limits)  # forget them: the reset must set them again
        queue.set_limits(q.limits)
        assert ops.reset_ctrl(rig.mq)
        assert state(ops, rig) == CtrlState.LIVE and ops.stats["resets"] == 1
        limits = (q.limits.max_hw_sectors, q.limits.max_sectors, q.limits.max_segments)
        assert limits == (64, 64, 9) and (queue.max_sectors, queue.max_segments) == (64, 9)
    assert dev["identify_ctrl"] == 2


# -- nvme_dev_disable and nvme_reset_work ------------------------------------------------------


def test_resets_delete_the_io_queues_first_and_identify_the_controller_again():
    """nvme_dev_disable() on a live controller: "nvme_disable_io_queues(dev)" --
    Delete I/O SQ for every queue, then Delete I/O CQ -- before the controller is
    disabled; nvme_reset_work() then runs nvme_init_identify() again.  The controller
    refuses to delete a CQ an SQ still uses, so every deletion succeeding shows the
    order.  The Aborts here never come back (drop_abort): ADMIN_TIMEOUT resets, on
    the CPUs, with two namespaces (Aborts sent from both CPUs, completed by CPU 0)."""
    result = run_nvme(
        drop_completion=2, drop_abort=100, admin_timeout=200, io_timeout=600,
        latency_ns=20_000, runtime=0.6, nr_namespaces=2,
    )  # fmt: skip
    assert_clean(result)
    dev, drv = device(result), driver(result)
    io_queues = result.device["io_queues"]
    assert drv["resets"] > 0 and drv["resets_admin"] > 0
    assert dev["sq_deletes"] == dev["cq_deletes"] == drv["resets"] * io_queues
    assert dev["admin_errors"] == 0 and drv["delete_timeouts"] == 0
    assert dev["identify_ctrl"] == 1 + drv["resets"]
    assert dev["abort_cmds"] == drv["aborts_sent"] > 0
    assert dev["abort_limit_exceeded"] == 0

"""Bugs of a request's lifetime: who may end a request, and when a request found by
a tag or a scan is still the one that was looked at."""

from __future__ import annotations

from mqrt.block.blk_mq_complete import BlkMqCompletion, _TimeoutScan
from mqrt.block.blk_mq_structs import RQ_OFF_DEADLINE, Request
from mqrt.block.blk_mq_types import RQ_GEN_SHIFT, RQ_STATE_MASK, EhRet, RqState
from mqrt.device.null_blk import NullbOps
from mqrt.lib import inject
from mqrt.race.entry import Bug, Scenario

_IDLE, _IN_FLIGHT, _COMPLETE = int(RqState.IDLE), int(RqState.IN_FLIGHT), int(RqState.COMPLETE)

# -- 12f5b9314545: the timeout handler claimed the request, and a completion was lost ----------


def _check_expired_claiming(
    self: BlkMqCompletion, scan: _TimeoutScan, rq: Request, st: int
) -> bool:
    """blk_mq_check_expired() and blk_mq_rq_timed_out() of Linux 4.15 (the
    REQ_ATOM_COMPLETE scheme): a started request past its deadline is claimed for
    the timeout by marking it complete (blk_mark_rq_complete(), a test-and-set on the
    request as it is now), then ->timeout runs; on BLK_EH_RESET_TIMER the timer is
    re-armed (blk_add_timer()) and the claim given back (blk_clear_rq_complete()).
    A completion is the same test-and-set (blk_mq_complete_request()): one that
    comes while the timeout holds the claim finds the request complete and is
    dropped -- and the claim is then given back to a request whose completion has
    been and gone."""
    scan.busy += 1
    if st & RQ_STATE_MASK == _IDLE:  # test_bit(REQ_ATOM_STARTED)
        return True
    a = self.a
    base = rq.base
    if scan.now < a.read(base + RQ_OFF_DEADLINE):  # time_after_eq(jiffies, rq->deadline)
        return True
    cur = a.read(base)  # blk_mark_rq_complete(): the request as it is now
    if (
        cur & RQ_STATE_MASK != _IN_FLIGHT
        or a.cmpxchg(base, cur, (cur & ~RQ_STATE_MASK) | _COMPLETE) != cur
    ):
        return True
    queue = scan.queue
    scan.expired += 1
    self.stats["timeouts"] += 1
    if inject.armed:
        inject.hit("rq.timeout.claimed")
    verdict = queue.ops.timeout(self.mq, rq, cur >> RQ_GEN_SHIFT)
    if verdict == EhRet.RESET_TIMER:
        self.stats["timer_resets"] += 1
        a.set(base + RQ_OFF_DEADLINE, self.clock() + queue.timeout_ns)  # blk_add_timer()
        # blk_clear_rq_complete(): a claimed request changes only here (release: the
        # new deadline is seen with it)
        a.store_release(base, cur)
    # BLK_EH_NOT_HANDLED (DONE): the driver ends the request it was handed, claimed
    return True


def _null_timeout_none(self: NullbOps, mq, rq: Request, gen: int) -> EhRet:
    """null_blk of 4.15 had no ->timeout: blk_mq_rq_timed_out() then takes
    BLK_EH_RESET_TIMER (the request's own completion is still coming)."""
    return EhRet.RESET_TIMER


TIMEOUT_CLAIM_LOSES_COMPLETION = Bug(
    name="timeout_claim_loses_completion",
    commit="12f5b9314545",
    subject="blk-mq: Remove generation seqeunce",
    what="a completion that arrives while the timeout handler holds the request is "
    "dropped: the request never ends",
    explanation=(
        "Up to Linux 4.17 the timeout handler claimed an expired request before calling "
        "->timeout: in 4.15 blk_mq_check_expired() marked it complete "
        "(blk_mark_rq_complete(), the REQ_ATOM_COMPLETE bit), and 1d9bd5161ba3 kept the "
        "claim in its aborted_gstate. The completion path made the same claim "
        "(blk_mq_complete_request()) and dropped the completion if the request was "
        "already claimed. A driver that answers BLK_EH_RESET_TIMER (the default when it "
        "has no ->timeout, as null_blk had none then) gets the claim back with a new "
        "deadline; a completion that came in between was thrown away, so the request "
        "stays in flight and times out again, and again, with nothing left to complete "
        "it. 12f5b9314545 removed the claim: the timeout work takes a reference so the "
        "request cannot be reused, re-checks that this instance expired, marks it "
        "RQF_TIMED_OUT and calls ->timeout, and a completion always wins -- which is what "
        "our timeout work does. Ported: blk_mq_check_expired() and "
        "blk_mq_rq_timed_out() of 4.15, null_blk without ->timeout. The window is the "
        "timeout's ->timeout call on the scanning CPU; the completion must come on "
        "another CPU (a CPU's own timers do not run inside its timeout work). Scenario: "
        "null_blk, 2 CPUs on one hw queue, a 2 ms io_timeout and 2 ms timer completions, "
        "so many requests are found expired just as their completion fires; the claim "
        "is held up to 500 us (injected, 30 % of timeouts: a ->timeout that takes its "
        "time). Caught as a dropped completion (double_completion)."
    ),
    scenario=Scenario(
        given={
            "irqmode": "timer",
            "completion_nsec": 2_000_000,
            "io_timeout": 2,
            "hw_queue_depth": 64,
            "iodepth": 32,
            "cpus": 2,
            "submit_queues": 1,
        },
        inject={"rq.timeout.claimed": (30.0, 500)},
        attempt_s=5.0,
    ),
    patches=(
        (BlkMqCompletion, "check_expired", _check_expired_claiming),
        (NullbOps, "timeout", _null_timeout_none),
    ),
    detectors=("double_completion",),
)


ENTRIES = (TIMEOUT_CLAIM_LOSES_COMPLETION,)

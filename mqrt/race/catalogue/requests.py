"""Bugs of a request's lifetime: who may end a request, and when a request found by
a tag or a scan is still the one that was looked at."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mqrt.block.blk_mq import BlkMq
from mqrt.block.blk_mq_complete import BlkMqCompletion, TimeoutScan
from mqrt.block.blk_mq_structs import RQ_OFF_DEADLINE, Request
from mqrt.block.blk_mq_tag import BusyTagIterFn, Tags
from mqrt.block.blk_mq_types import RQ_GEN_SHIFT, RQ_STATE_MASK, EhRet, RqState
from mqrt.device.null_blk import NullbOps
from mqrt.lib import inject
from mqrt.race.entry import Bug, Scenario

_IDLE, _IN_FLIGHT, _COMPLETE = int(RqState.IDLE), int(RqState.IN_FLIGHT), int(RqState.COMPLETE)

# -- Linux 4.15's timeout path (the REQ_ATOM_COMPLETE scheme) -----------------------------------
#
# Two holes of it, closed by two commits: an entry each.


def _bt_iter_415(
    self: Tags,
    rqs: Sequence[Request],
    fn: BusyTagIterFn,
    started: bool = False,
    match: Callable[[Request], bool] | None = None,
) -> bool:
    """bt_iter() / bt_tags_iter() of Linux 4.15: the request of every busy tag,
    ``tags->rqs[bitnr]``, handed to ``fn`` as it is -- nothing holds the instance
    that was found (no reference, no generation), so ``fn`` reads the request as it
    is when it looks, whatever happened to it since its bit was seen."""
    go = True

    def visit(offset: int) -> Callable[[int], bool]:
        def one(bitnr: int) -> bool:
            nonlocal go
            rq = rqs[self.rq_base + bitnr + offset]
            if started and self.a.read(rq.base) & RQ_STATE_MASK == _IDLE:
                return True
            if match is not None and not match(rq):
                return True
            go = fn(rq, self.a.read(rq.base))
            return go

        return one

    if self.breserved_tags is not None:
        self.breserved_tags.sb.for_each_set(visit(0))
        if not go:
            return False
    self.bitmap_tags.sb.for_each_set(visit(self.nr_reserved_tags))
    return go


def _check_expired_415(self: BlkMqCompletion, scan: TimeoutScan, rq: Request, st: int) -> bool:
    """blk_mq_check_expired() and blk_mq_rq_timed_out() of Linux 4.15.  A started
    request (REQ_ATOM_STARTED) whose deadline has passed (``time_after_eq(jiffies,
    rq->deadline)``: the deadline read, then the clock) is claimed for the timeout by
    marking it complete (blk_mark_rq_complete(), a test-and-set on the request as it
    is now, whichever instance that is), then ->timeout runs; on BLK_EH_RESET_TIMER
    the timer is re-armed (blk_add_timer()) and the claim given back
    (blk_clear_rq_complete()).  A completion makes the same test-and-set
    (blk_mq_complete_request()): one that comes while the timeout holds the claim
    finds the request complete and is dropped."""
    scan.busy += 1
    a = self.a
    base = rq.base
    if a.read(base) & RQ_STATE_MASK == _IDLE:  # test_bit(REQ_ATOM_STARTED)
        return True
    deadline = a.read(base + RQ_OFF_DEADLINE)
    if inject.armed:
        inject.hit("rq.timeout.before_deadline_test")
    if self.clock() < deadline:  # time_after_eq(jiffies, rq->deadline)
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


def _null_timeout_none(self: NullbOps, mq: BlkMq, rq: Request, gen: int) -> EhRet:
    """null_blk of 4.15 had no ->timeout (its blk_mq_ops of the 4.13 era, the
    blk_status_t one, had only ->queue_rq and ->complete; 4.15's own was not
    checked): blk_mq_rq_timed_out() then takes BLK_EH_RESET_TIMER (the request's
    own completion is still coming)."""
    return EhRet.RESET_TIMER


#: What switching 4.15's timeout path on replaces.
_TIMEOUT_PATH_415 = (
    (Tags, "busy_iter", _bt_iter_415),
    (BlkMqCompletion, "check_expired", _check_expired_415),
    (NullbOps, "timeout", _null_timeout_none),
)

# -- 12f5b9314545: the timeout handler claimed the request, and a completion was lost ----------

TIMEOUT_CLAIM_LOSES_COMPLETION = Bug(
    name="timeout_claim_loses_completion",
    commit="12f5b9314545",
    subject="blk-mq: Remove generation seqeunce",
    what="a completion that arrives while the timeout handler holds the request is "
    "dropped: the request never ends",
    explanation=(
        "Before 4.18 the timeout handler claimed an expired request before calling "
        "->timeout: in 4.15 blk_mq_check_expired() marked it complete "
        "(blk_mark_rq_complete(), the REQ_ATOM_COMPLETE bit), and the completion path "
        "made the same claim (blk_mq_complete_request()), dropping the completion if "
        "the request was already claimed. A driver that answers BLK_EH_RESET_TIMER (the "
        "default when it has no ->timeout, as null_blk had none then) gets the claim "
        "back with a new deadline; a completion that came in between was thrown away, so "
        "the request stays in flight and times out again, and again, with nothing left "
        "to complete it (the generation scheme of 1d9bd5161ba3 kept this: a 2018 "
        "linux-block patch, proposing an MQ_RQ_COMPLETE_IN_RESET state, described it "
        "against that scheme). 12f5b9314545 removed the claim: the "
        "timeout work takes a reference so the request cannot be reused, re-checks that "
        "this instance expired, marks it RQF_TIMED_OUT and calls ->timeout; a completion "
        "always wins, and racing a completion became the driver's business -- which is "
        "what our timeout work does. Ported: blk_mq_check_expired() and "
        "blk_mq_rq_timed_out() of 4.15, with its busy iterator, and null_blk without "
        "->timeout. The window is the ->timeout call on the scanning CPU; the completion "
        "must come on another CPU (a CPU's own timers do not run inside its timeout "
        "work). Scenario: null_blk, 2 CPUs on one hw queue, a 2 ms io_timeout and 2 ms "
        "timer completions, so many requests are found expired just as their completion "
        "fires; the claim is held up to 500 us (injected, 30 % of timeouts: a ->timeout "
        "that takes its time). Caught as a dropped completion (double_completion)."
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
    patches=_TIMEOUT_PATH_415,
    detectors=("double_completion",),
    window=(
        "the timeout work between claiming an expired request (marking it complete) "
        "and giving the claim back after ->timeout reset the timer; the request's own "
        "completion on another CPU landing inside it"
    ),
)


# -- 1d9bd5161ba3: the timeout work acted on a later instance of the request --------------------

TIMEOUT_ON_REUSED_REQUEST = Bug(
    name="timeout_on_reused_request",
    commit="1d9bd5161ba3",
    subject="blk-mq: replace timeout synchronization with a RCU and generation based scheme",
    what="the timeout work judges one instance of a request and claims a later one, "
    "which then loses its completion",
    explanation=(
        "In 4.15 the timeout work's busy iterator handed blk_mq_check_expired() the "
        "request of each busy tag, and nothing held the instance it found: the check "
        "read REQ_ATOM_STARTED, then the deadline, then the clock, then claimed the "
        "request (blk_mark_rq_complete()) -- each from whatever instance was there at "
        "that moment. Its comment trusted a barrier in blk_mq_start_request() to make "
        "that safe; 1d9bd5161ba3's message says the check can read STARTED from one "
        "recycle instance, the deadline from the next and mark a third, and so time out "
        "a later instance of a request that never timed out. Here the request is the "
        "same memory at every reuse (nothing is freed), so the failure is acting on a "
        "request that was completed and reallocated since it was judged: a deadline "
        "read from instance N-1, found passed once the scan comes back to it, and the "
        "claim made on instance N, started since; the claim (null_blk had no "
        "->timeout: BLK_EH_RESET_TIMER) holds N while its completion comes, and that "
        "completion is dropped. The fix gave each request a generation and a state "
        "updated together and made the timeout act only on the generation it judged; "
        "today the iterator's reference does that (2e315dc07df0: 'blk-mq: grab "
        "rq->refcount before calling ->fn in blk_mq_tagset_busy_iter'), which our "
        "iterator stands in for with the generation of the state word it read. "
        "Ported: 4.15's bt_iter, blk_mq_check_expired() and blk_mq_rq_timed_out(), and "
        "null_blk without ->timeout. Scenario: 100 us completions against a 100 ms "
        "io_timeout, so no request times out of its own; 2 CPUs on one hw queue; the "
        "scan is held up to 150 ms between reading a deadline and the clock (injected, "
        "5 % of looks: the scanning CPU interrupted or preempted there) while the other "
        "CPU completes and reuses the request, and the claim is held up to 500 us "
        "(50 %). A host that stalls a CPU for longer than the timeout makes real "
        "timeouts too, and the same port then loses their completions as in "
        "timeout_claim_loses_completion."
    ),
    scenario=Scenario(
        given={
            "irqmode": "timer",
            "completion_nsec": 100_000,
            "io_timeout": 100,
            "hw_queue_depth": 64,
            "iodepth": 32,
            "cpus": 2,
            "submit_queues": 1,
        },
        inject={
            "rq.timeout.before_deadline_test": (5.0, 150_000),
            "rq.timeout.claimed": (50.0, 500),
        },
        attempt_s=5.0,
    ),
    patches=_TIMEOUT_PATH_415,
    detectors=("double_completion",),
    window=(
        "the timeout work between reading a started request's deadline and claiming "
        "it; the request ending on another CPU and its tag handed to a new request "
        "inside it, so the claim lands on the later instance"
    ),
)


ENTRIES = (TIMEOUT_CLAIM_LOSES_COMPLETION, TIMEOUT_ON_REUSED_REQUEST)

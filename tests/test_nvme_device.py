"""The compiled NVMe device (``mqrt.device._nvme_engine``, its workers, the Python
coordinator) against the NVMe Base Specification and against the Python model it
replaced.

Two ways to drive it, as in ``tests/test_nvme_admin.py``: whole runs (``run_nvme``:
real CPU workers, the device's counters at the end), or :func:`nvme_rig`: a real
controller process probed by the driver in this process, where a test plays the host
by hand on the I/O queue pairs (:class:`Host`: SQEs with the command ids it chooses,
doorbells, CQEs read straight from the CQ) and sends admin commands through the
driver's admin queue.  Nothing waits for a time to pass: a test waits for a state
(a CQE, a head, a pending bit) and counts events.  Where a check can only hold while
a time has *not* passed (a coalesced interrupt still held back), it is made only if
the test's own clock shows that time has not passed, so a loaded host can weaken it
but never fail it.

Each test names the part of the NVM Express Base Specification 2.0 it checks: the
admin commands (chapter 5) and features (Set Features, 5.27) by number and name,
the rest by name (common data structures, command arbitration, shutdown and
resets); text in quotation marks is the specification's.
"""

from __future__ import annotations

import bisect
import math
import os
import random
import time

import pytest

from mqrt.block.blk_mq_types import RqState
from mqrt.device._nvme_engine import service_samples
from mqrt.device.nvme import NvmeOps, NvmeQueue
from mqrt.device.nvme_defs import NVME_MAX_RETRIES, AdminOpcode, Feature, IoOpcode, Status
from mqrt.device.nvme_model import LATENCY_DIST_CODES
from mqrt.testing import Rig
from tests.helpers import wait_until
from tests.test_nvme import device, driver, run_nvme
from tests.test_nvme_admin import ANSWER_S, nvme_rig, reap_admin_until
from tests.test_runtime import assert_clean, totals

pytestmark = pytest.mark.timing

#: QPRIO of Create I/O Submission Queue (CDW11 bits 2:1).
URGENT, HIGH, MEDIUM, LOW = 0, 1, 2, 3
#: Interrupt Coalescing TIME is in 100 us units; 255 is the longest it can hold.
MAX_TIME = 255
MAX_TIME_NS = MAX_TIME * 100_000


# -- the host, by hand ---------------------------------------------------------------------


def admin(ops: NvmeOps, opcode: int, cdw10: int = 0, cdw11: int = 0) -> tuple[int, int]:
    """One admin command through the driver's admin queue, waited for (as
    nvme_submit_sync_cmd): its (status, result)."""
    res = ops._admin_wait([(opcode, 0, cdw10, cdw11, 0)])
    assert res is not None, f"admin {AdminOpcode(opcode).name} did not complete"
    return res[0]


class Host:
    """The host's side of the rig's I/O queue pairs, played by the test: it writes
    SQEs with the command ids it chooses and rings the tail doorbell (kicking the
    queue's device worker when the tail passes its event index, as the driver does),
    and reads CQEs straight from a CQ (phase tag, head doorbell).  The driver's own
    data path is not involved: nothing else touches these queues."""

    def __init__(self, rig: Rig, ops: NvmeOps):
        self.a = rig.arena.atomic
        self.ops = ops
        #: absolute tail of each SQ (entries ever submitted to it since it was created)
        self.tail_abs: dict[int, int] = {}

    def q(self, qid: int) -> NvmeQueue:
        return self.ops.nvmeqs[qid]

    def depth(self, qid: int) -> int:
        return self.q(qid).depth

    def write(self, qid: int, cids, opcode: int = IoOpcode.READ, ring: bool = True) -> None:
        """Commands with ids ``cids`` into SQ ``qid``; one tail doorbell write for
        all of them if ``ring`` (else :meth:`ring` later)."""
        q = self.q(qid)
        enabled = q.lock_enabled()  # sq_lock, as nvme_queue_rq takes it
        assert enabled, f"I/O queue {qid} is disabled"
        try:
            cids = list(cids)
            for i, cid in enumerate(cids):
                slba = (cid * 8) % 1_000_000
                q.copy_cmd((opcode, 0, cid, 1, 0, 0, 0, 0, slba, 0, 7, 0, 0, 0),
                           ring and i == len(cids) - 1)  # fmt: skip
        finally:
            q.unlock()
        self.tail_abs[qid] = self.tail_abs.get(qid, 0) + len(cids)

    def ring(self, qid: int) -> None:
        """The tail doorbell for entries written without it (nvme_commit_rqs)."""
        self.q(qid).commit()

    def reap(self, cqid: int) -> list[tuple[int, int, int, int, int]]:
        """The CQEs posted to CQ ``cqid`` so far: (cid, status, result, sq_head, sq_id)."""
        return self.q(cqid).reap()

    def reap_n(self, cqid: int, n: int) -> list[tuple[int, int, int, int, int]]:
        """Wait for ``n`` CQEs on CQ ``cqid`` (and no more found in the same look)."""
        got: list[tuple[int, int, int, int, int]] = []
        assert wait_until(lambda: (got.extend(self.reap(cqid)), len(got) >= n)[1], ANSWER_S), (
            f"{len(got)} of {n} CQEs on CQ {cqid}"
        )
        return got

    def dev_sq_head(self, qid: int) -> int:
        """The SQ head the device publishes (how far it has fetched)."""
        return self.a.read32(self.q(qid).o.dev_sq_head)

    def pending(self, vec: int) -> int:
        """Vector ``vec``'s pending bit (the device sets it when it raises the vector)."""
        return self.a.read32(self.ops.nvmeqs[vec].o.irq_pending)

    def ack(self, vec: int) -> None:
        """Acknowledge vector ``vec`` (clear its pending bit, as nvme_irq does)."""
        self.a.xchg32(self.ops.nvmeqs[vec].o.irq_pending, 0)

    def irq_bytes(self, vec: int) -> int:
        """Interrupts signalled on vector ``vec`` since the last look (bytes in its pipe)."""
        try:
            return len(os.read(self.ops.irq_r[vec], 1 << 16))
        except BlockingIOError:
            return 0

    def forget_sq(self, qid: int) -> None:
        """nvme_init_queue() of an SQ the test deletes and creates again: tail,
        doorbell and event index back to 0."""
        q = self.q(qid)
        a, o = self.a, q.o
        for name in ("sq_tail", "last_sq_tail", "sq_tail_db", "sq_event_idx"):
            a.set32(getattr(o, name), 0)
        self.tail_abs[qid] = 0

    def create_sq(self, qid: int, cqid: int, prio: int = MEDIUM, depth: int = 0) -> int:
        """Create I/O Submission Queue (01h): the status."""
        depth = depth or self.q(qid).max_depth
        self.forget_sq(qid)
        status, _ = admin(self.ops, AdminOpcode.CREATE_SQ, (depth - 1) << 16 | qid,
                          cqid << 16 | prio << 1 | 1)  # fmt: skip
        self.q(qid).refresh()
        return status


def settled_counters(ops: NvmeOps, rig: Rig) -> dict[str, int]:
    """The device's counters as published after this call (the coordinator
    publishes them every 50 ms, the heartbeat last): two publications later, the
    second begun after the first one seen here ended, so nothing done before this
    call is missing from it."""
    seen = [ops.device_counters(rig.arena)["heartbeat_ns"]]

    def published() -> bool:
        hb = ops.device_counters(rig.arena)["heartbeat_ns"]
        if hb != seen[-1]:
            seen.append(hb)
        return len(seen) > 2

    assert wait_until(published, ANSWER_S), "the controller stopped publishing its counters"
    return ops.device_counters(rig.arena)


# -- 1. the service model ------------------------------------------------------------------


def _python_model(dist: str, mean: int, sigma: float, seed: int, n: int) -> list[int]:
    """Service times as the Python model before the engine drew them
    (``ServiceModel.service_ns``): ``random.Random(seed)``."""
    rng = random.Random(seed)
    if dist == "fixed":
        return [mean] * n
    if dist == "uniform":
        return [int(rng.uniform(0.5 * mean, 1.5 * mean)) for _ in range(n)]
    if dist == "exponential":
        return [int(rng.expovariate(1.0 / mean)) for _ in range(n)]
    mu = math.log(mean) - sigma * sigma / 2
    return [int(rng.lognormvariate(mu, sigma)) for _ in range(n)]


@pytest.mark.parametrize("dist", ["fixed", "uniform", "exponential", "lognormal"])
def test_the_seeded_service_model_draws_the_python_models_distribution(dist):
    """The service model is the device's own: NVMe Base 2.0, Command Arbitration,
    leaves a command's processing time to the controller ("The order in which
    commands are selected for processing does not imply the order in which commands
    are completed"); what must hold is that the compiled engine draws from
    the same distributions as the Python model it replaced -- uniform(0.5m, 1.5m),
    expovariate(1/m), lognormvariate(ln m - sigma^2/2, sigma) -- and that a seed
    fixes the sequence.  Quantiles are compared by rank: the engine's p-quantile
    sits at rank p among the Python model's samples, within 4 standard errors of two
    samples' empirical quantiles."""
    mean, sigma, seed, n = 80_000, 0.25, 12345, 100_000
    code = LATENCY_DIST_CODES[dist]
    got = service_samples(mean, code, sigma, seed, n)
    ref = sorted(_python_model(dist, mean, sigma, seed, n))
    assert len(got) == n
    if dist == "fixed":
        assert set(got) == {mean} == set(ref)
    else:
        srt = sorted(got)
        for p in (0.10, 0.50, 0.90, 0.99):
            x = srt[int(p * n)]
            rank = bisect.bisect_right(ref, x) / n
            tol = 4 * math.sqrt(2 * p * (1 - p) / n)
            assert abs(rank - p) <= tol, (dist, p, x, rank)
        m = sum(got) / n
        assert abs(m - mean) / mean < 0.01, (dist, m)  # the mean is the knob's
    if dist == "uniform":
        assert 0.5 * mean <= min(got) and max(got) < 1.5 * mean
    assert service_samples(mean, code, sigma, seed, n) == got  # same seed, same sequence
    if dist != "fixed":
        other = service_samples(mean, code, sigma, seed + 1, n)
        assert other != got
        assert sum(a == b for a, b in zip(got, other, strict=True)) < n // 100  # all new draws


# -- 2. fault rates ------------------------------------------------------------------------


def _binomial_ok(hits: int, trials: int, p: float) -> bool:
    """``hits`` of ``trials`` draws at rate ``p``: within 4.5 standard deviations."""
    return abs(hits - trials * p) <= 4.5 * math.sqrt(trials * p * (1 - p)) + 1


@pytest.mark.parametrize(
    ("knob", "iodepth", "io_timeout"),
    [("error_status", 8, 30_000), ("lost_irq", 8, 20), ("drop_completion", 32, 20)],
)
def test_fault_rates_are_the_knobs_and_every_request_still_ends_once(knob, iodepth, io_timeout):
    """The device's faults are draws at the knob's rate, each on its own event: a
    command completed with a media error (NVMe Base 2.0, Completion Queue Entry,
    Status Field: Status Code Type 2h, Media and Data Integrity Errors, Write Fault
    80h / Unrecovered Read Error 81h, with Do Not Retry), a completion never
    posted (found by the host's timeout, its Abort, then a Controller Level Reset),
    an interrupt never signalled (the CQE is found when the CQ is next looked at,
    by a later interrupt or the timeout's poll).  At 10 % each, the counter over
    what it is drawn on stays within a binomial tolerance of 10 %, and every
    request still ends exactly once."""
    result = run_nvme(latency_ns=0, iodepth=iodepth, io_timeout=io_timeout, **{knob: 10})
    assert_clean(result)
    t, dev, drv = totals(result), device(result), driver(result)
    assert t["ios"] == t["requests"] > 0
    if knob == "error_status":
        trials, hits = dev["commands"], dev["errors"]
        assert t["errors"] == hits  # DNR: each one fails its request, once
    elif knob == "lost_irq":  # drawn on each raise of a vector
        trials = dev["interrupts"] + dev["irq_merged"] + dev["lost_irqs"]
        hits = dev["lost_irqs"]
        assert t["errors"] == 0
    else:
        trials, hits = dev["commands"], dev["dropped"]
        # a lost completion is only ever found by the timeouts: the Abort finds
        # nothing to abort, the next timeout resets, the reset cancels and retries it
        assert drv["cancelled"] >= hits and drv["resets"] > 0
    assert hits > 0 and _binomial_ok(hits, trials, 0.10), (knob, hits, trials)


# -- 3. every command completed once, several workers, every queue size --------------------


@pytest.mark.parametrize("depth", [2, 3, 8, 31, 1024])
def test_several_workers_complete_every_command_once_at_every_queue_size(depth):
    """NVMe Base 2.0, Memory-Based Transport Queue Model (Queue Size, Queue Head
    and Tail pointers): a queue of N entries (any N from 2 up to MQES + 1) holds at
    most N - 1, a full queue being one whose Head is one more than its Tail, and the
    pointers wrap to 0 after N - 1; Completion Queue Entry, Phase Tag: the
    controller inverts it each time it wraps the CQ -- at every size, not only
    powers of two.  Two device workers serve four queue
    pairs (each its own CQs) sharing the controller's channels, few enough to be
    full often: every command the host submitted is fetched once and completed
    once (the device's commands == its CQEs == the requests blk-mq made; a CQE lost
    or posted twice would show, and so would a command the workers left waiting)."""
    result = run_nvme(
        device_workers=2, cpus=4, io_queue_depth=depth, iodepth=16, latency_ns=10_000,
        latency_dist="exponential", channels=6, rw="randrw", io_timeout=5_000,
    )  # fmt: skip
    assert_clean(result)
    t, dev, drv = totals(result), device(result), driver(result)
    assert result.device["queue_depth"] == depth and result.device["io_queues"] == 4
    assert dev["workers"] == 2 and len(result.device["workers"]) == 2
    assert all(w["commands"] > 0 for w in result.device["workers"])  # both served
    assert dev["commands"] == dev["completions"] == t["requests"] == t["ios"] > 0
    assert drv["genctr_mismatch"] == 0 and drv["aborts_sent"] == 0 and t["errors"] == 0
    assert dev["completions"] >= 2 * 4 * depth  # each CQ wrapped (on average) twice


# -- 4. interrupt coalescing ---------------------------------------------------------------


@pytest.mark.parametrize(("thr", "tim"), [(7, 0), (0, 5)])
def test_coalescing_is_off_when_thr_or_time_is_zero(thr, tim):
    """NVMe Base 2.0, 5.27.1 Set Features, Interrupt Coalescing (Feature Identifier
    08h): "If either the TIME or the THR fields are cleared to 0h, then interrupt
    coalescing is implicitly disabled"; otherwise "the controller signals an
    interrupt when either the Aggregation Time (TIME) or the Aggregation Threshold
    (THR) conditions are met".  With THR 7 and TIME 0 at iodepth 1 (one command per
    CQ, so eight CQEs never gather) every completion must still be signalled at
    once: the old model held the interrupt until THR was met, forever, and only the
    30 s timeout found the CQE.  So: no completion was found by a timeout's poll,
    every CQE was signalled on its own (never one riding on another's interrupt),
    and the run made many I/Os.  THR 0 with TIME 5 likewise."""
    result = run_nvme(
        cpus=2, iodepth=1, latency_ns=0, irq_coalesce_thr=thr, irq_coalesce_time=tim,
    )  # fmt: skip
    assert_clean(result)
    t, dev, drv = totals(result), device(result), driver(result)
    assert t["ios"] == t["requests"] == dev["completions"] >= 100
    assert drv["completion_polled"] == 0 and drv["aborts_sent"] == 0
    assert dev["coalesced"] == 0
    assert dev["interrupts"] + dev["irq_merged"] == dev["completions"]


def test_coalescing_gathers_thr_plus_one_cqes_per_interrupt():
    """NVMe Base 2.0, 5.27.1 Set Features, Interrupt Coalescing (Feature Identifier
    08h): Aggregation Threshold (THR), the minimum number of completion queue
    entries to aggregate per interrupt vector before signaling an interrupt, 0's
    based; Aggregation Time (TIME), the longest an interrupt may be delayed, in
    100 us units.  THR 3 and TIME 25.5 ms: the host submits four commands one at a
    time, each waited for until its CQE is in the CQ.  The first three CQEs raise
    nothing (checked while the test's own clock shows TIME has not passed since the
    first command was submitted); the fourth raises the vector once, for all four."""
    with nvme_rig(latency_ns=0, irq_coalesce_thr=3, irq_coalesce_time=MAX_TIME) as (rig, ops, dev):
        host = Host(rig, ops)
        held = True  # TIME had not passed at every check below
        t0 = time.monotonic_ns()
        for i in range(4):
            host.write(1, [i])
            cqes = host.reap_n(1, 1)
            assert [(c[0], c[1]) for c in cqes] == [(i, Status.SUCCESS)]
            if i < 3:
                pending = host.pending(1)
                held = held and time.monotonic_ns() - t0 < MAX_TIME_NS
                assert pending == 0 or not held, f"vector raised after {i + 1} CQEs"
        assert wait_until(lambda: host.pending(1) == 1, ANSWER_S)
        assert host.irq_bytes(1) == 1  # (the vector stays pending: raised once)
    assert dev["completions"] == 4 and dev["interrupts"] == 1
    if held:
        assert dev["coalesced"] == 3 and dev["irq_merged"] == 0  # four CQEs, one interrupt


def test_the_admin_completion_queue_is_never_coalesced():
    """NVMe Base 2.0, 5.27.1 Set Features, Interrupt Coalescing (08h) and Interrupt
    Vector Configuration (09h): interrupt coalescing is not supported for the Admin
    Completion Queue; it is signalled as its entries are posted.  With the longest
    coalescing the feature allows (THR 255, TIME 25.5 ms) an I/O CQE is held back;
    an admin command submitted after it was posted is signalled on vector 0 first
    (while the test's clock shows TIME has not passed, the I/O vector must still be
    quiet), and each of several admin commands, issued one at a time with the
    vector acknowledged in between, raises vector 0 once."""
    with nvme_rig(latency_ns=0, irq_coalesce_thr=255, irq_coalesce_time=MAX_TIME) as (
        rig, ops, dev,
    ):  # fmt: skip
        host = Host(rig, ops)
        host.ack(0)  # the probe's last admin CQE may have left vector 0 pending
        before = settled_counters(ops, rig)
        t0 = time.monotonic_ns()
        host.write(1, [5])
        assert wait_until(ops.nvmeqs[1].cqe_pending, ANSWER_S)  # posted, not signalled
        n, aq = 5, ops.admin
        assert aq is not None
        for i in range(n):
            rq = aq.alloc((AdminOpcode.IDENTIFY, 0, 1, 0, 0))  # PRP 0: Invalid Field
            assert rq is not None and aq.execute_nowait(rq) == 0
            assert wait_until(lambda: host.pending(0) == 1, ANSWER_S)
            io_pending = host.pending(1)
            if i == 0 and time.monotonic_ns() - t0 < MAX_TIME_NS:
                assert io_pending == 0  # the older I/O CQE is still held back
            # the vector's handler: acknowledge it, reap the CQE
            assert reap_admin_until(ops, lambda rq=rq: rq.state == RqState.COMPLETE)
            assert rq.status == Status.INVALID_FIELD
            aq.mq.end_request(rq, 0)
        after = settled_counters(ops, rig)
        assert after["admin_commands"] - before["admin_commands"] == n
        assert after["admin_interrupts"] - before["admin_interrupts"] == n
        assert wait_until(lambda: host.pending(1) == 1, ANSWER_S)  # TIME passes
        assert [c[0] for c in host.reap(1)] == [5]
    assert dev["coalesced"] == 0 and dev["interrupts"] == 1


# -- 5. the SQ Head Pointer in every CQE ---------------------------------------------------


@pytest.mark.parametrize("depth", [8, 31])
def test_every_cqe_carries_the_controllers_current_sq_head(depth):
    """NVMe Base 2.0, Completion Queue Entry, Dword 2: "SQ Head Pointer
    (SQHD): Indicates the current Submission Queue Head pointer for the Submission
    Queue indicated in the SQ Identifier field" -- the head when the CQE is posted,
    not when its command was fetched, so between consecutive CQEs of one SQ it never
    moves back, and never passes the tail the host wrote.

    First, batches written with one doorbell each (fetched in one go: no arbitration
    burst limit), waited for: every CQE of a batch, however its service time ordered
    it, carries the head after the whole batch.  Then batches overlapping, at most
    half a queue outstanding: the head (unwrapped) climbs monotonically from CQE to
    CQE and stays within what the host submitted and what the device published."""
    with nvme_rig(
        io_queue_depth=depth, latency_ns=20_000, latency_dist="exponential", arb_burst=7,
        iops_max=0, dev_mbps=0,
    ) as (rig, ops, _dev):  # fmt: skip
        host = Host(rig, ops)
        rnd = random.Random(depth)
        assert host.depth(1) == depth
        for _ in range(3 * depth):  # each batch waited for: the head is its end
            k = rnd.randint(1, depth - 1)
            host.write(1, range(k))
            end = host.tail_abs[1] % depth
            cqes = host.reap_n(1, k)
            assert sorted(c[0] for c in cqes) == list(range(k))
            assert {(c[3], c[4]) for c in cqes} == {(end, 1)}, (k, end, cqes)
        head_abs = host.tail_abs[1]  # head == tail here
        free, outstanding, checked = list(range(depth)), 0, 0
        while checked < 10 * depth:
            if outstanding < depth // 2:
                k = rnd.randint(1, depth // 2 - outstanding)
                host.write(1, [free.pop() for _ in range(k)])
                outstanding += k
            cqes = host.reap_n(1, 1)  # at least one
            for cid, status, _res, sq_head, sq_id in cqes:
                assert status == Status.SUCCESS and sq_id == 1
                tail = host.tail_abs[1]
                fwd = (sq_head - head_abs) % depth  # a step back would be >= depth / 2
                assert head_abs + fwd <= tail, (sq_head, head_abs, tail)
                head_abs += fwd
                pub = host.dev_sq_head(1)  # published before the CQE was posted
                assert head_abs + (pub - head_abs) % depth <= tail, (pub, head_abs, tail)
                free.append(cid)
            outstanding -= len(cqes)
            checked += len(cqes)
        host.reap_n(1, outstanding)


# -- 6. queue management, vectors and command ids ------------------------------------------


def test_deleting_a_cq_that_an_sq_still_uses_is_refused():
    """NVMe Base 2.0, 5.6 Delete I/O Completion Queue: the host deletes every I/O
    Submission Queue mapped to a Completion Queue before the Completion Queue; a
    Delete I/O CQ while one is still mapped is aborted with Invalid Queue Deletion
    (Command Specific Status 0Ch: 0x10C).  Once its SQ is gone the same command
    succeeds, and a CQ that is gone is an Invalid Queue Identifier."""
    with nvme_rig() as (_rig, ops, dev):
        assert admin(ops, AdminOpcode.DELETE_CQ, 1) == (Status.INVALID_QUEUE_DELETION, 0)
        assert admin(ops, AdminOpcode.DELETE_SQ, 1)[0] == Status.SUCCESS
        assert admin(ops, AdminOpcode.DELETE_CQ, 1)[0] == Status.SUCCESS
        assert admin(ops, AdminOpcode.DELETE_CQ, 1)[0] == Status.QID_INVALID
    assert dev["sq_deletes"] == dev["cq_deletes"] == 1 and dev["admin_errors"] == 2


def test_deleting_an_sq_aborts_its_commands_before_it_completes():
    """NVMe Base 2.0, 5.7 Delete I/O Submission Queue: the commands submitted to the
    SQ and still in progress are aborted, with Command Aborted due to SQ Deletion
    (Generic Command Status 08h), and "After all commands submitted to the
    indicated I/O Submission Queue are either completed or aborted, a completion
    queue entry is posted to the Admin Completion Queue for the Delete I/O
    Submission Queue command".  Two of four commands are in service (10 s each, two
    channels), two still in the SQ: when the Delete I/O SQ completes, all four CQEs
    are already in the I/O CQ."""
    with nvme_rig(latency_ns=10_000_000_000, latency_dist="fixed", channels=2) as (
        rig, ops, dev,
    ):  # fmt: skip
        host = Host(rig, ops)
        host.write(1, [10, 11, 12, 13])
        assert wait_until(lambda: host.dev_sq_head(1) == 2, ANSWER_S)  # two in service
        assert host.reap(1) == []
        assert admin(ops, AdminOpcode.DELETE_SQ, 1)[0] == Status.SUCCESS
        cqes = host.reap(1)  # no waiting: posted before the Delete completed
        assert sorted(c[0] for c in cqes) == [10, 11, 12, 13], cqes
        assert {(c[1], c[4]) for c in cqes} == {(Status.ABORT_QUEUE, 1)}
        assert admin(ops, AdminOpcode.DELETE_CQ, 1)[0] == Status.SUCCESS
    assert dev["sq_delete_aborts"] == 4 and dev["completions"] == 4


def test_a_cq_on_a_vector_the_controller_lacks_is_refused():
    """NVMe Base 2.0, 5.4 Create I/O Completion Queue: Interrupt Vector (IV, CDW11
    bits 31:16); a vector the controller does not support is refused with Invalid
    Interrupt Vector (Command Specific Status 08h: 0x108).  This controller has one
    vector per queue pair (2 here: admin and one I/O): vector 2 is refused, vector 1
    accepted, and the queue pair then works."""
    with nvme_rig(latency_ns=0) as (rig, ops, _dev):
        host = Host(rig, ops)
        nr_vectors = len(ops.irq_w)
        assert admin(ops, AdminOpcode.DELETE_SQ, 1)[0] == Status.SUCCESS
        assert admin(ops, AdminOpcode.DELETE_CQ, 1)[0] == Status.SUCCESS
        size_qid = (host.depth(1) - 1) << 16 | 1
        for iv in (nr_vectors, 0xFFFF):
            got = admin(ops, AdminOpcode.CREATE_CQ, size_qid, iv << 16 | 0x3)
            assert got == (Status.INVALID_VECTOR, 0), iv
        assert admin(ops, AdminOpcode.CREATE_CQ, size_qid, 1 << 16 | 0x3)[0] == Status.SUCCESS
        assert host.create_sq(1, 1) == Status.SUCCESS
        host.write(1, [1, 2, 3])
        assert sorted(c[0] for c in host.reap_n(1, 3)) == [1, 2, 3]
        assert wait_until(lambda: host.pending(1) == 1, ANSWER_S)


def test_interrupt_vector_configuration_cd_turns_coalescing_off_for_its_vector():
    """NVMe Base 2.0, 5.27.1 Set Features, Interrupt Vector Configuration (Feature
    Identifier 09h): Coalescing Disable (CD, CDW11 bit 16) set to 1: the interrupt
    coalescing settings are not applied for the vector in IV (bits 15:0); an IV the
    controller lacks is an Invalid Field.  Two queue pairs on vectors 1 and 2, both
    under the longest coalescing (THR 255, TIME 25.5 ms), CD set on vector 1 only.
    Four commands on queue 1, each submitted once the previous one's CQE is in the
    CQ: each CQE is signalled on its own (none rides on another's interrupt, which
    coalescing would do to CQEs posted within TIME of each other).  One command on
    queue 2: its CQE is held back (checked while TIME has not passed) until TIME."""
    with nvme_rig(nr_cpus=2, latency_ns=0, irq_coalesce_thr=255, irq_coalesce_time=MAX_TIME) as (
        rig, ops, dev,
    ):  # fmt: skip
        host = Host(rig, ops)
        assert admin(ops, AdminOpcode.SET_FEATURES, Feature.IRQ_CONFIG, 1 | 1 << 16)[0] == 0
        nr_vectors = len(ops.irq_w)
        got = admin(ops, AdminOpcode.SET_FEATURES, Feature.IRQ_CONFIG, nr_vectors | 1 << 16)
        assert got[0] == Status.INVALID_FIELD  # no such vector
        for cid in range(4):
            host.write(1, [cid])
            assert [c[0] for c in host.reap_n(1, 1)] == [cid]
        assert wait_until(lambda: host.pending(1) == 1, ANSWER_S)
        t0 = time.monotonic_ns()
        host.write(2, [7])
        assert wait_until(ops.nvmeqs[2].cqe_pending, ANSWER_S)
        pending2 = host.pending(2)
        if time.monotonic_ns() - t0 < MAX_TIME_NS:
            assert pending2 == 0  # posted, held back
        assert wait_until(lambda: host.pending(2) == 1, ANSWER_S)
        assert [c[0] for c in host.reap(2)] == [7] and host.irq_bytes(2) == 1
    assert dev["completions"] == 5 and dev["coalesced"] == 0
    assert dev["interrupts"] + dev["irq_merged"] == 5  # one raise per CQE


def test_a_command_id_already_in_service_is_refused_and_the_first_completes():
    """NVMe Base 2.0, Submission Queue Entry, Command Identifier: with the
    Submission Queue Identifier it identifies the command uniquely; a command whose
    identifier is that of a command still outstanding on the same SQ is aborted
    with Command ID Conflict (Generic Command Status 03h), and the command that
    holds the identifier is not disturbed.  Two commands with id 7 under one
    doorbell (no burst limit: fetched in one look, the first surely still in
    service when the second is checked): the second's CQE says 03h, the first
    completes successfully after its service time, and id 7 is free again."""
    with nvme_rig(latency_ns=2_000_000, latency_dist="fixed", arb_burst=7) as (rig, ops, dev):
        host = Host(rig, ops)
        host.write(1, [7, 7])
        cqes = host.reap_n(1, 2)
        assert [(c[0], c[1]) for c in cqes] == [(7, Status.CMDID_CONFLICT), (7, Status.SUCCESS)]
        host.write(1, [7])
        assert [(c[0], c[1]) for c in host.reap_n(1, 1)] == [(7, Status.SUCCESS)]
    assert dev["cmdid_conflicts"] == 1 and dev["commands"] == dev["completions"] == 3


# -- 7. weighted round robin with an urgent class ------------------------------------------


@pytest.mark.parametrize("channels", [1, 4])
def test_wrr_serves_urgent_first_then_high_medium_low_by_weight(channels):
    """NVMe Base 2.0, Command Arbitration, Weighted Round Robin with Urgent Priority
    Class Arbitration: three strict priority classes (Admin, Urgent, then the
    weighted round robin levels), and "If Submission Queue A is of higher strict
    priority than Submission Queue B, then all candidate commands in Submission
    Queue A shall start processing before candidate commands from Submission Queue
    B start processing"; the High, Medium and Low levels share what is left by
    their weights (5.27.1 Set Features, Arbitration (01h): High/Medium/Low Priority
    Weight, 0's based; Arbitration Burst).  QPRIO of Create I/O SQ (CDW11 bits
    2:1): 00b urgent, 01b high, 10b medium, 11b low.

    Four SQs on one CQ, weights 8/4/1, burst 1, each command 2 ms in one of
    ``channels`` channels, so the CQEs come in the order the controller started the
    commands.  The urgent SQ's doorbell rings first and holds the channels long
    enough for the others to ring behind it (checked: the urgent SQ still had
    commands once they all had); then every urgent command starts first, and high,
    medium and low start in rounds of 8:4:1 until they run out together.  One
    channel (a command per look) and four (several per look, where a pass could go
    on to the next class, or start a new round before every level spent its
    weight)."""
    with nvme_rig(
        nr_cpus=4, arbitration="wrr", latency_ns=2_000_000, latency_dist="fixed",
        channels=channels, iops_max=0, dev_mbps=0,
    ) as (rig, ops, _dev):  # fmt: skip
        host = Host(rig, ops)
        for qid in range(1, 5):
            assert admin(ops, AdminOpcode.DELETE_SQ, qid)[0] == Status.SUCCESS
        # AB 0 (burst 1), LPW 0, MPW 3, HPW 7 (0's based: 1, 4, 8)
        assert admin(ops, AdminOpcode.SET_FEATURES, Feature.ARBITRATION, 7 << 24 | 3 << 16)[0] == 0
        for qid, prio in {1: URGENT, 2: HIGH, 3: MEDIUM, 4: LOW}.items():
            assert host.create_sq(qid, 1, prio) == Status.SUCCESS
        weights, rounds = {2: 8, 3: 4, 4: 1}, 6
        count = {1: 20 * channels, **{qid: w * rounds for qid, w in weights.items()}}
        for qid, n in count.items():
            host.write(qid, (qid << 8 | i for i in range(n)), ring=False)
        for qid in (1, 4, 3, 2):  # the urgent SQ's doorbell first
            host.ring(qid)
        held = host.dev_sq_head(1) < count[1]  # no other class could start before this
        cqes = host.reap_n(1, sum(count.values()))
        assert all(c[1] == Status.SUCCESS for c in cqes)
        assert sorted(c[0] for c in cqes) == sorted(
            q << 8 | i for q, n in count.items() for i in range(n)
        )
        order = [c[4] for c in cqes]
        assert order[: count[1]] == [1] * count[1], order  # urgent, strictly first
        rest = order[count[1] :]
        if held:
            for r in range(1, rounds + 1):  # after r rounds each level had r x its weight
                seen = rest[: 13 * r]
                for qid, w in weights.items():
                    assert abs(seen.count(qid) - w * r) <= w // 2, (r, qid, rest)
            last = {qid: max(i for i, q in enumerate(rest) if q == qid) for qid in weights}
            assert max(last.values()) - min(last.values()) < 13, last  # ran out together


def test_wrr_weights_belong_to_the_class_and_its_sqs_take_turns():
    """NVMe Base 2.0, Command Arbitration, Weighted Round Robin: the weights are the
    High, Medium and Low *classes'*, and "Submission Queues within the same priority
    class are serviced round robin" -- two high SQs share the high weight, they do
    not get it twice.  High weight 8, low 1, burst 1, one channel: after r rounds
    the high class started 8r commands (4r from each SQ) and the low one r."""
    with nvme_rig(
        nr_cpus=4, arbitration="wrr", latency_ns=2_000_000, latency_dist="fixed",
        channels=1, iops_max=0, dev_mbps=0,
    ) as (rig, ops, _dev):  # fmt: skip
        host = Host(rig, ops)
        for qid in range(1, 5):
            assert admin(ops, AdminOpcode.DELETE_SQ, qid)[0] == Status.SUCCESS
        assert admin(ops, AdminOpcode.SET_FEATURES, Feature.ARBITRATION, 7 << 24)[0] == 0
        for qid, prio in {1: URGENT, 2: HIGH, 3: HIGH, 4: LOW}.items():
            assert host.create_sq(qid, 1, prio) == Status.SUCCESS
        rounds = 5
        count = {1: 20, 2: 4 * rounds, 3: 4 * rounds, 4: rounds}
        for qid, n in count.items():
            host.write(qid, (qid << 8 | i for i in range(n)), ring=False)
        for qid in (1, 4, 3, 2):  # the urgent SQ's doorbell first: it holds the channel
            host.ring(qid)
        held = host.dev_sq_head(1) < count[1]
        cqes = host.reap_n(1, sum(count.values()))
        assert all(c[1] == Status.SUCCESS for c in cqes)
        rest = [c[4] for c in cqes][count[1] :]
        if held:
            for r in range(1, rounds + 1):
                seen = rest[: 9 * r]
                assert seen.count(2) + seen.count(3) == 8 * r, (r, rest)
                assert abs(seen.count(2) - seen.count(3)) <= 1, (r, rest)
                assert seen.count(4) == r, (r, rest)


# -- 8. a stale event index ----------------------------------------------------------------


def test_a_stale_event_index_is_recovered_by_the_timeouts_abort():
    """NVMe Base 2.0, 5.11 Doorbell Buffer Config: with shadow doorbells the host
    writes the doorbell register only when the new tail passes the EventIdx the
    controller keeps in host memory; a controller that leaves the EventIdx stale
    (QEMU's bug, the ``stale_event_idx`` fault at 100 %: never updated before the
    workers sleep) is not told of commands the host submits.  The block layer's
    timeout finds them: its Abort (5.1 Abort: a command still in its Submission
    Queue is aborted when the controller gets to it) wakes the controller, which
    fetches everything queued behind it.  Every request still ends exactly once:
    each command an Abort ended (Command Abort Requested, no DNR) was retried, or
    its request failed after nvme_max_retries of them (a retry meets the same stale
    index), and nothing else failed."""
    result = run_nvme(stale_event_idx=100, io_timeout=20, latency_ns=0, iodepth=4)
    assert_clean(result)
    t, dev, drv = totals(result), device(result), driver(result)
    assert dev["stale_event_idx"] > 0
    assert drv["aborts_sent"] > 0 and dev["aborts"] > 0  # commands the device had not fetched
    assert t["ios"] == t["requests"] > 0
    assert dev["aborts"] == drv["retries"] + t["errors"]
    assert t["errors"] * (NVME_MAX_RETRIES + 1) <= dev["aborts"]
    assert drv["resets"] == 0 and dev["errors"] == dev["dropped"] == 0


# -- 9. resets and shutdowns ---------------------------------------------------------------


def test_a_clean_run_counts_one_shutdown_and_no_reset():
    """NVMe Base 2.0, Shutdown Processing and Controller Level Reset: the host's
    orderly stop sets CC.SHN (a normal shutdown notification) and then clears
    CC.EN; that is a shutdown, not a reset to be counted as one.  A run without
    faults ends with the controller's ``resets`` at 0 and ``shutdowns`` at 1 --
    also in the rig, whose end sends the exit message right after clearing CC.EN
    (the coordinator must see CC.EN go to 0 even when both arrive together)."""
    result = run_nvme(latency_ns=0)
    assert_clean(result)
    dev = device(result)
    assert dev["resets"] == 0 and dev["shutdowns"] == 1 and driver(result)["resets"] == 0
    for _ in range(5):
        with nvme_rig(latency_ns=0) as (rig, ops, dev):
            host = Host(rig, ops)
            host.write(1, [1])
            host.reap_n(1, 1)
        assert dev["resets"] == 0 and dev["shutdowns"] == 1, dev

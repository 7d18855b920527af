"""Bio merging and the queue limits, step by step in one process (mqrt.testing) and
on real CPU and controller processes: plug merges (front and back, the plug list newest
first, as Linux 5.10 walks it), merges into requests waiting on a ctx list
(BLK_MQ_F_SHOULD_MERGE), ``nomerges``, the 5.10 limits and the drivers' own (null_blk's
``max_sectors``, nvme's MDTS), and each merged bio's own completion."""

from __future__ import annotations

import pytest

from mqrt.block.blk_mq_debugfs import check_invariants
from mqrt.block.blk_mq_setup import alloc_tag_set, init_queue
from mqrt.block.blk_mq_structs import TagSet
from mqrt.block.blk_mq_types import BLK_DEF_MAX_SECTORS, BlkMqFlag, ReqOp, Rqf
from mqrt.block.blk_settings import (
    BLK_MAX_SEGMENTS,
    BLK_SAFE_MAX_SECTORS,
    QueueLimits,
    blk_queue_max_hw_sectors,
    blk_queue_max_segments,
)
from mqrt.device import null_blk
from mqrt.device.nvme import nvme_max_hw_sectors, nvme_set_queue_limits
from mqrt.testing import Rig, ScriptOps
from mqrt.workers.ioengine import IoJob, JobSpec
from tests.helpers import scripted_rigs
from tests.test_nvme import run_nvme
from tests.test_runtime import assert_clean, run_nullb, totals

READ, WRITE = int(ReqOp.READ), int(ReqOp.WRITE)


def merge_setup(ops, *, flags=BlkMqFlag.SHOULD_MERGE, nomerges=0, depth=64, limits=None):
    def setup(layout, topology):
        tset = TagSet(ops=ops, nr_hw_queues=1, queue_depth=depth, flags=flags)
        alloc_tag_set(tset, layout, topology)
        q = init_queue(tset, layout, "q0", nomerges=nomerges)
        if limits is not None:
            limits(q)
        return ops, [q]

    return setup


@pytest.fixture
def rig_factory():
    with scripted_rigs(merge_setup) as make:
        yield make


def extents(ops) -> list[tuple[int, int, int]]:
    """(sector, nr_sectors, nr_bios) of every request the driver was given."""
    return [rq.setup()[1:4] for rq in ops.started]


def end_all(rig, ops) -> None:
    for rq in list(ops.started):
        rig.mq.end_request(rq)
    ops.started.clear()
    inv = check_invariants(rig.arena, rig.queues)
    assert inv["problems"] == [], inv


# -- plug merges ---------------------------------------------------------------------------


def test_the_seeds_three_requests_become_one_from_3_to_9(rig_factory):
    """The blk-mq article of the seeds: "if there are 3 requests for sectors 3-6, 6-7
    and 7-9, they can be merged into one request for 3-9".  Submitted 6-7 first, 3-6
    ends where it starts (bio_attempt_front_merge(): the request's start moves to 3),
    and 7-9 starts where it now ends (a back merge)."""
    rig, ops = rig_factory()
    mq, q = rig.mq, rig.mq.queues[0]
    mq.start_plug()
    mq.submit_bio(q, READ, 6, 1, 100)
    mq.submit_bio(q, READ, 3, 3, 200)
    mq.submit_bio(q, READ, 7, 2, 300)
    mq.finish_plug()
    assert extents(ops) == [(3, 6, 3)]
    c = mq.counters()
    assert (c["bios"], c["requests"], c["read_merges"], c["write_merges"]) == (3, 1, 2, 0)
    end_all(rig, ops)
    # Each bio completes once, with its own start: the request's is its first bio's
    # (6-7, at 100); the two merged into it come with theirs, oldest first.
    ((cpu, qi, info),) = rig.sys.done
    op, nr_bios, nbytes, start, _io_start, status, chain = info
    assert (cpu, qi, op, nr_bios, nbytes, start, status) == (0, 0, READ, 3, 6 * 512, 100, 0)
    assert chain == ((200, 3), (300, 2))
    assert mq.counters()["open_bio_chains"] == 0


def test_a_front_merged_request_times_each_bio_from_its_own_submission(rig_factory):
    """blk_mq_end_request() completes every bio of the request (req_bio_endio()): the
    job counts three I/Os of one request, each timed from its own start, and the
    device's view (diskstats) one request and two merges."""
    rig, ops = rig_factory()
    mq, q = rig.mq, rig.mq.queues[0]
    job = IoJob(JobSpec.from_options({"rw": "read"}), 0, 0, 1 << 30, 0)
    mq.end_io, mq.end_io_merged = [job.done], [job.done_merged]
    mq.start_plug()
    for sector, nr, start in ((6, 1, 1_000), (3, 3, 5_000), (7, 2, 9_000)):
        job.inflight += 1
        mq.submit_bio(q, READ, sector, nr, start)
    mq.finish_plug()
    assert len(ops.started) == 1
    mq.clock = lambda: 20_000
    end_all(rig, ops)
    job.fold()
    d = job.dirs[READ]
    assert (d.ios, d.requests, d.nbytes, job.inflight) == (3, 1, 6 * 512, 0)
    assert (d.lat.n, d.lat.min, d.lat.max) == (3, 20_000 - 9_000, 20_000 - 1_000)
    assert d.ticks_ns == 20_000 - 1_000  # the request, from its first bio's start


def test_a_bio_merges_into_an_older_plugged_request(rig_factory):
    """5.10's blk_attempt_plug_merge() walks the whole plug list, newest first
    (list_for_each_entry_reverse): a bio adjacent to a request plugged before others
    still merges into it."""
    rig, ops = rig_factory()
    mq, q = rig.mq, rig.mq.queues[0]
    mq.start_plug()
    mq.submit_bio(q, READ, 0, 8, 0)
    mq.submit_bio(q, READ, 1000, 8, 0)
    mq.submit_bio(q, READ, 2000, 8, 0)
    mq.submit_bio(q, READ, 8, 8, 0)  # behind the oldest
    mq.submit_bio(q, READ, 992, 8, 0)  # in front of the middle one
    mq.finish_plug()
    assert extents(ops) == [(0, 16, 2), (992, 16, 2), (2000, 8, 1)]
    end_all(rig, ops)


def test_the_newest_adjacent_plugged_request_takes_the_bio(rig_factory):
    """Two plugged requests end where the bio starts: the walk, newest first, merges
    it into the newer; the first that takes it ends the walk."""
    rig, ops = rig_factory()
    mq, q = rig.mq, rig.mq.queues[0]
    mq.start_plug()
    mq.submit_bio(q, READ, 0, 8, 0)
    mq.submit_bio(q, READ, 0, 8, 0)  # the same block again: not adjacent, a request
    mq.submit_bio(q, READ, 8, 8, 0)
    mq.finish_plug()
    assert extents(ops) == [(0, 8, 1), (0, 16, 2)]
    end_all(rig, ops)


def test_only_same_op_same_queue_requests_merge(rig_factory):
    """blk_rq_merge_ok(): the request and the bio must be of one op (data direction)."""
    rig, ops = rig_factory()
    mq, q = rig.mq, rig.mq.queues[0]
    mq.start_plug()
    mq.submit_bio(q, READ, 0, 8, 0)
    mq.submit_bio(q, WRITE, 8, 8, 0)
    mq.submit_bio(q, WRITE, 16, 8, 0)
    mq.finish_plug()
    assert extents(ops) == [(0, 8, 1), (8, 16, 2)]
    c = mq.counters()
    assert (c["read_merges"], c["write_merges"]) == (0, 1)
    end_all(rig, ops)


@pytest.mark.parametrize("nomerges", [1, 2])
def test_nomerges(rig_factory, nomerges):
    """queue/nomerges (Documentation/ABI/stable/sysfs-block): "When set to 1 only
    simple one-hit merges will be tried.  When set to 2 no merge algorithms will be
    tried".  The one-hit merge here is the newest plugged request."""
    rig, ops = rig_factory(nomerges=nomerges)
    mq, q = rig.mq, rig.mq.queues[0]
    mq.start_plug()
    mq.submit_bio(q, READ, 0, 8, 0)
    mq.submit_bio(q, READ, 1000, 8, 0)
    mq.submit_bio(q, READ, 1008, 8, 0)  # onto the newest: a one-hit merge
    mq.submit_bio(q, READ, 8, 8, 0)  # onto an older one: a full walk
    mq.finish_plug()
    if nomerges == 1:
        assert extents(ops) == [(0, 8, 1), (1000, 16, 2), (8, 8, 1)]
    else:
        assert [e[2] for e in extents(ops)] == [1, 1, 1, 1]
    end_all(rig, ops)


# -- limits --------------------------------------------------------------------------------


def test_default_limits_are_5_10s():
    """blk_set_default_limits() (5.10, the seeds' 000 document): max_segments =
    BLK_MAX_SEGMENTS (128), max_sectors = max_hw_sectors = BLK_SAFE_MAX_SECTORS (255)."""
    lim = QueueLimits()
    assert (lim.max_sectors, lim.max_hw_sectors, lim.max_segments) == (255, 255, 128)
    assert (BLK_SAFE_MAX_SECTORS, BLK_MAX_SEGMENTS, BLK_DEF_MAX_SECTORS) == (255, 128, 2560)


def test_blk_queue_max_hw_sectors_caps_the_soft_limit(rig_factory):
    """blk_queue_max_hw_sectors(): at least a page; max_sectors = min(max_hw_sectors,
    BLK_DEF_MAX_SECTORS)."""
    rig, _ops = rig_factory()
    q = rig.queues[0]
    blk_queue_max_hw_sectors(q, 8192)
    assert (q.limits.max_hw_sectors, q.limits.max_sectors) == (8192, 2560)
    blk_queue_max_hw_sectors(q, 4)
    assert (q.limits.max_hw_sectors, q.limits.max_sectors) == (8, 8)
    assert "blk_queue_max_hw_sectors: set to minimum 8" in q.tag_set.messages
    blk_queue_max_segments(q, 0)
    assert q.limits.max_segments == 1


def test_a_merge_never_grows_a_request_past_max_sectors(rig_factory):
    """ll_back_merge_fn(): blk_rq_sectors(req) + bio_sectors(bio) >
    blk_rq_get_max_sectors() refuses the merge and marks the request (req_set_nomerge):
    with 5.10's default of 255 sectors, 4 KiB bios fill a request at 31 (248 sectors),
    so 256 of them make nine requests."""
    rig, ops = rig_factory(depth=64)
    mq, q = rig.mq, rig.mq.queues[0]
    mq.start_plug()
    for i in range(256):
        mq.submit_bio(q, READ, 8 * i, 8, 0)
    mq.finish_plug()
    ext = extents(ops)
    assert [e[1] for e in ext] == [248] * 8 + [64]
    assert [e[0] for e in ext] == [248 * i for i in range(9)]
    assert all(rq.rq_flags & Rqf.NOMERGE for rq in ops.started[:8])
    end_all(rig, ops)


def test_a_merge_never_exceeds_max_segments(rig_factory):
    """ll_new_hw_segment(): req->nr_phys_segments + nr_phys_segs > max_segments
    refuses the merge.  A bio's segments are its pages: 512-byte bios are one each."""
    rig, ops = rig_factory(limits=lambda q: blk_queue_max_segments(q, 4))
    mq, q = rig.mq, rig.mq.queues[0]
    mq.start_plug()
    for i in range(10):
        mq.submit_bio(q, READ, i, 1, 0)
    mq.finish_plug()
    assert [(e[1], e[2]) for e in extents(ops)] == [(4, 4), (4, 4), (2, 2)]
    assert [rq.setup()[4] for rq in ops.started] == [4, 4, 2]  # nr_phys_segments
    end_all(rig, ops)


def test_nvme_caps_requests_at_what_mdts_allows(rig_factory):
    """nvme_init_identify(): max_hw_sectors = 1 << (mdts + page_shift - 9), at most
    the PCI driver's NVME_MAX_KB_SZ (4 MiB); nvme_set_queue_limits(): max_segments =
    max_hw_sectors / (NVME_CTRL_PAGE_SIZE >> 9) + 1, at most NVME_MAX_SEGS.  With
    MDTS 5 (128 KiB) 256 sequential 4 KiB bios make 8 requests of 256 sectors, not
    one of 2,048."""
    assert nvme_max_hw_sectors(0) == 8192 and nvme_max_hw_sectors(7) == 1024
    assert nvme_max_hw_sectors(5) == 256 and nvme_max_hw_sectors(12) == 8192
    rig, ops = rig_factory(limits=lambda q: nvme_set_queue_limits(q, nvme_max_hw_sectors(5)))
    lim = rig.queues[0].limits
    assert (lim.max_hw_sectors, lim.max_sectors, lim.max_segments) == (256, 256, 33)
    mq, q = rig.mq, rig.mq.queues[0]
    mq.start_plug()
    for i in range(256):
        mq.submit_bio(q, READ, 8 * i, 8, 0)
    mq.finish_plug()
    assert extents(ops) == [(256 * i, 256, 32) for i in range(8)]
    end_all(rig, ops)


@pytest.mark.parametrize(
    ("knobs", "max_sectors"),
    [({}, 255), ({"max_sectors": 1024}, 1024), ({"blocksize": 4096}, 248)],
)
def test_null_blk_sets_its_max_sectors(knobs, max_sectors):
    """null_add_dev(): dev->max_sectors, or the queue's max_hw_sectors when 0, at most
    BLK_DEF_MAX_SECTORS, through blk_queue_max_hw_sectors(); null_init_tag_set() sets
    BLK_MQ_F_SHOULD_MERGE."""
    cfg = null_blk.parse_config({"irqmode": 0, **knobs})
    rig = Rig(lambda layout, topology: null_blk.setup(cfg, layout, topology))
    try:
        (q,) = rig.queues
        assert q.limits.max_sectors == q.limits.max_hw_sectors == max_sectors
        assert q.tag_set.flags & BlkMqFlag.SHOULD_MERGE
        mq, queue = rig.mq, rig.mq.queues[0]
        mq.start_plug()
        for i in range(256):
            mq.submit_bio(queue, READ, 8 * i, 8, 0)
        mq.finish_plug()
        per_rq = max_sectors // 8
        assert mq.counters()["requests"] == -(-256 // per_rq)
    finally:
        rig.close()
    with pytest.raises(Exception, match="max_sectors"):
        null_blk.parse_config({"max_sectors": 2561})


# -- ctx-list merges -----------------------------------------------------------------------


def queued_on_the_ctx(rig, sectors):
    """Submit unplugged bios with the hw queue stopped: blk_mq_try_issue_directly()
    inserts them on the ctx's list, where they wait (not issued)."""
    mq, q = rig.mq, rig.mq.queues[0]
    mq.stop_hw_queues(q)
    for sector, nr in sectors:
        mq.submit_bio(q, READ, sector, nr, sector)
    return q


def run_queue(rig):
    q = rig.mq.queues[0]
    rig.mq.start_stopped_hw_queues(q, False)


def test_a_bio_merges_into_a_request_waiting_on_its_ctx(rig_factory):
    """__blk_mq_sched_bio_merge() -> blk_bio_list_merge() (5.10), for a queue with
    BLK_MQ_F_SHOULD_MERGE: "Reverse check our software queue for entries that we
    could potentially merge with", under ctx->lock; back and front merges."""
    rig, ops = rig_factory()
    q = queued_on_the_ctx(rig, [(100, 8), (500, 8)])
    rig.mq.submit_bio(q, READ, 108, 8, 1)  # behind the first
    rig.mq.submit_bio(q, READ, 492, 8, 2)  # in front of the second
    assert len(q.hctxs[0].ctx_lists[0]) == 2 and not ops.started
    assert rig.mq.stats["ctx_merges"] == 2
    run_queue(rig)
    assert extents(ops) == [(100, 16, 2), (492, 16, 2)]
    end_all(rig, ops)
    chains = sorted(info[6] for _cpu, _q, info in rig.sys.done)
    assert chains == [((1, 8),), ((2, 8),)]


class AllToZero(ScriptOps):
    """->map_queues that sends every CPU to hctx 0, leaving the others unmapped."""

    def map_queues(self, tset):
        tset.map[0].mq_map[:] = [0] * tset.nr_cpus


def test_merges_on_a_queue_with_unmapped_hctxs():
    """Ten CPUs on hctx 0 of three (hctxs 1 and 2 unmapped: no tags): CPU 9's ctx is
    index_hw 9, in the second word of hctx 0's ctx_map (8 ctxs a word), and its bios
    merge in its plug and into the request waiting on its ctx list."""
    ops = AllToZero()

    def setup(layout, topology):
        tset = TagSet(ops=ops, nr_hw_queues=3, queue_depth=8, flags=BlkMqFlag.SHOULD_MERGE)
        alloc_tag_set(tset, layout, topology)
        return ops, [init_queue(tset, layout, "q0")]

    rig = Rig(setup, nr_cpus=10, cpu=9, on_cpus=[9])
    try:
        mq = rig.mq
        q = mq.queues[0]
        assert [h.tags is None for h in q.hctxs] == [False, True, True]
        mq.start_plug()
        mq.submit_bio(q, READ, 100, 8, 0)
        mq.submit_bio(q, READ, 108, 8, 1)  # a plug back merge
        mq.finish_plug()
        mq.stop_hw_queues(q)
        mq.submit_bio(q, READ, 300, 8, 2)  # waits on CPU 9's ctx list
        assert q.hctxs[0].pending_bit(9) == (q.hctxs[0]._ctx_words[1], 1)
        assert q.hctxs[0].busy_ctxs() == [9]
        mq.submit_bio(q, READ, 292, 8, 3)  # a ctx front merge
        assert mq.stats["ctx_merges"] == 1
        mq.start_stopped_hw_queues(q, False)
        assert extents(ops) == [(100, 16, 2), (292, 16, 2)]
        end_all(rig, ops)
        assert sorted(info[6] for _cpu, _q, info in rig.sys.done) == [((1, 8),), ((3, 8),)]
    finally:
        rig.close()


def test_ctx_merges_need_should_merge(rig_factory):
    """Without BLK_MQ_F_SHOULD_MERGE (hctx->flags) the ctx list is not looked at."""
    rig, ops = rig_factory(flags=BlkMqFlag(0))
    queued_on_the_ctx(rig, [(100, 8), (108, 8)])
    run_queue(rig)
    assert extents(ops) == [(100, 8, 1), (108, 8, 1)]
    end_all(rig, ops)


def test_ctx_merges_look_at_the_newest_8_requests(rig_factory):
    """blk_bio_list_merge(): "a hand-wavy stop count of 8": a bio adjacent only to the
    ninth newest request waiting there does not merge."""
    rig, ops = rig_factory()
    q = queued_on_the_ctx(rig, [(1000 * i, 8) for i in range(9)])
    rig.mq.submit_bio(q, READ, 1008, 8, 0)  # behind the 8th from the tail
    rig.mq.submit_bio(q, READ, 8, 8, 0)  # behind the oldest, the 9th from the tail
    run_queue(rig)
    assert [e[2] for e in extents(ops)] == [1, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    assert extents(ops)[-1] == (8, 8, 1)
    end_all(rig, ops)


def test_the_first_adjacent_ctx_request_decides(rig_factory):
    """blk_bio_list_merge(): the newest request the bio is adjacent to decides: past
    a limit, no merge (and it is marked REQ_NOMERGE), and no older one is tried."""
    rig, ops = rig_factory(limits=lambda q: blk_queue_max_hw_sectors(q, 16))
    q = queued_on_the_ctx(rig, [(0, 8), (100, 16)])
    rig.mq.submit_bio(q, READ, 8, 8, 0)  # -> (0, 16): full
    rig.mq.submit_bio(q, READ, 116, 8, 0)  # (100, 16) is full: a request of its own
    assert rig.mq.stats["ctx_merges"] == 1
    run_queue(rig)
    assert extents(ops) == [(0, 16, 2), (100, 16, 1), (116, 8, 1)]
    assert ops.started[1].rq_flags & Rqf.NOMERGE
    end_all(rig, ops)


def test_a_dispatched_request_is_no_longer_a_merge_target(rig_factory):
    """The ordering of the request setup block (docs/ARCHITECTURE.md): a request is
    grown only under its ctx list's lock while it is still on the list; once a run
    has taken it off (under the same lock) a bio adjacent to it is a request of its
    own."""
    rig, ops = rig_factory(nr_cpus=2)
    q = queued_on_the_ctx(rig, [(100, 8)])
    rig.mqs[1].start_stopped_hw_queues(rig.mqs[1].queues[0], False)  # CPU 1 dispatches it
    assert extents(ops) == [(100, 8, 1)]
    rig.mq.submit_bio(q, READ, 108, 8, 0)
    assert extents(ops) == [(100, 8, 1), (108, 8, 1)] and rig.mq.stats["ctx_merges"] == 0
    end_all(rig, ops)


def test_merged_bios_end_on_their_submitter_after_a_remote_completion(rig_factory):
    """A merged request that ends on another CPU hands its bios back to the CPU that
    submitted them (the IPI carries the request and its generation), which still
    holds their chain; a request reused meanwhile, with a chain of its own, keeps it."""
    rig, ops = rig_factory(nr_cpus=2, depth=1)
    mq0, q = rig.mqs[0], rig.mqs[0].queues[0]
    mq0.start_plug()
    mq0.submit_bio(q, READ, 0, 8, 10)
    mq0.submit_bio(q, READ, 8, 8, 20)
    mq0.finish_plug()
    (rq,) = ops.started
    rig.mqs[1].end_request(rq)  # ends on CPU 1
    ((cpu, qi, info),) = rig.cpus[1].done
    assert cpu == 0 and len(info) == 8 and info[1] == 2
    # CPU 0 reuses the same request (the only tag) and merges into it again before
    # the first completion reaches it.
    mq0.start_plug()
    mq0.submit_bio(q, READ, 800, 8, 30)
    mq0.submit_bio(q, READ, 808, 8, 40)
    mq0.finish_plug()
    assert ops.started[1].id == rq.id
    mq0.bios_done(qi, info, 50)
    assert rig.cpus[0].done[-1][2][6] == ((20, 8),)
    mq0.end_request(ops.started[1])
    assert rig.cpus[0].done[-1][2][6] == ((40, 8),)
    assert mq0.counters()["open_bio_chains"] == 0


# -- real CPUs, real controller ------------------------------------------------------------


def test_sequential_io_on_nvme_keeps_requests_within_mdts():
    """On the controller process: Identify reports MDTS (the ``mdts`` knob), the probe
    sets the namespace's limits from it, and sequential I/O from two CPUs merges into
    requests of at most max_sectors, each bio completed on the CPU that submitted it
    (merged requests completed on the other CPU come back by IPI)."""
    result = run_nvme(rw="read", mdts=3, nr_io_queues=1, latency_ns=20_000, runtime=0.5)
    assert_clean(result)
    assert result.device["mdts"] == 3 and result.device["max_hw_sectors_kb"] == 32
    assert result.queues[0]["limits"]["max_sectors_kb"] == 32
    t = totals(result)
    assert t["read_merges"] > 0 and t["open_bio_chains"] == 0
    assert t["ios"] == t["submitted"]
    # 4 KiB bios, at most 64 sectors a request: at most 8 bios each.
    assert t["requests"] * 8 >= t["bios"]
    for c in result.cpus:
        for j in c["jobs"]:
            d = j["read"]
            assert d["ios"] - d["requests"] <= 7 * d["requests"]


def test_sequential_io_on_null_blk_merges_within_255_sectors():
    result = run_nullb(cpus=1, irqmode="none", rw="read", bs="4k", iodepth=32)
    assert_clean(result)
    t = totals(result)
    assert t["read_merges"] > 0 and t["requests"] * 31 >= t["bios"]
    assert t["open_bio_chains"] == 0


def test_nomerges_2_turns_merging_off_in_a_run():
    result = run_nullb(cpus=1, irqmode="none", rw="read", nomerges=2, runtime=0.2)
    assert_clean(result)
    t = totals(result)
    assert t["merges"] == 0 and t["requests"] == t["bios"]
    assert result.queues[0]["limits"]["nomerges"] == 2

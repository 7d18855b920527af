"""Tag set and queue setup: blk_mq_alloc_tag_set(), blk_mq_init_queue(), their tear-down,
the driver's set-up ops and null_blk's configuration, checked against Linux 5.10
(block/blk-mq.c, drivers/block/null_blk, drivers/nvme/host/pci.c); each test quotes
the kernel function or the seed line it checks.

alloc_tag_set() and init_queue() declare regions in a Layout (no shared memory); the
tests that need the arena build one in this process (mqrt.testing.Rig).
"""

from __future__ import annotations

import errno
import itertools

import numpy as np
import pytest

from mqrt.block.blk_mq_cpumap import HctxType, QueueMap, Topology, map_queues
from mqrt.block.blk_mq_debugfs import check_invariants
from mqrt.block.blk_mq_setup import (
    alloc_tag_set,
    cleanup_queue,
    free_tag_set,
    init_queue,
    init_shared,
    init_sq_queue,
)
from mqrt.block.blk_mq_structs import RQ_OFF_FLAGS, BlkMqError, TagSet, request_dtype
from mqrt.block.blk_mq_types import (
    BLK_MQ_MAX_DEPTH,
    BLK_MQ_NO_HCTX_IDX,
    BlkMqFlag,
    BlkMqOps,
    QueueFlag,
    ReqOp,
    Rqf,
    RqState,
)
from mqrt.device.null_blk import parse_config, setup
from mqrt.lib.knobs import KnobError
from mqrt.lib.shm import Layout
from mqrt.testing import Rig, ScriptOps

READ = int(ReqOp.READ)


class Ops(BlkMqOps):
    """The least a driver must give: ->queue_rq."""

    def queue_rq(self, mq, hctx, rq, last):
        return 0


class NoQueueRq(BlkMqOps):
    """No ->queue_rq at all."""


class GetBudgetOnly(Ops):
    def get_budget(self, q):
        return True


class PutBudgetOnly(Ops):
    def put_budget(self, q):
        pass


class BothBudgets(GetBudgetOnly, PutBudgetOnly):
    pass


class AllToZero(ScriptOps):
    """->map_queues that sends every CPU to hctx 0, leaving the others unmapped."""

    def map_queues(self, tset):
        tset.map[0].mq_map[:] = [0] * tset.nr_cpus


class HctxRecorder(ScriptOps):
    """ScriptOps that also records which CPU's block layer issued each request on
    which hctx: (mq, hctx index, rq) in :attr:`issued`."""

    def __init__(self) -> None:
        super().__init__()
        self.issued: list = []

    def queue_rq(self, mq, hctx, rq, last):
        ret = super().queue_rq(mq, hctx, rq, last)
        if not ret:
            self.issued.append((mq, hctx.index, rq))
        return ret


class OutOfRange(Ops):
    """->map_queues that sends CPU 0 to an hctx the set does not have."""

    def map_queues(self, tset):
        map_queues(tset.map[0], tset.topology)
        tset.map[0].mq_map[0] = tset.nr_hw_queues


class ReadPollMap(Ops):
    """Three maps: DEFAULT hctx 0-1, READ hctx 2, POLL hctx 3."""

    def map_queues(self, tset):
        for i, (nr, off) in enumerate([(2, 0), (1, 2), (1, 3)]):
            tset.map[i] = QueueMap(nr, off)
            map_queues(tset.map[i], tset.topology)


def make_set(nr_cpus: int = 4, **kw) -> TagSet:
    """An allocated tag set on ``nr_cpus`` emulated CPUs (2 threads per core)."""
    kw.setdefault("ops", Ops())
    kw.setdefault("nr_hw_queues", 2)
    kw.setdefault("queue_depth", 64)
    return alloc_tag_set(TagSet(**kw), Layout(), Topology.emulated(nr_cpus, 2))


# -- blk_mq_alloc_tag_set(): validation -----------------------------------------------


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"nr_hw_queues": 0}, "nr_hw_queues"),  # !set->nr_hw_queues
        ({"queue_depth": 0}, "queue_depth"),  # !set->queue_depth
        ({"queue_depth": 4, "reserved_tags": 4}, "reserved_tags"),  # < reserved + TAG_MIN
        ({"ops": NoQueueRq()}, "queue_rq"),  # !set->ops->queue_rq
        ({"ops": GetBudgetOnly()}, "get_budget"),  # !get_budget ^ !put_budget
        ({"ops": PutBudgetOnly()}, "get_budget"),
        ({"nr_maps": 4}, "nr_maps"),  # nr_maps > HCTX_MAX_TYPES
    ],
)
def test_alloc_tag_set_einval(kw, field):
    """blk_mq_alloc_tag_set() returns -EINVAL, naming the bad field."""
    with pytest.raises(BlkMqError) as exc:
        make_set(**kw)
    msg = str(exc.value)
    assert msg.startswith("EINVAL: ")
    assert field in msg


def test_depth_equal_to_reserved_plus_min_is_accepted():
    """queue_depth == reserved_tags + BLK_MQ_TAG_MIN is the smallest legal depth."""
    tset = make_set(queue_depth=5, reserved_tags=4)
    assert tset.queue_depth == 5
    assert tset.tags[0].bitmap_tags.sb.depth == 1


def test_both_budget_ops_are_accepted():
    """get_budget and put_budget together are fine."""
    assert make_set(ops=BothBudgets()).tags


def test_depth_above_max_is_capped():
    """queue_depth > BLK_MQ_MAX_DEPTH: pr_info and capped to 10240."""
    tset = make_set(nr_hw_queues=1, queue_depth=BLK_MQ_MAX_DEPTH + 1, pool_limit_bytes=1 << 40)
    assert tset.queue_depth == 10240
    assert "blk-mq: reduced tag depth to 10240" in tset.messages


def test_nr_maps_zero_becomes_one():
    """!set->nr_maps -> nr_maps = 1."""
    tset = make_set(nr_maps=0)
    assert tset.nr_maps == 1
    assert len(tset.map) == 1


def test_nr_hw_queues_capped_at_nr_cpus_with_one_map():
    """nr_maps == 1 && nr_hw_queues > nr_cpu_ids -> nr_hw_queues = nr_cpu_ids."""
    tset = make_set(nr_cpus=4, nr_hw_queues=9)
    assert tset.nr_hw_queues == 4
    assert len(tset.tags) == 4
    assert tset.map[HctxType.DEFAULT].nr_queues == 4
    assert any("nr_hw_queues" in m and "4" in m for m in tset.messages)


def test_nr_hw_queues_not_capped_with_several_maps():
    """The nr_cpu_ids cap only applies to a single map."""
    tset = make_set(nr_cpus=2, nr_hw_queues=4, nr_maps=3, ops=ReadPollMap())
    assert tset.nr_hw_queues == 4
    assert len(tset.tags) == 4


def test_several_maps_need_map_queues():
    """BUG_ON(set->nr_maps > 1) without ->map_queues: refused."""
    with pytest.raises(BlkMqError, match="map_queues"):
        make_set(nr_maps=2)


def test_map_queues_out_of_range_is_refused():
    """A driver map sending a CPU past nr_hw_queues is an error, not a wild pointer."""
    with pytest.raises(BlkMqError, match="outside"):
        make_set(ops=OutOfRange())


def test_default_map_is_blk_mq_map_queues():
    """Without ->map_queues, blk_mq_map_queues() on DEFAULT (siblings share a queue)."""
    tset = make_set(nr_cpus=8, nr_hw_queues=3)
    # Step 1: CPUs 0-2 -> 0,1,2; step 2: first siblings 4, 6 round robin; 3,5,7 copy.
    assert tset.map[0].mq_map == [0, 1, 2, 2, 0, 0, 1, 1]


# -- blk_mq_alloc_map_and_requests(): tags and the request pool ------------------------


@pytest.mark.parametrize("reserved", [0, 3])
def test_tags_per_hctx(reserved):
    """One blk_mq_tags per hctx: depth - reserved normal tags, reserved bitmap if any."""
    tset = make_set(nr_hw_queues=3, queue_depth=32, reserved_tags=reserved)
    assert len(tset.tags) == 3
    for i, tags in enumerate(tset.tags):
        assert tags.nr_tags == 32
        assert tags.bitmap_tags.sb.depth == 32 - reserved
        assert (tags.breserved_tags is not None) == (reserved > 0)
        assert tags.rq_base == i * 32
        assert tset.tags_for(i) is tags
    assert tset.rq_region.count == 3 * 32


def test_shared_hctx_tags():
    """BLK_MQ_F_TAG_HCTX_SHARED: one tags for the whole set, every hctx uses it."""
    tset = make_set(nr_hw_queues=3, queue_depth=32, flags=BlkMqFlag.TAG_HCTX_SHARED)
    assert len(tset.tags) == 1
    assert all(tset.tags_for(h) is tset.tags[0] for h in range(3))
    assert tset.rq_region.count == 32


# -- BLK_MQ_F_TAG_HCTX_SHARED: the 5.10 and 6.x models ------------------------------------


def shared_set(model: str, nr_hw_queues: int = 4, queue_depth: int = 64, **kw) -> TagSet:
    return make_set(
        nr_hw_queues=nr_hw_queues,
        queue_depth=queue_depth,
        flags=BlkMqFlag.TAG_HCTX_SHARED,
        shared_tag_model=model,
        **kw,
    )


def test_shared_sbitmap_5_10_per_hctx_requests_on_one_bitmap():
    """Linux 5.10: __blk_mq_alloc_rq_maps() gives every hctx its tags and requests
    ("set->tags[hctx_idx] = blk_mq_alloc_rq_map(set, hctx_idx, set->queue_depth, ...)",
    blk_mq_alloc_rqs() of depth), and blk_mq_init_tags() leaves their bitmaps to the
    set ("if (flags & BLK_MQ_F_TAG_HCTX_SHARED) return tags;"), which
    blk_mq_init_shared_sbitmap() then fills in: "tags->bitmap_tags =
    &set->__bitmap_tags; tags->breserved_tags = &set->__breserved_tags;", with
    "depth = set->queue_depth - set->reserved_tags".  4 hctxs x depth 64: 256
    requests on one bitmap of 64 tags."""
    tset = shared_set("5.10", reserved_tags=2)
    assert tset.shared_sbitmap and not tset.single_tags
    shared = tset.shared_sbitmap_tags
    assert shared is not None
    assert len(tset.tags) == 4
    assert tset.rq_region.count == 4 * 64 == 256
    for h, tags in enumerate(tset.tags):
        assert tset.tags_for(h) is tags
        assert tags.index == h and tags.rq_base == h * 64 and tags.nr_tags == 64
        assert tags.bitmap_tags == shared.bitmap_tags  # &set->__bitmap_tags
        assert tags.breserved_tags == shared.breserved_tags  # &set->__breserved_tags
        assert tags.header == shared.header  # set->active_queues_shared_sbitmap
    assert shared.bitmap_tags.sb.depth == 64 - 2
    assert shared.breserved_tags is not None and shared.breserved_tags.sb.depth == 2


def test_shared_tags_6x_one_tags_and_one_pool():
    """Linux 6.x: blk_mq_alloc_set_map_and_rqs() with blk_mq_is_shared_tags() allocates
    one ``set->shared_tags`` of queue_depth and every hctx uses it: 4 hctxs x depth
    64 give 64 requests."""
    tset = shared_set("6.x")
    assert tset.single_tags and not tset.shared_sbitmap
    assert tset.shared_sbitmap_tags is None
    assert len(tset.tags) == 1
    assert all(tset.tags_for(h) is tset.tags[0] for h in range(4))
    assert tset.rq_region.count == 64
    assert TagSet(ops=Ops(), nr_hw_queues=1, queue_depth=8).shared_tag_model == "6.x"


@pytest.mark.parametrize(("model", "depth"), [("5.10", 16), ("6.x", 64)])
def test_shared_tag_models_halve_depth_differently(model, depth):
    """blk_mq_alloc_map_and_requests(): "err = __blk_mq_alloc_rq_maps(set); ...
    set->queue_depth >>= 1;" while the allocation fails.  5.10 allocates a pool of
    queue_depth for each of the 4 hctxs, so a limit of 64 requests halves 64 -> 16
    (4 x 16); 6.x allocates one pool of queue_depth, which fits at 64.  5.10 sizes
    the shared bitmap afterwards, from the halved "set->queue_depth"."""
    size = request_dtype(0).itemsize
    tset = shared_set(model, pool_limit_bytes=64 * size)
    assert tset.queue_depth == depth
    assert ("blk-mq: reduced tag depth (64 -> 16)" in tset.messages) == (model == "5.10")
    assert tset.rq_region.count == 64
    for tags in tset.tags:
        assert tags.nr_tags == depth and tags.bitmap_tags.sb.depth == depth


def test_shared_tag_model_is_checked():
    """An unknown shared_tag_model is -EINVAL, naming the field."""
    with pytest.raises(BlkMqError, match="EINVAL: shared_tag_model"):
        shared_set("4.19")


def test_shared_sbitmap_5_10_init_request_per_hctx():
    """5.10 calls ->init_request for every request of every hctx with its hctx_idx
    (blk_mq_alloc_rqs(set, tags, hctx_idx, depth)); 6.x once per request of the
    shared tags with BLK_MQ_NO_HCTX_IDX."""
    ops = ScriptOps()
    shared_set("5.10", nr_hw_queues=2, queue_depth=4, ops=ops)
    assert ops.calls_of("init_request") == [(h, t) for h in range(2) for t in range(4)]
    ops = ScriptOps()
    shared_set("6.x", nr_hw_queues=2, queue_depth=4, ops=ops)
    assert ops.calls_of("init_request") == [(BLK_MQ_NO_HCTX_IDX, t) for t in range(4)]


@pytest.mark.parametrize("model", ["5.10", "6.x"])
def test_shared_tags_unique_across_hctxs(rigs, model):
    """One tag space for every hctx: CPUs on 4 different hctxs together get each of
    the depth's tags once, and no more; in 5.10 "tags->bitmap_tags =
    &set->__bitmap_tags" makes tag t of hctx h the request at hctx h's pool[t] (id
    h * depth + t), in 6.x it is request t of the one pool.  Every request ends,
    and the invariant check finds the bitmap and the pools clean."""
    depth = 8
    rec = HctxRecorder()
    setup_fn = rig_setup(
        rec, nr_hw_queues=4, depth=depth, flags=BlkMqFlag.TAG_HCTX_SHARED, shared_tag_model=model
    )
    rig = rigs(setup_fn, nr_cpus=4, on_cpus=[0, 1, 2, 3])
    q = rig.queues[0]
    cpus_by_hctx: dict[int, int] = {}
    for cpu in range(4):
        cpus_by_hctx.setdefault(q.ctx_hctx[cpu][HctxType.DEFAULT], cpu)
    assert len(cpus_by_hctx) >= 2  # the emulated topology spreads 4 CPUs over hctxs
    per = depth // len(cpus_by_hctx)
    for cpu in cpus_by_hctx.values():
        mq = rig.mqs[cpu]
        for i in range(per):
            mq.submit_bio(mq.queues[0], READ, 8 * (64 * cpu + i), 8, 0)
    got = [(h, rq.tag, rq.id) for _mq, h, rq in rec.issued]
    assert len(got) == per * len(cpus_by_hctx)
    assert len({tag for _h, tag, _id in got}) == len(got)  # one bitmap: no tag twice
    for h, tag, rq_id in got:
        assert rq_id == (h * depth + tag if model == "5.10" else tag)
    tags = rig.mqs[0].queues[0].hctxs[0].tags
    if len(got) == depth:
        assert tags.bitmap_tags.sb.get() == -1  # every hctx's tags are in use
    for mq, _h, rq in rec.issued:
        mq.end_request(rq)
    inv = check_invariants(rig.arena, rig.queues)
    assert inv["problems"] == [] and inv["leaked_tags"] == 0, inv


@pytest.mark.parametrize("model", ["5.10", "6.x"])
def test_shared_tags_fair_share_counts_active_queues_per_set(rigs, model):
    """5.10 hctx_may_queue(): "if (blk_mq_is_sbitmap_shared(hctx->flags)) { ... if
    (!test_bit(QUEUE_FLAG_HCTX_ACTIVE, &q->queue_flags)) return true; users =
    atomic_read(&set->active_queues_shared_sbitmap);" -- the active queues are
    counted once per queue and per set, whichever hctx they use (6.x: the shared
    tags' active_queues).  Two queues busy on different hctxs: every hctx's tags
    see 2 users and a fair share of half the depth."""
    depth = 16
    rec = HctxRecorder()
    setup_fn = rig_setup(
        rec,
        nr_hw_queues=4,
        depth=depth,
        nr_queues=2,
        flags=BlkMqFlag.TAG_HCTX_SHARED,
        shared_tag_model=model,
    )
    rig = rigs(setup_fn, nr_cpus=4, on_cpus=[0, 1, 2, 3])
    q0 = rig.queues[0]
    cpu_a = 0
    cpu_b = next(
        c for c in range(4) if q0.ctx_hctx[c][HctxType.DEFAULT] != q0.ctx_hctx[0][HctxType.DEFAULT]
    )
    rig.mqs[cpu_a].submit_bio(rig.mqs[cpu_a].queues[0], READ, 0, 8, 0)
    rig.mqs[cpu_b].submit_bio(rig.mqs[cpu_b].queues[1], READ, 0, 8, 0)
    for queue in rig.mqs[cpu_a].queues:
        for hctx in queue.hctxs:
            assert hctx.tags is not None
            assert hctx.tags.active_queues == 2
            assert hctx.tags.fair_share() == depth // 2
    for mq, _h, rq in rec.issued:
        mq.end_request(rq)
    inv = check_invariants(rig.arena, rig.queues)
    assert inv["problems"] == [], inv


def test_null_blk_shared_tag_model():
    """null_blk's shared_tag_model picks the model of shared_tag_bitmap (6.x by
    default): 4 submit queues of depth 64 give 256 requests (5.10) or 64 (6.x)."""
    for given, model, nr_rqs in [({}, "6.x", 64), ({"shared_tag_model": "5.10"}, "5.10", 256)]:
        cfg = parse_config({"submit_queues": 4, "shared_tag_bitmap": 1, **given})
        _, (q,) = setup(cfg, Layout(), Topology.emulated(4))
        assert q.tag_set.shared_tag_model == model
        assert q.tag_set.rq_region.count == nr_rqs
    with pytest.raises(KnobError):
        parse_config({"shared_tag_model": "5.4"})


def test_pool_too_big_halves_depth():
    """-ENOMEM from the rq maps halves queue_depth until it fits, with pr_info."""
    size = request_dtype(0).itemsize
    tset = make_set(nr_hw_queues=2, queue_depth=64, pool_limit_bytes=2 * 16 * size)
    assert tset.queue_depth == 16
    assert "blk-mq: reduced tag depth (64 -> 16)" in tset.messages
    assert tset.rq_region.count == 2 * 16
    assert tset.tags[0].bitmap_tags.sb.depth == 16


def test_pool_fitting_keeps_depth_silently():
    """A pool that fits is allocated at the asked depth, no message."""
    tset = make_set(nr_hw_queues=2, queue_depth=64, pool_limit_bytes=1 << 30)
    assert tset.queue_depth == 64
    assert not any("reduced" in m for m in tset.messages)


def test_pool_never_fits_is_enomem():
    """Halving below reserved_tags + BLK_MQ_TAG_MIN: -ENOMEM."""
    size = request_dtype(0).itemsize
    with pytest.raises(BlkMqError) as exc:
        make_set(nr_hw_queues=1, queue_depth=64, reserved_tags=8, pool_limit_bytes=4 * size)
    assert str(exc.value).startswith("ENOMEM")


def test_alloc_twice_is_refused():
    """An allocated set cannot be allocated again."""
    tset = make_set()
    with pytest.raises(BlkMqError):
        alloc_tag_set(tset, Layout(), Topology.emulated(4))


# -- blk_mq_init_queue(): ctx -> hctx map ----------------------------------------------


def test_init_queue_maps_ctxs():
    """blk_mq_map_swqueue(): each CPU's ctx -> hctx per type, hctx cpumasks."""
    tset = make_set(nr_cpus=4, nr_hw_queues=2)
    q = init_queue(tset, Layout(), "q0")
    assert q.nr_hw_queues == 2
    mq_map = tset.map[0].mq_map
    for cpu in range(4):
        # READ and POLL alias DEFAULT on a single-map set.
        assert q.ctx_hctx[cpu] == [mq_map[cpu]] * 3
    for h in range(2):
        assert q.hctx_cpus[h] == [c for c in range(4) if mq_map[c] == h]
        assert q.mapped(h)
    assert sorted(c for cpus in q.hctx_cpus for c in cpus) == [0, 1, 2, 3]


def test_init_queue_three_maps():
    """Each type looks up its own map; hctxs take their map's type."""
    tset = make_set(nr_cpus=4, nr_hw_queues=4, nr_maps=3, ops=ReadPollMap())
    q = init_queue(tset, Layout(), "q0")
    for cpu in range(4):
        assert q.ctx_hctx[cpu][HctxType.DEFAULT] in (0, 1)
        assert q.ctx_hctx[cpu][HctxType.READ] == 2
        assert q.ctx_hctx[cpu][HctxType.POLL] == 3
    assert q.hctx_type == [HctxType.DEFAULT, HctxType.DEFAULT, HctxType.READ, HctxType.POLL]
    assert q.hctx_cpus[2] == q.hctx_cpus[3] == [0, 1, 2, 3]


def test_unmapped_hctx_has_empty_cpumask():
    """An hctx no CPU maps to: empty cpumask, blk_mq_hw_queue_mapped() false."""
    tset = make_set(nr_cpus=4, nr_hw_queues=3, ops=AllToZero())
    q = init_queue(tset, Layout(), "q0")
    assert q.hctx_cpus == [[0, 1, 2, 3], [], []]
    assert q.mapped(0)
    assert not q.mapped(1)
    assert not q.mapped(2)


def test_init_hctx_called_for_every_hctx():
    """blk_mq_init_hctx() runs ->init_hctx for each of nr_hw_queues, mapped or not."""
    ops = AllToZero()
    tset = make_set(nr_cpus=4, nr_hw_queues=3, ops=ops)
    init_queue(tset, Layout(), "q0")
    assert ops.calls_of("init_hctx") == [(0, -1), (1, -1), (2, -1)]


def test_init_queue_on_unallocated_set():
    """A queue needs an allocated tag set."""
    tset = TagSet(ops=Ops(), nr_hw_queues=1, queue_depth=8)
    with pytest.raises(BlkMqError):
        init_queue(tset, Layout(), "q0")


@pytest.mark.parametrize("rq_affinity", [-1, 3])
def test_bad_rq_affinity(rq_affinity):
    """queue/rq_affinity accepts 0, 1 or 2 only."""
    with pytest.raises(BlkMqError, match="rq_affinity"):
        init_queue(make_set(), Layout(), "q0", rq_affinity=rq_affinity)


def test_init_sq_queue():
    """blk_mq_init_sq_queue(): a one-hctx set and its queue."""
    q = init_sq_queue(Ops(), 16, BlkMqFlag(0), Layout(), Topology.emulated(4))
    assert q.nr_hw_queues == 1
    assert q.tag_set.nr_hw_queues == 1
    assert q.tag_set.queue_depth == 16
    assert q.hctx_cpus == [[0, 1, 2, 3]]
    assert q.tag_set.tag_list == [q]


# -- TAG_QUEUE_SHARED and teardown -----------------------------------------------------


def test_second_queue_makes_set_shared():
    """blk_mq_add_queue_tag_set(): the second user sets BLK_MQ_F_TAG_QUEUE_SHARED."""
    tset, layout = make_set(), Layout()
    q0 = init_queue(tset, layout, "q0")
    assert not q0.shared
    assert not tset.flags & BlkMqFlag.TAG_QUEUE_SHARED
    q1 = init_queue(tset, layout, "q1")
    assert tset.flags & BlkMqFlag.TAG_QUEUE_SHARED
    assert q0.shared and q1.shared
    assert tset.tag_list == [q0, q1]
    # queue_set_hctx_shared(): every hctx of both queues carries the flag
    assert all(h.flags & BlkMqFlag.TAG_QUEUE_SHARED for q in (q0, q1) for h in q.hctxs)


def test_cleanup_leaves_one_user_unshared():
    """blk_mq_del_queue_tag_set(): back to one user clears TAG_QUEUE_SHARED."""
    tset, layout = make_set(), Layout()
    qs = [init_queue(tset, layout, f"q{i}") for i in range(3)]
    cleanup_queue(qs[0])
    assert qs[1].shared  # two users left
    cleanup_queue(qs[1])
    assert not qs[2].shared
    assert not tset.flags & BlkMqFlag.TAG_QUEUE_SHARED
    assert not any(h.flags & BlkMqFlag.TAG_QUEUE_SHARED for h in qs[2].hctxs)
    assert tset.tag_list == [qs[2]]


def test_free_tag_set_busy_then_free():
    """Freeing a set with queues attached is EBUSY; after cleanup it frees."""
    tset = make_set()
    q = init_queue(tset, Layout(), "q0")
    with pytest.raises(BlkMqError) as exc:
        free_tag_set(tset)
    assert str(exc.value).startswith("EBUSY")
    assert tset.tags  # untouched
    cleanup_queue(q)
    free_tag_set(tset)
    assert not tset.tags
    assert tset.rq_region is None
    with pytest.raises(BlkMqError):
        init_queue(tset, Layout(), "q0")


# -- null_blk ---------------------------------------------------------------------------


def test_null_blk_defaults():
    """null_blk's module parameter defaults."""
    cfg = parse_config({})
    assert cfg.submit_queues == 1
    assert cfg.hw_queue_depth == 64
    assert cfg.irqmode == 1  # NULL_IRQ_SOFTIRQ
    assert cfg.completion_nsec == 10_000
    assert cfg.blocking is False
    assert cfg.shared_tags is False
    assert cfg.shared_tag_bitmap is False
    assert cfg.mbps == 0


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ({"irqmode": "fast"}, ["irqmode", "none|softirq|timer"]),
        ({"hw_queue_depth": 0}, ["hw_queue_depth", "1..65536"]),
        ({"timeout": "1,200,0,1"}, ["timeout"]),
        ({"frobnicate": 1}, ["unknown option", "frobnicate"]),
    ],
)
def test_null_blk_bad_knobs(given, words):
    """A bad module parameter is a one-line KnobError naming it and what is allowed."""
    with pytest.raises(KnobError) as exc:
        parse_config(given)
    msg = str(exc.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg


def test_null_blk_dashes():
    """Knob names take dashes: completion-nsec == completion_nsec."""
    assert parse_config({"completion-nsec": "5"}).completion_nsec == 5


@pytest.mark.parametrize("shared_tags", [True, False])
def test_null_blk_shared_tags(shared_tags):
    """shared_tags: one tag set for every device, which then is TAG_QUEUE_SHARED."""
    cfg = parse_config({"nr_devices": 2, "shared_tags": shared_tags})
    _, qs = setup(cfg, Layout(), Topology.emulated(4))
    assert len(qs) == 2
    if shared_tags:
        assert qs[0].tag_set is qs[1].tag_set
        assert qs[0].tag_set.flags & BlkMqFlag.TAG_QUEUE_SHARED
        assert qs[0].shared and qs[1].shared
    else:
        assert qs[0].tag_set is not qs[1].tag_set
        assert not qs[0].shared and not qs[1].shared


def test_null_blk_shared_tag_bitmap():
    """shared_tag_bitmap: BLK_MQ_F_TAG_HCTX_SHARED, one tags for all hctxs."""
    cfg = parse_config({"submit_queues": 4, "shared_tag_bitmap": 1})
    _, (q,) = setup(cfg, Layout(), Topology.emulated(4))
    assert q.tag_set.shared_tags
    assert len(q.tag_set.tags) == 1


def test_null_blk_poll_queues():
    """null_map_queues(): DEFAULT = submit_queues, READ empty, POLL after DEFAULT."""
    cfg = parse_config({"submit_queues": 2, "poll_queues": 1})
    _, (q,) = setup(cfg, Layout(), Topology.emulated(4))
    tset = q.tag_set
    assert tset.nr_maps == 3
    assert tset.nr_hw_queues == 3
    assert tset.map[HctxType.DEFAULT].nr_queues == 2
    assert tset.map[HctxType.READ].nr_queues == 0
    assert tset.map[HctxType.POLL].nr_queues == 1
    assert tset.map[HctxType.POLL].queue_offset == 2
    assert all(q.ctx_hctx[cpu][HctxType.POLL] == 2 for cpu in range(4))
    assert q.hctx_type[2] == HctxType.POLL


def test_null_blk_submit_queues_capped():
    """null_init(): submit_queues > nr_cpu_ids is capped at nr_cpu_ids."""
    cfg = parse_config({"submit_queues": 8})
    _, (q,) = setup(cfg, Layout(), Topology.emulated(4))
    assert q.nr_hw_queues == 4
    assert all(q.mapped(h) for h in range(4))


def test_null_blk_submit_queues_capped_with_poll_queues():
    """null_init(): the submit_queues cap holds with poll queues too."""
    cfg = parse_config({"submit_queues": 8, "poll_queues": 1})
    _, (q,) = setup(cfg, Layout(), Topology.emulated(4))
    tset = q.tag_set
    assert tset.map[HctxType.DEFAULT].nr_queues == 4
    assert tset.nr_hw_queues == 5
    assert tset.map[HctxType.POLL].queue_offset == 4


def test_null_blk_init_hctx_fault():
    """null_init_hctx() returning -EFAULT (fault "1,100,0,1") fails the device as
    blk_mq_init_allocated_queue() does, -ENOMEM, naming the driver's errno."""
    cfg = parse_config({"init_hctx": "1,100,0,1"})
    with pytest.raises(BlkMqError) as exc:
        setup(cfg, Layout(), Topology.emulated(2))
    assert str(exc.value) == "ENOMEM: nullb0: init_hctx failed for hctx 0 (EFAULT)"


def test_request_layout_is_declared_once():
    """The hot paths' structs and offsets are derived from the request's dtype: what
    numpy writes by field name, the structs read back at the derived offsets."""
    from mqrt.block import blk_mq_structs as s

    rq = np.zeros(1, s.REQUEST)
    values = {
        "deadline_ns": 11, "io_start_time_ns": 12, "start_time_ns": 13, "sector": 14,
        "nr_sectors": 15, "nr_bios": 16, "nr_phys_segments": 17, "cpu": 257, "hctx": 18,
        "q": 19, "op": 1, "rq_flags": 21, "status": -22, "issue_time_ns": 23,
    }  # fmt: skip
    for name, v in values.items():
        rq[name] = v
    buf = rq.tobytes()
    order = ["start_time_ns", "sector", "nr_sectors", "nr_bios", "nr_phys_segments", "cpu",
             "hctx", "q", "op", "rq_flags", "status"]  # fmt: skip
    assert s.RQ_SETUP.unpack_from(buf, s.RQ_OFF_SETUP) == tuple(values[k] for k in order)
    assert s.RQ_END.unpack_from(buf, s.RQ_OFF_IO_START) == (
        12,
        *(values[k] for k in order if k not in ("sector", "nr_phys_segments")),
    )
    assert s.RQ_TIMES.unpack_from(buf, s.RQ_OFF_DEADLINE) == (11, 12)
    assert s.RQ_SIZE.unpack_from(buf, s.RQ_OFF_NR_SECTORS) == (15, 16, 17)
    assert s.RQ_EXTENT.unpack_from(buf, s.RQ_OFF_SECTOR) == (14, 15, 16, 17)
    words = memoryview(buf).cast("H")
    assert words[s.RQ_U16_CPU] == 257 and words[s.RQ_U16_HCTX] == 18 and words[s.RQ_U16_Q] == 19
    assert buf[s.RQ_OFF_OP] == 1
    assert int.from_bytes(buf[s.RQ_OFF_ISSUE : s.RQ_OFF_ISSUE + 8], "little") == 23
    # The hot fields fill the first line; issue_time_ns opens the second, a scheduler
    # request's tag and internal_tag follow, then a PDU; the block layer's fields do
    # not move.
    assert s.RQ_OFF_ISSUE == 64 == s.RQ_OFF_SETUP + s.RQ_SETUP.size
    assert (s.RQ_OFF_TAG, s.RQ_OFF_INTERNAL_TAG) == (72, 76)
    with_pdu = request_dtype(40)
    assert with_pdu.fields["pdu"][1] == 80 and with_pdu.itemsize == 128
    assert all(with_pdu.fields[k][1] == s.REQUEST.fields[k][1] for k in values)


def test_nvme_entries_are_declared_once():
    from mqrt.device.nvme_defs import CQE, CQE_HEAD, CQE_LAYOUT, CQE_OFF_CID_STATUS, SQE

    cqe = np.zeros(1, CQE_LAYOUT)
    cqe["command_id"], cqe["status"], cqe["sq_id"] = 0x123, 0x281 << 1 | 1, 7
    buf = cqe.tobytes()
    assert int.from_bytes(buf[CQE_OFF_CID_STATUS : CQE_OFF_CID_STATUS + 4], "little") == (
        0x123 | (0x281 << 1 | 1) << 16
    )
    assert CQE.unpack(buf)[3:] == (7, 0x123, 0x281 << 1 | 1)
    assert CQE_HEAD.size == CQE_OFF_CID_STATUS and SQE.size == 64


# -- the driver contract: ->init_request, ->init_hctx and their exits ---------------------


class PduOps(ScriptOps):
    """->init_request that writes ``(hctx_idx, tag, numa_node)`` into the PDU."""

    def init_request(self, tset, rq, hctx_idx, numa_node):
        rq.pdu[0:3] = bytes([hctx_idx & 0xFF, rq.tag, numa_node & 0xFF])
        return super().init_request(tset, rq, hctx_idx, numa_node)


def rig_setup(ops, nr_hw_queues=1, depth=4, cmd_size=0, nr_queues=1, **kw):
    """A Rig setup: one tag set of ``ops`` and ``nr_queues`` queues on it."""

    def setup(layout, topology):
        tset = TagSet(
            ops=ops, nr_hw_queues=nr_hw_queues, queue_depth=depth, cmd_size=cmd_size, **kw
        )
        alloc_tag_set(tset, layout, topology)
        return ops, [init_queue(tset, layout, f"q{i}") for i in range(nr_queues)]

    return setup


@pytest.fixture
def rigs():
    made = []

    def make(setup, **kw):
        made.append(Rig(setup, **kw))
        return made[-1]

    yield make
    for rig in made:
        rig.close()


def test_init_request_for_every_request_at_allocation():
    """blk_mq_alloc_rqs(), inside blk_mq_alloc_tag_set(), calls blk_mq_init_request()
    for each request of every hctx: "ret = set->ops->init_request(set, rq, hctx_idx,
    node);" -- in the owner, before any queue exists."""
    ops = ScriptOps()
    tset = make_set(ops=ops, nr_cpus=4, nr_hw_queues=2, queue_depth=4)
    assert ops.calls_of("init_request") == [(h, t) for h in range(2) for t in range(4)]
    assert not tset.tag_list


def test_init_request_pdu_reaches_every_cpu(rigs):
    """blk_mq_init_request(): the driver fills the request's PDU
    (blk_mq_rq_to_pdu(), cmd_size bytes after struct request) and the request is
    "WRITE_ONCE(rq->state, MQ_RQ_IDLE)"; what it wrote is in the arena every CPU
    reads, and the hctx's NUMA node is blk_mq_hw_queue_to_node()'s."""
    ops = PduOps()
    rig = rigs(rig_setup(ops, nr_hw_queues=2, depth=4, cmd_size=8), nr_cpus=2)
    for mq in rig.mqs:
        pool = mq.rqs[0]
        assert len(pool) == 2 * 4 + 2 * 8  # the driver pool, then the queue's sched pool
        for rq in pool[:8]:
            hctx_idx = rq.id // 4
            assert bytes(rq.pdu[0:3]) == bytes([hctx_idx, rq.tag, 0])
            assert rq.state == RqState.IDLE and rq.state_word == 0
        for rq in pool[8:]:  # blk_mq_sched_alloc_map_and_rqs(): ->init_request too
            hctx_idx = (rq.id - 8) // 8
            assert bytes(rq.pdu[0:3]) == bytes([hctx_idx, rq.internal_tag, 0])
            assert rq.state == RqState.IDLE and rq.tag == -1


def test_init_request_failure_halves_depth():
    """A failing ->init_request is an allocation failure: blk_mq_alloc_rqs() frees
    what it set up ("fail: blk_mq_free_rqs(set, tags, hctx_idx); return -ENOMEM;"),
    __blk_mq_alloc_rq_maps() unwinds the hctxs before ("while (--i >= 0)
    blk_mq_free_map_and_requests(set, i);") and blk_mq_alloc_map_and_requests()
    halves the depth: "set->queue_depth >>= 1;"."""
    ops = ScriptOps(init_request_script=[0] * 8 + [0, -errno.ENOMEM])
    tset = make_set(ops=ops, nr_cpus=4, nr_hw_queues=2, queue_depth=8)
    assert tset.queue_depth == 4
    assert "blk-mq: reduced tag depth (8 -> 4)" in tset.messages
    first_try = [(0, t) for t in range(8)] + [(1, 0), (1, 1)]
    assert ops.calls_of("init_request") == first_try + [(h, t) for h in range(2) for t in range(4)]
    # hctx 1's initialised request, then all of hctx 0's, are exited before halving.
    assert ops.calls_of("exit_request") == [(1, 0)] + [(0, t) for t in range(8)]


class NoMemory(ScriptOps):
    def init_request(self, tset, rq, hctx_idx, numa_node):
        raise MemoryError


@pytest.mark.parametrize(
    ("ops", "errno_text"),
    [(ScriptOps(init_request_script=[-errno.EIO] * 4), "(EIO)"), (NoMemory(), "(ENOMEM)")],
)
def test_init_request_failing_at_every_depth_is_enomem(ops, errno_text):
    """blk_mq_alloc_map_and_requests(): halving below reserved_tags + BLK_MQ_TAG_MIN
    after failures -- "pr_err("blk-mq: failed to allocate request map\\n"); return
    -ENOMEM;" -- and the set is left unallocated (out_free_mq_map)."""
    tset = TagSet(ops=ops, nr_hw_queues=1, queue_depth=8)
    with pytest.raises(BlkMqError) as exc:
        alloc_tag_set(tset, Layout(), Topology.emulated(2))
    msg = str(exc.value)
    assert msg.startswith("ENOMEM: blk-mq: failed to allocate request map: ")
    assert "init_request failed" in msg and errno_text in msg
    assert tset.tags == [] and tset.map == [] and tset.rq_pool is None


def test_init_request_memory_error_is_enomem():
    """BlkMqOps's failure convention: a MemoryError raised by ->init_request is
    -ENOMEM, which feeds blk_mq_alloc_map_and_requests()'s halving like a pool that
    does not fit."""

    class BigPdu(ScriptOps):
        def init_request(self, tset, rq, hctx_idx, numa_node):
            if tset.queue_depth > 16:
                raise MemoryError
            return 0

    tset = make_set(ops=BigPdu(), nr_hw_queues=1, queue_depth=64)
    assert tset.queue_depth == 16


def test_init_hctx_arguments_and_driver_data(rigs):
    """blk_mq_init_hctx(): "hctx->tags = set->tags[hctx_idx];" then
    "set->ops->init_hctx(hctx, set->driver_data, hctx_idx)"; what the driver leaves
    in hctx->driver_data is every CPU's."""
    seen = []

    class Recording(ScriptOps):
        def init_hctx(self, hctx, driver_data, hctx_idx):
            seen.append((hctx.index, hctx_idx, driver_data, hctx.tags))
            return super().init_hctx(hctx, driver_data, hctx_idx)

    rig = rigs(rig_setup(Recording(), nr_hw_queues=2, driver_data="the set's"), nr_cpus=2)
    tset = rig.queues[0].tag_set
    assert seen == [(h, h, "the set's", tset.tags[h]) for h in range(2)]
    for mq in rig.mqs:
        assert [h.driver_data for h in mq.queues[0].hctxs] == [("script", 0), ("script", 1)]


def test_init_hctx_failure_unwinds():
    """blk_mq_init_hctx() failing on hctx 1: blk_mq_realloc_hw_ctxs() exits the hctx
    set up before it (blk_mq_exit_hctx() -> "set->ops->exit_hctx(hctx, j)") and
    blk_mq_init_allocated_queue() returns ERR_PTR(-ENOMEM)."""
    ops = ScriptOps(init_hctx_script=[0, -errno.EFAULT])
    tset, layout = make_set(ops=ops, nr_cpus=4, nr_hw_queues=3), Layout()
    with pytest.raises(BlkMqError) as exc:
        init_queue(tset, layout, "q0")
    assert str(exc.value) == "ENOMEM: q0: init_hctx failed for hctx 1 (EFAULT)"
    hctx_ops = [(op, h) for op, h, _ in ops.lifecycle if op.endswith("hctx")]
    assert hctx_ops == [("init_hctx", 0), ("init_hctx", 1), ("exit_hctx", 0)]
    assert not tset.tag_list and "q0.queue" not in layout.regions
    assert init_queue(tset, layout, "q0").index == 0  # its id was given back


def test_cleanup_then_free_call_the_exit_ops(rigs):
    """blk_cleanup_queue() -> blk_mq_exit_queue() -> blk_mq_exit_hctx():
    "set->ops->exit_hctx(hctx, hctx_idx)" for each hctx; blk_mq_free_tag_set() ->
    blk_mq_free_rqs(): "set->ops->exit_request(set, rq, hctx_idx)" for each request."""
    ops = ScriptOps()
    rig = rigs(rig_setup(ops, nr_hw_queues=2, depth=4), nr_cpus=2)
    q = rig.queues[0]
    ops.lifecycle.clear()
    rig.teardown()
    assert ops.lifecycle == [("exit_hctx", 0, -1), ("exit_hctx", 1, -1)] + [
        ("exit_request", h, t) for h in range(2) for t in range(4)
    ]
    assert q.dying and not q.tag_set.tag_list and not q.tag_set.tags
    assert q.index not in rig.layout.ida("blk_queue")


def test_cleanup_queue_refuses_requests_in_flight(rigs):
    """blk_cleanup_queue() drains the queue before exiting its hctxs
    (blk_freeze_queue()); in the owner nothing can finish a request, so one that
    still holds a tag is -EBUSY, and the queue stays as it was."""
    ops = ScriptOps()
    rig = rigs(rig_setup(ops, depth=4), nr_cpus=1)
    q, mq = rig.queues[0], rig.mq
    rq_id = mq.alloc_request(mq.queues[0], READ, 0, 8, 0, nowait=True)
    with pytest.raises(BlkMqError) as exc:
        cleanup_queue(q)
    assert str(exc.value).startswith("EBUSY: q0: 1 request(s) still in flight")
    assert not q.dying and q.tag_set.tag_list == [q]
    mq.end_request(mq.rqs[0][rq_id], 0)
    cleanup_queue(q)
    assert q.dying and ops.calls_of("exit_hctx") == [(0, -1)]


def test_seed_teardown_order_is_refused():
    """The seed's tear-down ("1. 调用blk_mq_free_tag_set()注销tagset。 2. 调用
    blk_cleanup_queue()注销并释放request queue。") frees the set while a queue's hctxs
    still use its tags and ops -- in the kernel a use-after-free -- so it is -EBUSY,
    and the other order frees everything."""
    ops = ScriptOps()
    tset = make_set(ops=ops, nr_cpus=2, nr_hw_queues=1, queue_depth=2)
    q = init_queue(tset, Layout(), "q0")
    with pytest.raises(BlkMqError) as exc:
        free_tag_set(tset)
    assert str(exc.value).startswith("EBUSY: tag set set0 still has queues (q0): cleanup_queue()")
    assert not ops.calls_of("exit_request")
    cleanup_queue(q)
    free_tag_set(tset)
    assert ops.calls_of("exit_request") == [(0, 0), (0, 1)]


# -- every error path is the kernel's errno -------------------------------------------------


def test_depth_capped_below_reserved_tags_is_enomem():
    """queue_depth 20000 passes "if (set->queue_depth < set->reserved_tags +
    BLK_MQ_TAG_MIN) return -EINVAL;" with 15000 reserved, then "set->queue_depth =
    BLK_MQ_MAX_DEPTH;" leaves fewer tags than reserved: the tags cannot be
    allocated and the halving loop's own check ("if (set->queue_depth <
    set->reserved_tags + BLK_MQ_TAG_MIN) { err = -ENOMEM; break; }") ends it with
    -ENOMEM -- not an error from sbitmap."""
    tset = TagSet(ops=Ops(), nr_hw_queues=1, queue_depth=20000, reserved_tags=15000)
    with pytest.raises(BlkMqError) as exc:
        alloc_tag_set(tset, Layout(), Topology.emulated(2))
    assert str(exc.value) == (
        "ENOMEM: blk-mq: failed to allocate request map: 15000 reserved tags leave no "
        "tag at depth 10240 (capped at BLK_MQ_MAX_DEPTH)"
    )
    assert "blk-mq: reduced tag depth to 10240" in tset.messages


def test_queue_ids_are_unique():
    """blk_alloc_queue(): "q->id = ida_simple_get(&blk_queue_ida, 0, 0, GFP_KERNEL);"
    -- every queue of a layout gets its own id, whatever its tag set; a freed id is
    handed out again; a second queue of the same name is -EEXIST."""
    layout, topo = Layout(), Topology.emulated(2)
    sets = [alloc_tag_set(TagSet(Ops(), 1, 4, name=f"s{i}"), layout, topo) for i in range(2)]
    qs = [init_queue(sets[i % 2], layout, f"q{i}") for i in range(3)]
    assert [q.index for q in qs] == [0, 1, 2]
    with pytest.raises(BlkMqError, match=r"^EEXIST: a queue named q1"):
        init_queue(sets[0], layout, "q1")
    cleanup_queue(qs[1])
    assert init_queue(sets[0], layout, "q3").index == 1
    with pytest.raises(BlkMqError, match=r"^EEXIST: a tag set named s0"):
        alloc_tag_set(TagSet(Ops(), 1, 4, name="s0"), layout, topo)


def test_queues_out_of_id_order_are_refused():
    """The run's queues index per-CPU tables by q->id: init_shared() takes them in id
    order (-EINVAL otherwise), before touching the arena."""
    layout, topo = Layout(), Topology.emulated(2)
    tset = alloc_tag_set(TagSet(Ops(), 1, 4), layout, topo)
    qs = [init_queue(tset, layout, f"q{i}") for i in range(2)]
    with pytest.raises(BlkMqError, match=r"^EINVAL: q1 has id 1 at position 0"):
        init_shared(None, qs[::-1])  # type: ignore[arg-type]


def test_unmapped_hctx_has_no_tags_and_no_requests():
    """blk_mq_map_swqueue(): an hctx no ctx maps gets none -- "if (i && set->tags[i])
    blk_mq_free_map_and_requests(set, i); hctx->tags = NULL;" -- its requests are
    exited; hctx 0 keeps the set's tags."""
    ops = AllToZero()
    tset = make_set(ops=ops, nr_cpus=4, nr_hw_queues=3, queue_depth=2)
    q = init_queue(tset, Layout(), "q0")
    assert tset.tags[0] is not None and tset.tags[1] is None and tset.tags[2] is None
    assert [h.tags for h in q.hctxs] == [tset.tags[0], None, None]
    assert ops.calls_of("exit_request") == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert not q.mapped(1) and not q.mapped(2)


def test_data_path_with_unmapped_hctxs(rigs):
    """The data path never reaches an hctx without tags (no ctx maps to it), and the
    walks over every hctx (queue runs, timeout work, nr_requests, invariants) skip
    it, as queue_for_each_hw_ctx() users test blk_mq_hw_queue_mapped()."""
    ops = AllToZero()

    def setup(layout, topology):
        tset = TagSet(ops=ops, nr_hw_queues=3, queue_depth=4)
        alloc_tag_set(tset, layout, topology)
        return ops, [init_queue(tset, layout, f"q{i}") for i in range(2)]  # shared

    rig = rigs(setup, nr_cpus=3)
    for mq in rig.mqs:
        queue = mq.queues[0]
        assert [h.tags is None for h in queue.hctxs] == [False, True, True]
        mq.submit_bio(queue, READ, 0, 8, 0)
        mq.run_hw_queues(queue, False)
        mq.timeout_work(0)
        mq.update_nr_requests(0, 2)
    for rq in list(ops.started):
        rig.mq.end_request(rq, 0)
    assert check_invariants(rig.arena, rig.queues)["problems"] == []
    rig.teardown()


class DefaultOnly(ScriptOps):
    """Two maps; ->map_queues fills DEFAULT and leaves READ alone."""

    def map_queues(self, tset):
        map_queues(tset.map[HctxType.DEFAULT], tset.topology)


def test_map_left_alone_is_cleared_not_einval():
    """blk_mq_update_queue_map() clears every map before ->map_queues ("for (i = 0;
    i < set->nr_maps; i++) blk_mq_clear_mq_map(&set->map[i]);"): a map the driver
    leaves alone sends every CPU to hctx 0 and is accepted."""
    tset = make_set(ops=DefaultOnly(), nr_cpus=4, nr_hw_queues=2, nr_maps=2)
    assert tset.map[HctxType.READ].mq_map == [0, 0, 0, 0]
    q = init_queue(tset, Layout(), "q0")
    assert all(q.ctx_hctx[cpu][HctxType.READ] == 0 for cpu in range(4))


class NoDefaultQueues(ScriptOps):
    def map_queues(self, tset):
        tset.map[HctxType.DEFAULT].nr_queues = 0


class MapsZeroQueues(ScriptOps):
    def map_queues(self, tset):
        tset.map[HctxType.DEFAULT].nr_queues = 0
        map_queues(tset.map[HctxType.DEFAULT], tset.topology)


@pytest.mark.parametrize("ops", [NoDefaultQueues(), MapsZeroQueues()])
def test_default_map_without_queues_is_einval(ops):
    """A DEFAULT map left with no queues (blk_mq_map_queues() on it would divide by
    zero: "queue_index(qmap, nr_queues, q++)") is -EINVAL, not a ValueError from the
    map code."""
    with pytest.raises(BlkMqError) as exc:
        make_set(ops=ops, nr_cpus=4, nr_hw_queues=2, nr_maps=2)
    assert str(exc.value).startswith("EINVAL: script: ")
    assert "DEFAULT" in str(exc.value) or "nr_queues" in str(exc.value)


def test_init_sq_queue_takes_set_flags():
    """blk_mq_init_sq_queue(set, ops, queue_depth, set_flags): "set->nr_maps = 1;
    set->numa_node = NUMA_NO_NODE; set->flags = set_flags;"."""
    q = init_sq_queue(Ops(), 8, BlkMqFlag.BLOCKING, Layout(), Topology.emulated(2))
    tset = q.tag_set
    assert tset.flags == BlkMqFlag.BLOCKING and tset.nr_maps == 1 and tset.numa_node == -1
    assert q.hctxs[0].flags == BlkMqFlag.BLOCKING


def test_init_sq_queue_frees_the_set_when_init_fails():
    """blk_mq_init_sq_queue(): "q = blk_mq_init_queue(set); if (IS_ERR(q)) {
    blk_mq_free_tag_set(set); return q; }"."""
    ops = ScriptOps(init_hctx_script=[-errno.ENOMEM])
    with pytest.raises(BlkMqError, match=r"^ENOMEM: sq0: init_hctx failed for hctx 0 "):
        init_sq_queue(ops, 2, BlkMqFlag(0), Layout(), Topology.emulated(2))
    assert ops.calls_of("exit_request") == [(0, 0), (0, 1)]


# -- layout limits ---------------------------------------------------------------------------


def test_ctx_map_is_an_sbitmap_of_shift_3():
    """blk_mq_alloc_hctx(): "sbitmap_init_node(&hctx->ctx_map, nr_cpu_ids, ilog2(8),
    gfp, node)" -- eight ctxs a word, each word on its own cache line -- sized to the
    hctx's ctxs (blk_mq_map_swqueue(): "sbitmap_resize(&hctx->ctx_map,
    hctx->nr_ctx);"), with no cap on their number."""
    tset = make_set(nr_cpus=300, nr_hw_queues=1)
    q = init_queue(tset, Layout(), "q0")
    ctx_map = q.hctxs[0].ctx_map
    assert ctx_map.shift == 3 and ctx_map.depth == 300 and ctx_map.map_nr == 38
    words = [ctx_map.words.addr(i, "word") for i in range(ctx_map.map_nr)]
    assert all(w % 64 == 0 for w in words)
    assert all(b - a >= 64 for a, b in itertools.pairwise(words))


def test_300_ctxs_on_one_hctx(rigs):
    """A ctx with index_hw above 255 marks and clears its bit
    (blk_mq_hctx_mark_pending(), flush_busy_ctxs()) like any other."""
    ops = ScriptOps()
    rig = rigs(rig_setup(ops, depth=8), nr_cpus=300, cpu=299, on_cpus=[299])
    mq, queue = rig.mq, rig.mq.queues[0]
    hctx = queue.hctxs[0]
    rq_id = mq.alloc_request(queue, READ, 0, 8, 0, nowait=True)
    mq.insert_request(queue, rq_id)
    assert hctx.busy_ctxs() == [299] and hctx.has_pending()
    mq.run_hw_queue(hctx, False)
    assert [rq.id for rq in ops.started] == [rq_id] and not hctx.has_pending()


def test_16_bit_queue_field(rigs):
    """A request's q field (q->id) is read whole past 255: the completion finds queue
    299 (blk_mq_complete_request() -> ->complete on the right queue), so do the
    requeue kick and the bio's end."""
    ops = ScriptOps()

    def setup(layout, topology):
        tset = TagSet(ops=ops, nr_hw_queues=1, queue_depth=2)
        alloc_tag_set(tset, layout, topology)
        return ops, [init_queue(tset, layout, f"q{i}") for i in range(300)]

    rig = rigs(setup, nr_cpus=1)
    mq, sys_ = rig.mq, rig.sys
    queue = mq.queues[299]
    mq.submit_bio(queue, READ, 0, 8, 0)
    (rq,) = ops.started
    assert rq.setup()[7] == 299  # q
    mq.requeue_request(rq, kick=True)
    assert sys_.requeue_kicks == [299]
    sys_.run_requeue()
    mq.complete_request(ops.started[-1])
    sys_.run_softirqs()  # one hw queue: ->complete in the block softirq
    assert [(cpu, q) for cpu, q, _info in sys_.done] == [(0, 299)]


def test_16_bit_cpu_and_hctx_fields(rigs):
    """A request's cpu and hctx fields are read whole past 255: a completion on CPU 0
    with rq_affinity=2 sends its IPI to submitting CPU 299, and the requeue work puts
    a DONTPREP request back on hctx 299's dispatch list."""
    ops = ScriptOps()

    def setup(layout, topology):
        tset = TagSet(ops=ops, nr_hw_queues=300, queue_depth=2)
        alloc_tag_set(tset, layout, topology)
        return ops, [init_queue(tset, layout, "q0", rq_affinity=2)]

    rig = rigs(setup, nr_cpus=300, on_cpus=[299, 0])
    mq299, mq0 = rig.mqs
    queue = mq299.queues[0]
    mq299.submit_bio(queue, READ, 0, 8, 0)
    (rq,) = ops.started
    assert rq.setup()[5:7] == (299, 299)  # cpu, hctx
    mq0.complete_request(mq0.rqs[0][rq.id])  # rq_affinity=2: IPI to the submitter
    assert rig.cpus[1].ipis == [(299, 0, rq.id, 0)]
    mq299.a.fetch_or32(rq.base + RQ_OFF_FLAGS, int(Rqf.DONTPREP))
    mq299.requeue_request(rq, kick=False)
    mq299.requeue_work(0)
    assert ops.started == [rq, rq]  # found on hctx 299's dispatch list, issued again
    mq299.end_request(rq, 0)


@pytest.mark.parametrize(
    ("rq_affinity", "poll", "flags"),
    [
        (1, 0, {"IO_STAT", "SAME_COMP", "NOWAIT"}),
        (0, 0, {"IO_STAT", "NOWAIT"}),
        (2, 1, {"IO_STAT", "SAME_COMP", "SAME_FORCE", "NOWAIT", "POLL"}),
    ],
)
def test_queue_flag_mq_default(rigs, rq_affinity, poll, flags):
    """blk_mq_init_allocated_queue(): "q->queue_flags |= QUEUE_FLAG_MQ_DEFAULT;"
    (IO_STAT, SAME_COMP, NOWAIT), "blk_queue_flag_set(QUEUE_FLAG_POLL, q)" with poll
    queues; queue/rq_affinity then clears SAME_COMP (0) or sets SAME_FORCE (2)."""
    cfg = parse_config({"poll_queues": poll})
    rig = rigs(lambda lay, topo: setup(cfg, lay, topo, rq_affinity=rq_affinity), nr_cpus=2)
    word = int(rig.arena.view(rig.queues[0].header)["queue_flags"][0])
    assert {f.name for f in QueueFlag if word >> f & 1} == flags


def test_nvme_init_hctx_and_init_request():
    """nvme_init_hctx(): "hctx->driver_data = nvmeq;" (&dev->queues[hctx_idx + 1]);
    nvme_pci_init_request(): "int queue_idx = (set == &dev->tagset) ? hctx_idx + 1 :
    0; ... iod->nvmeq = nvmeq;" -- in the PDU, read back by the timeout handler."""
    from mqrt.device import nvme

    ops, (q,) = nvme.setup(nvme.parse_config({"io_queue_depth": 8}), Layout(), Topology.emulated(2))
    assert [h.driver_data for h in q.hctxs] == ops.nvmeqs[1:3]
    pool = q.tag_set.rq_pool
    for rq_id in range(14):  # two hctxs of depth 7
        pdu = pool.request(rq_id, rq_id % 7).pdu
        assert int.from_bytes(pdu[4:6], "little") == rq_id // 7 + 1

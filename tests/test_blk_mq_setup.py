"""Tag set and queue setup: blk_mq_alloc_tag_set(), blk_mq_init_queue() and null_blk's
configuration, checked against Linux 5.10 (block/blk-mq.c, drivers/block/null_blk).

Nothing here touches shared memory or processes: alloc_tag_set() and init_queue() only
declare regions in a Layout.
"""

from __future__ import annotations

import numpy as np
import pytest

from mqrt.block.blk_mq_cpumap import HctxType, QueueMap, Topology, map_queues
from mqrt.block.blk_mq_setup import (
    alloc_tag_set,
    cleanup_queue,
    free_tag_set,
    init_queue,
    init_sq_queue,
)
from mqrt.block.blk_mq_structs import BlkMqError, TagSet, request_dtype
from mqrt.block.blk_mq_types import BLK_MQ_MAX_DEPTH, BlkMqFlag, BlkMqOps
from mqrt.device.null_blk import parse_config, setup
from mqrt.lib.knobs import KnobError
from mqrt.lib.shm import Layout


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


class AllToZero(Ops):
    """->map_queues that sends every CPU to hctx 0, leaving the others unmapped."""

    def __init__(self) -> None:
        self.init_hctx_calls: list[int] = []

    def map_queues(self, tset):
        tset.map[0].mq_map[:] = [0] * tset.nr_cpus

    def init_hctx(self, q, hctx_idx):
        self.init_hctx_calls.append(hctx_idx)


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
    q = init_queue(tset, Layout(), 0, "q0")
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
    q = init_queue(tset, Layout(), 0, "q0")
    for cpu in range(4):
        assert q.ctx_hctx[cpu][HctxType.DEFAULT] in (0, 1)
        assert q.ctx_hctx[cpu][HctxType.READ] == 2
        assert q.ctx_hctx[cpu][HctxType.POLL] == 3
    assert q.hctx_type == [HctxType.DEFAULT, HctxType.DEFAULT, HctxType.READ, HctxType.POLL]
    assert q.hctx_cpus[2] == q.hctx_cpus[3] == [0, 1, 2, 3]


def test_unmapped_hctx_has_empty_cpumask():
    """An hctx no CPU maps to: empty cpumask, blk_mq_hw_queue_mapped() false."""
    tset = make_set(nr_cpus=4, nr_hw_queues=3, ops=AllToZero())
    q = init_queue(tset, Layout(), 0, "q0")
    assert q.hctx_cpus == [[0, 1, 2, 3], [], []]
    assert q.mapped(0)
    assert not q.mapped(1)
    assert not q.mapped(2)


def test_init_hctx_called_for_every_hctx():
    """blk_mq_init_hctx() runs ->init_hctx for each of nr_hw_queues, mapped or not."""
    ops = AllToZero()
    tset = make_set(nr_cpus=4, nr_hw_queues=3, ops=ops)
    init_queue(tset, Layout(), 0, "q0")
    assert ops.init_hctx_calls == [0, 1, 2]


def test_init_queue_on_unallocated_set():
    """A queue needs an allocated tag set."""
    tset = TagSet(ops=Ops(), nr_hw_queues=1, queue_depth=8)
    with pytest.raises(BlkMqError):
        init_queue(tset, Layout(), 0, "q0")


@pytest.mark.parametrize("rq_affinity", [-1, 3])
def test_bad_rq_affinity(rq_affinity):
    """queue/rq_affinity accepts 0, 1 or 2 only."""
    with pytest.raises(BlkMqError, match="rq_affinity"):
        init_queue(make_set(), Layout(), 0, "q0", rq_affinity=rq_affinity)


def test_init_sq_queue():
    """blk_mq_init_sq_queue(): a one-hctx set and its queue."""
    q = init_sq_queue(Ops(), 16, Layout(), Topology.emulated(4))
    assert q.nr_hw_queues == 1
    assert q.tag_set.nr_hw_queues == 1
    assert q.tag_set.queue_depth == 16
    assert q.hctx_cpus == [[0, 1, 2, 3]]
    assert q.tag_set.tag_list == [q]


# -- TAG_QUEUE_SHARED and teardown -----------------------------------------------------


def test_second_queue_makes_set_shared():
    """blk_mq_add_queue_tag_set(): the second user sets BLK_MQ_F_TAG_QUEUE_SHARED."""
    tset, layout = make_set(), Layout()
    q0 = init_queue(tset, layout, 0, "q0")
    assert not q0.shared
    assert not tset.flags & BlkMqFlag.TAG_QUEUE_SHARED
    q1 = init_queue(tset, layout, 1, "q1")
    assert tset.flags & BlkMqFlag.TAG_QUEUE_SHARED
    assert q0.shared and q1.shared
    assert tset.tag_list == [q0, q1]


def test_cleanup_leaves_one_user_unshared():
    """blk_mq_del_queue_tag_set(): back to one user clears TAG_QUEUE_SHARED."""
    tset, layout = make_set(), Layout()
    qs = [init_queue(tset, layout, i, f"q{i}") for i in range(3)]
    cleanup_queue(qs[0])
    assert qs[1].shared  # two users left
    cleanup_queue(qs[1])
    assert not qs[2].shared
    assert not tset.flags & BlkMqFlag.TAG_QUEUE_SHARED
    assert tset.tag_list == [qs[2]]


def test_free_tag_set_busy_then_free():
    """Freeing a set with queues attached is EBUSY; after cleanup it frees."""
    tset = make_set()
    q = init_queue(tset, Layout(), 0, "q0")
    with pytest.raises(BlkMqError) as exc:
        free_tag_set(tset)
    assert str(exc.value).startswith("EBUSY")
    assert tset.tags  # untouched
    cleanup_queue(q)
    free_tag_set(tset)
    assert not tset.tags
    assert tset.rq_region is None
    with pytest.raises(BlkMqError):
        init_queue(tset, Layout(), 0, "q0")


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
    """null_init_hctx() failing (fault "1,100,0,1") fails the device: -EFAULT."""
    cfg = parse_config({"init_hctx": "1,100,0,1"})
    with pytest.raises(BlkMqError) as exc:
        setup(cfg, Layout(), Topology.emulated(2))
    assert str(exc.value).startswith("EFAULT")


def test_request_layout_is_declared_once():
    """The hot paths' structs and offsets are derived from the request's dtype: what
    numpy writes by field name, the structs read back at the derived offsets."""
    from mqrt.block import blk_mq_structs as s

    rq = np.zeros(1, s.REQUEST)
    values = {
        "deadline_ns": 11, "io_start_time_ns": 12, "start_time_ns": 13, "sector": 14,
        "nr_sectors": 15, "nr_bios": 16, "nr_phys_segments": 17, "cpu": 257, "hctx": 18,
        "q": 19, "op": 1, "rq_flags": 21, "status": -22,
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
    assert buf[s.RQ_OFF_HCTX] == 18 and buf[s.RQ_OFF_Q] == 19 and buf[s.RQ_OFF_OP] == 1
    assert buf[s.RQ_OFF_CPU] | buf[s.RQ_OFF_CPU + 1] << 8 == 257
    # A PDU follows on its own line; the block layer's fields do not move.
    with_pdu = request_dtype(40)
    assert with_pdu.fields["pdu"][1] == 64
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

"""blk_mq_update_nr_hw_queues() step by step in one process (mqrt.testing): the map
every CPU follows after a change is blk_mq_map_queues()'s for the new count, the
freeze waits for the requests of the old map, and a CPU that has not looked at the
map since follows it when it next enters the queue or runs an hctx.  The same under
load, across processes, is in tests/test_transitions.py."""

from __future__ import annotations

import time

import pytest

from mqrt.block import blk_mq_freeze as freeze
from mqrt.block.blk_mq_debugfs import check_invariants
from mqrt.block.blk_mq_setup import alloc_tag_set, init_queue
from mqrt.block.blk_mq_structs import RQ_U16_CPU, RQ_U16_HCTX, BlkMqError, TagSet
from mqrt.block.blk_mq_types import BlkMqFlag, BlkStatus, ReqOp
from mqrt.block.blk_mq_update import update_nr_hw_queues
from mqrt.lib.wait import WaitEvent
from tests.helpers import scripted_rigs

READ = int(ReqOp.READ)
NR_CPUS = 8

#: blk_mq_map_queues() for 8 CPUs, one thread a core: CPU i -> hctx i % nr.
KERNEL_MAP = {nr: [cpu % nr for cpu in range(NR_CPUS)] for nr in (1, 2, 4)}


def nrhw_setup(ops, nr_hw_queues=1, max_hw_queues=4, shared_tag_bitmap=False, nr_queues=2):
    def setup(layout, topology):
        flags = BlkMqFlag.TAG_HCTX_SHARED if shared_tag_bitmap else BlkMqFlag(0)
        tset = TagSet(
            ops=ops,
            nr_hw_queues=nr_hw_queues,
            queue_depth=16,
            flags=flags,
            max_hw_queues=max_hw_queues,
        )
        alloc_tag_set(tset, layout, topology)
        return ops, [init_queue(tset, layout, f"q{i}") for i in range(nr_queues)]

    return setup


@pytest.fixture
def rig_factory():
    with scripted_rigs(nrhw_setup) as make:
        yield make


def run(task) -> tuple[WaitEvent | None, dict | None]:
    """Run a transition until it sleeps (the event) or ends (its report)."""
    try:
        return next(task), None
    except StopIteration as stop:
        return None, stop.value


def update(mq, q, nr) -> dict:
    event, report = run(update_nr_hw_queues(mq, q, nr, time.monotonic_ns))
    assert event is None and report is not None
    return report


def rq_cpu_hctx(mq, rq) -> tuple[int, int]:
    half = rq.base >> 1
    return mq.buf16[half + RQ_U16_CPU], mq.buf16[half + RQ_U16_HCTX]


def submit_on_every_cpu(rig, ops, qi: int) -> dict[int, int]:
    """One read from each CPU on queue ``qi``: the hctx each went to (by CPU)."""
    before = len(ops.started)
    for c, mq in enumerate(rig.mqs):
        mq.submit_bio(mq.queues[qi], READ, 1000 * c, 8, 0)
    got = {}
    for rq in ops.started[before:]:
        cpu, hctx = rq_cpu_hctx(rig.mq, rq)
        got[cpu] = hctx
    return got


def complete_all(rig, ops) -> None:
    for rq in ops.started:
        rig.mq.end_request(rq, BlkStatus.OK)
    ops.started.clear()


@pytest.mark.parametrize("shared_tag_bitmap", [False, True], ids=["hctx_tags", "shared_tag_bitmap"])
def test_every_cpu_follows_the_kernels_map_for_1_2_4_queues(rig_factory, shared_tag_bitmap):
    rig, ops = rig_factory(nr_cpus=NR_CPUS, shared_tag_bitmap=shared_tag_bitmap)
    writer = rig.mq
    for nr in (4, 2, 1, 4, 1):
        report = update(writer, writer.queues[0], nr)
        assert report["nr_hw_queues"] == nr and report["queues"] == 2
        assert report["stranded"] == 0
        for qi in (0, 1):  # both queues of the set were remapped
            assert submit_on_every_cpu(rig, ops, qi) == dict(enumerate(KERNEL_MAP[nr]))
            for mq in rig.mqs:
                queue = mq.queues[qi]
                assert queue.nr_hw_queues == nr
                # blk_mq_map_swqueue(): each active hctx's cpumask is the CPUs mapping it
                for h, hctx in enumerate(queue.hctxs):
                    want = [c for c, m in enumerate(KERNEL_MAP[nr]) if m == h]
                    assert hctx.cpumask == want, (mq.cpu, qi, h)
            complete_all(rig, ops)
    assert check_invariants(rig.arena, rig.queues)["problems"] == []


def test_the_freeze_waits_for_the_old_maps_requests_then_a_cpu_enters_the_new(rig_factory):
    rig, ops = rig_factory(nr_cpus=NR_CPUS, max_hw_queues=NR_CPUS)
    writer = rig.mq
    old = submit_on_every_cpu(rig, ops, 0) | submit_on_every_cpu(rig, ops, 1)
    assert set(old.values()) == {0}
    in_flight = list(ops.started)
    task = update_nr_hw_queues(writer, writer.queues[0], 4, time.monotonic_ns)
    event, _ = run(task)
    # every queue of the set frozen; waiting for q0's 8 requests of the old map
    assert event is not None and not event.cond()
    assert all(freeze.frozen(writer, q) for q in writer.queues)
    for rq in in_flight[:-1]:
        rig.mq.end_request(rq, BlkStatus.OK)
    assert event.cond()
    event, _ = run(task)  # then for q1's: one still in flight
    assert event is not None and not event.cond()
    assert writer.queues[0].nr_hw_queues == 1  # nothing remapped yet
    rig.mq.end_request(in_flight[-1], BlkStatus.OK)
    ops.started.clear()
    assert event.cond()
    event, report = run(task)
    assert event is None and report is not None
    assert report["nr_hw_queues_before"] == 1 and report["nr_hw_queues"] == 4
    assert report["stranded"] == 0 and report["freeze_wait_ns"] >= 0
    assert not any(freeze.frozen(writer, q) or q.quiesced() for q in writer.queues)
    # CPU 5 has not looked at the map since: its next bio goes to the new hctx
    mq5 = rig.mqs[5]
    assert mq5.queues[0].map_gen == 0
    mq5.submit_bio(mq5.queues[0], READ, 0, 8, 0)
    assert rq_cpu_hctx(writer, ops.started[-1]) == (5, KERNEL_MAP[4][5])
    assert mq5.queues[0].map_gen == mq5.queues[1].map_gen == writer.queues[0].map_gen == 2
    # what it allocated under each map, as the report says
    assert [(s["map_gen"], s["nr_hw_queues"], s["hctx"]) for s in mq5.map_history] == [
        (0, 1, 0),
        (0, 1, 0),
    ]
    complete_all(rig, ops)
    assert check_invariants(rig.arena, rig.queues)["problems"] == []


def test_a_cpu_running_an_hctx_follows_the_map_first(rig_factory):
    """kblockd work for an hctx that runs on a CPU that has not entered the queue
    since the change: the run reads the map before it takes anything from a ctx."""
    rig, ops = rig_factory(nr_cpus=NR_CPUS)
    writer = rig.mq
    update(writer, writer.queues[0], 4)
    mq3 = rig.mqs[3]
    assert mq3.queues[0].map_gen == 0 and len(mq3.queues[0].hctxs[3].ctx_lists) == 0
    # CPU 7 (new map: hctx 3, with CPU 3) queues a request on its ctx list
    mq7 = rig.mqs[7]
    freeze.quiesce_queue_nowait(mq7, mq7.queues[0])
    mq7.submit_bio(mq7.queues[0], READ, 0, 8, 0)
    assert ops.calls == 0
    freeze.unquiesce_queue(mq7, mq7.queues[0])
    mq3.run_work(0, 3)
    assert mq3.queues[0].map_gen == 2 and ops.calls == 1
    assert rq_cpu_hctx(writer, ops.started[0]) == (7, 3)
    complete_all(rig, ops)
    assert check_invariants(rig.arena, rig.queues)["problems"] == []


def test_the_count_the_set_has_changes_nothing(rig_factory):
    """As blk_mq_update_nr_hw_queues() with one map: no freeze, no new map."""
    rig, ops = rig_factory(nr_cpus=NR_CPUS)
    writer = rig.mq
    writer.submit_bio(writer.queues[0], READ, 0, 8, 0)  # in flight: a freeze would wait
    report = update(writer, writer.queues[0], 1)
    assert report == {"queues": 2, "nr_hw_queues_before": 1, "nr_hw_queues": 1}
    assert writer.queues[0].map_gen == 0 and not freeze.frozen(writer, writer.queues[0])
    complete_all(rig, ops)


def test_out_of_range_and_fixed_sets_are_refused(rig_factory):
    rig, _ops = rig_factory(nr_cpus=NR_CPUS, max_hw_queues=2)
    with pytest.raises(BlkMqError, match=r"nr_hw_queues takes 1\.\.2"):
        update(rig.mq, rig.mq.queues[0], 3)
    rig2, _ = rig_factory(nr_cpus=NR_CPUS, max_hw_queues=0)
    with pytest.raises(BlkMqError, match="no max_hw_queues"):
        update(rig2.mq, rig2.mq.queues[0], 2)
    with pytest.raises(BlkMqError, match=r"max_hw_queues must be in 2\.\.8"):
        rig_factory(nr_cpus=NR_CPUS, nr_hw_queues=2, max_hw_queues=9)


@pytest.mark.parametrize(
    ("given", "write", "message"),
    [
        ({"cpus": "4"}, "1s:nr_hw_queues=5", "nullb0's tag set takes 1..4"),
        ({"cpus": "4", "max_hw_queues": "2"}, "1s:nr_hw_queues=3", "takes 1..2"),
        ({"cpus": "4"}, "1s:nr_hw_queues=0", "must be an integer >= 1, got '0'"),
        (
            {"cpus": "4", "max_hw_queues": "8"},
            "1s:nr_hw_queues=2",
            "max_hw_queues: must be in 1..4",
        ),
        ({"cpus": "4", "poll_queues": "1"}, "1s:nr_hw_queues=2", "without poll_queues"),
        ({"cpus": "4", "mode": "sq"}, "1s:nr_hw_queues=2", "--mode sq has a fixed"),
        ({"driver": "nvme", "cpus": "4", "nr_io_queues": "2"}, "1s:nr_hw_queues=3", "takes 1..2"),
        ({"driver": "nvme", "cpus": "4"}, "1s:nullb0/nr_hw_queues=2", "'nullb0' is not a queue"),
    ],
)
def test_bad_nr_hw_queues_writes_are_one_line_errors(given, write, message):
    from mqrt.bench.main import build
    from mqrt.bench.timeline import parse_at
    from mqrt.lib.knobs import KnobError

    with pytest.raises(KnobError) as exc:
        build({"runtime": "1", **given}, [parse_at(write, "--at")])
    assert message in str(exc.value) and "\n" not in str(exc.value)

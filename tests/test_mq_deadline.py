"""mqrt.block.mq_deadline against a simple model (tests/dd_model.py), its rules one by
one, and real processes inserting while another dispatches."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqrt.block.mq_deadline import (
    DD_READ,
    DD_WRITE,
    DEBUGFS,
    NIL,
    DeadlineData,
    DeadlineSpec,
    ElvMerge,
)
from mqrt.lib.knobs import KnobError
from mqrt.lib.shm import Arena, Layout
from tests.dd_model import MS, DdModel
from tests.helpers import DEADLOCK_TIMEOUT, ctx

R, W = DD_READ, DD_WRITE


@pytest.fixture
def make_dd() -> Iterator:
    arenas: list[tuple[Arena, DeadlineData]] = []

    def make(nr: int = 32) -> DeadlineData:
        layout = Layout()
        spec = DeadlineData.declare(layout, "q0", nr)
        arena = Arena.create(layout)
        DeadlineData.init(arena, spec)
        dd = DeadlineData(arena, spec)
        arenas.append((arena, dd))
        return dd

    yield make
    for arena, dd in arenas:
        assert dd.check() == []
        dd.close()
        arena.close()


def drain(dd: DeadlineData, now: int) -> list[int]:
    out = []
    while (rq := dd.dispatch(now)) != NIL:
        out.append(rq)
        dd.finish(rq)
    return out


# -- the rules, one by one -----------------------------------------------------------------


def test_sector_order_within_a_batch_and_from_the_fifo_head(make_dd):
    dd = make_dd()
    for rq, sector in enumerate([50, 10, 30, 20]):
        dd.insert(rq, R, sector, 8, now_ns=0)
    # no batch yet: the direction's FIFO head (rq 0, sector 50) starts it (nothing in
    # sector order yet), then the sector order from there, then the FIFO again
    assert drain(dd, 1) == [0, 1, 3, 2]
    assert dd.counters() == {
        "inserted": 4,
        "merged": 0,
        "dispatched": 4,
        "completed": 4,
        "queued": 0,
        "owned_by_driver": 0,
    }


def test_an_expired_read_goes_before_the_sector_order_next(make_dd):
    dd = make_dd()
    dd.store_knob("fifo_batch", "1")  # every dispatch chooses anew
    for rq, (sector, t) in enumerate([(100, 0), (0, 10), (8, 20), (200, 30), (300, 40)]):
        dd.insert(rq, R, sector, 8, now_ns=t * MS)
    assert dd.dispatch(50 * MS) == 0  # nothing in sector order yet: the FIFO head
    assert dd.dispatch(60 * MS) == 3  # after sector 100 comes 200; nothing expired
    assert dd.debugfs("read_next_rq").startswith("{.op=READ, .internal_tag=4,")
    assert dd.dispatch(510 * MS) == 1  # rq 1 (deadline 510 ms) expired: before rq 4
    assert dd.dispatch(511 * MS) == 2  # and on from there in sector order
    assert drain(dd, 512 * MS) == [4]
    # the sector order's next is not updated by an insert: a request that lands after
    # the last dispatched one waits for the next choice from the FIFO
    dd.insert(0, R, 100, 8, now_ns=0)
    assert dd.dispatch(1) == 0
    dd.insert(1, R, 200, 8, now_ns=1)
    dd.insert(2, R, 0, 8, now_ns=2)
    assert drain(dd, 3) == [1, 2]


def test_writes_get_a_turn_after_writes_starved_read_batches(make_dd):
    dd = make_dd(64)
    dd.store_knob("fifo_batch", "2")
    for i in range(10):
        dd.insert(i, R, i * 8, 8, now_ns=0)
    dd.insert(20, W, 1000, 8, now_ns=0)
    order = drain(dd, 1)
    # writes_starved 2: two read batches pass the waiting write, the third choice
    # takes it (batches of fifo_batch 2: 0-1, 2-3)
    assert order == [0, 1, 2, 3, 20, 4, 5, 6, 7, 8, 9]
    dd.store_knob("writes_starved", "0")
    for i in range(4):
        dd.insert(i, R, i * 8, 8, now_ns=0)
    dd.insert(20, W, 1000, 8, now_ns=0)
    assert drain(dd, 2) == [20, 0, 1, 2, 3]


def test_a_batch_goes_on_in_sector_order_for_fifo_batch_requests(make_dd):
    dd = make_dd(64)
    dd.store_knob("fifo_batch", "3")
    for i in range(6):
        dd.insert(i, W, i * 8, 8, now_ns=0)
    dd.insert(10, R, 0, 8, now_ns=0)
    # last_dir starts WRITE but no batch runs: reads are chosen first (none starved
    # yet), then writes_starved lets reads go again... with one read: R, then 3 writes
    # a batch, then the rest
    assert drain(dd, 1) == [10, 0, 1, 2, 3, 4, 5]
    dd.store_knob("fifo_batch", "16")
    for i in range(6):
        dd.insert(i, W, i * 8, 8, now_ns=0)
    dd.insert(10, R, 0, 8, now_ns=0)
    dd.insert(11, R, 8, 8, now_ns=0)
    assert dd.dispatch(1) == 10  # reads first
    dd.insert(12, R, 16, 8, now_ns=0)
    # the batch goes on in sector order (11, 12) while it is under fifo_batch
    assert drain(dd, 2) == [11, 12, 0, 1, 2, 3, 4, 5]


def test_at_head_and_requeues_are_dispatched_first(make_dd):
    dd = make_dd()
    dd.insert(0, R, 0, 8, now_ns=0)
    dd.insert(1, W, 8, 8, now_ns=0)
    dd.insert(2, R, 16, 8, at_head=True, now_ns=0)
    dd.insert(3, R, 24, 8, at_head=True, now_ns=0)  # list_add: the newest first
    assert "internal_tag=3" in dd.debugfs("dispatch1").splitlines()[0]
    assert dd.dispatch(1) == 3
    assert dd.dispatch(1) == 2
    rq = dd.dispatch(1)
    assert rq == 0
    dd.insert(rq, R, 0, 8, at_head=True, now_ns=1)  # a requeue: not counted again
    assert dd.counters()["inserted"] == 4
    assert drain(dd, 2) == [0, 1]
    for rq in (2, 3):
        dd.finish(rq)
    assert dd.counters()["queued"] == 0
    assert not dd.has_work()


def test_insert_requests_under_one_lock_hold(make_dd):
    dd = make_dd()
    dd.insert_requests([(0, R, 16, 8), (1, R, 0, 8), (2, W, 0, 8)], now_ns=0)
    dd.insert_requests([(3, R, 64, 8), (4, R, 72, 8)], at_head=True, now_ns=0)
    assert dd.state()["dispatch"] == [4, 3]  # each list_add goes before the last
    with pytest.raises(ValueError, match="request 0 is already queued"):
        dd.insert_requests([(5, R, 0, 8), (0, R, 0, 8)])
    with pytest.raises(ValueError, match="twice"):
        dd.insert_requests([(5, R, 0, 8), (5, R, 0, 8)])
    with pytest.raises(IndexError, match="out of range"):
        dd.insert_requests([(5, R, 0, 8), (99, R, 0, 8)])
    assert dd.counters()["inserted"] == 5  # the refused calls changed nothing
    assert drain(dd, 1) == [4, 3, 0, 1, 2]


def test_merge_lookups_and_front_merges_knob(make_dd):
    dd = make_dd()
    dd.insert(0, R, 100, 8, now_ns=0)
    dd.insert(1, W, 200, 8, now_ns=0)
    with dd.locked():
        assert dd.find_merge(R, 108, 8) == (ElvMerge.BACK_MERGE, 0)
        assert dd.find_merge(R, 92, 8) == (ElvMerge.FRONT_MERGE, 0)
        assert dd.find_merge(W, 92, 8) == (ElvMerge.NO_MERGE, NIL)  # other direction
        assert dd.find_merge(R, 108, 8, ok=lambda rq: False) == (ElvMerge.NO_MERGE, NIL)
    dd.store_knob("front_merges", "0")
    with dd.locked():
        assert dd.find_merge(R, 92, 8) == (ElvMerge.NO_MERGE, NIL)
        assert dd.find_merge(R, 108, 8) == (ElvMerge.BACK_MERGE, 0)
    with pytest.raises(RuntimeError, match="not held"):
        dd.find_merge(R, 108, 8)
    assert drain(dd, 1) == [0, 1]


def test_a_front_merge_moves_the_request_and_merged_requests_keep_the_earlier_deadline(make_dd):
    dd = make_dd()
    dd.insert(0, R, 100, 8, now_ns=0)
    dd.insert(1, R, 50, 8, now_ns=0)
    dd.insert(2, R, 60, 8, now_ns=10 * MS)  # after 1 in sector order, later deadline
    with dd.locked():
        dd.request_merged(0, 40, 68)  # a front merge: 40..108, now first by sector
        assert dd.former_request(1) == 0
    assert [
        line.split(".sector=")[1].split(",")[0]
        for line in dd.debugfs("read_sort_list").splitlines()
    ] == ["40", "50", "60"]
    with dd.locked():
        dd.request_merged(1, 50, 10)  # a back merge: 50..60, meets rq 2
        assert dd.latter_request(1) == 2
        dd.requests_merged(1, 2)
    dd.finish(2)
    st = dd.state()
    assert st["fifo"] == [[0, 1], []] and st["sort"] == [[0, 1], []]
    assert st["ranges"][1] == (50, 68, 500 * MS)
    # the other way: a later request absorbs an earlier-deadline one's place
    dd.insert(3, R, 200, 8, now_ns=0)
    dd.insert(4, R, 208, 8, now_ns=-5 * MS)  # an earlier deadline than 3's
    with dd.locked():
        dd.requests_merged(3, 4)
    dd.finish(4)
    st = dd.state()
    assert st["fifo"][R] == [0, 1, 3] and st["ranges"][3] == (200, 216, 495 * MS)
    c = dd.counters()
    assert (c["merged"], c["queued"], c["owned_by_driver"]) == (2, 3, 0)
    assert drain(dd, 1) == [0, 1, 3]


def test_async_depth_from_nr_requests_and_limit_depth(make_dd):
    dd = make_dd(64)
    assert dd.debugfs("async_depth") == "48\n"  # 3/4 of 64
    assert dd.limit_depth(R, sync=True) == 0  # a sync read is not throttled
    assert dd.limit_depth(R, sync=False) == 48
    assert dd.limit_depth(W, sync=True) == 48
    assert dd.depth_updated(1) == 1  # at least 1
    assert dd.depth_updated(2) == 1
    assert dd.depth_updated(7) == 5
    assert dd.show_knob("async_depth") == "5\n"
    with pytest.raises(ValueError, match=r"nr_requests must be 1\.\.64"):
        dd.depth_updated(65)


def test_knobs_in_the_kernels_units_and_ranges(make_dd):
    dd = make_dd()
    assert [dd.show_knob(k) for k in ("read_expire", "write_expire", "writes_starved")] == [
        "500\n",
        "5000\n",
        "2\n",
    ]
    assert [dd.show_knob(k) for k in ("front_merges", "fifo_batch")] == ["1\n", "16\n"]
    dd.store_knob("read_expire", "250\n")
    assert dd.show_knob("read_expire") == "250\n"
    dd.insert(0, R, 0, 8, now_ns=0)
    assert dd.state()["ranges"][0][2] == 250 * MS
    dd.store_knob("writes_starved", "-1")
    for name, text, allowed in (
        ("front_merges", "2", "0..1"),
        ("fifo_batch", "-1", "0..2147483647"),
        ("async_depth", "0", "1..2147483647"),
        ("read_expire", "soon", "0..2147483647"),
    ):
        with pytest.raises(KnobError, match=f"^{name}: must be {allowed}, got"):
            dd.store_knob(name, text)
    with pytest.raises(KnobError, match="unknown mq-deadline attribute 'nope'"):
        dd.store_knob("nope", "1")
    assert drain(dd, 1) == [0]


def test_debugfs_shows(make_dd):
    dd = make_dd()
    dd.insert(0, W, 8, 8, now_ns=0)
    dd.insert(1, R, 0, 8, now_ns=0)
    assert set(DEBUGFS) >= {"read1_fifo_list", "queued", "owned_by_driver", "batching"}
    assert dd.debugfs("read1_fifo_list") == (
        "{.op=READ, .internal_tag=1, .sector=0, .nr_sectors=8, .fifo_time=500000000}\n"
    )
    assert dd.debugfs("queued") == "0 2 0\n"
    assert dd.dispatch(1) == 1
    assert dd.debugfs("owned_by_driver") == "0 1 0\n"
    assert dd.debugfs("batching") == "1\n" and dd.debugfs("starved") == "1\n"
    assert dd.debugfs("read_next_rq") == ""
    dd.finish(1)
    assert drain(dd, 1) == [0]
    assert dd.debugfs("queued") == "0 0 0\n"


def test_check_finds_a_broken_link(make_dd):
    dd = make_dd()
    dd.insert(0, R, 0, 8, now_ns=0)
    dd.insert(1, R, 8, 8, now_ns=0)
    dd._r[1 * 8 + 1] = 5  # fifo_prev of request 1
    assert any("back link" in p for p in dd.check())
    dd._r[1 * 8 + 1] = 0
    assert dd.check() == []
    assert drain(dd, 1) == [0, 1]


# -- against the model ---------------------------------------------------------------------

NR_MODEL = 12
_DTS = [0, 0, 1, MS, 100 * MS, 499 * MS, 500 * MS, 5000 * MS]
_KNOB_VALUES = {
    "fifo_batch": [0, 1, 2, 3, 16],
    "writes_starved": [-1, 0, 1, 2, 3],
    "front_merges": [0, 1],
    "read_expire": [0, 1, 100, 500],
    "write_expire": [0, 100, 5000],
}

_op = st.integers(0, 1)
# sectors on a grid of 4 and sizes of 4 or 8: requests meet, so merges happen
_sector = st.integers(0, 16).map(lambda x: x * 4)
_size = st.sampled_from([4, 8])
_insert = st.tuples(st.just("insert"), _op, _sector, _size, st.booleans()).map(
    lambda t: t if not t[4] or t[2] % 5 == 0 else (*t[:4], False)
)
_dispatch = st.tuples(st.just("dispatch"), st.sampled_from(_DTS))
# a bio next to a queued request (picked by index at replay time): at its end, before
# its start, filling the gap to the next one in sector order, or anywhere
_merge = st.tuples(
    st.just("merge"),
    st.integers(0, NR_MODEL),
    st.sampled_from(["back", "front", "fill", "any"]),
    _op,
    _sector,
    _size,
)
_knob = st.sampled_from(sorted(_KNOB_VALUES)).flatmap(
    lambda k: st.tuples(st.just("knob"), st.just(k), st.sampled_from(_KNOB_VALUES[k]))
)
# weighted so that requests pile up (inserts and merges outnumber dispatches)
_WEIGHTED = (
    [_insert] * 4
    + [_merge] * 3
    + [_dispatch] * 3
    + [
        st.tuples(st.just("finish")),
        # the oldest dispatched request back to the head (a requeue), or to the lists
        st.tuples(st.just("requeue"), st.booleans()),
        _knob,
        st.tuples(st.just("depth"), st.integers(1, NR_MODEL)),
    ]
)
_steps = st.integers(0, len(_WEIGHTED) - 1).flatmap(lambda i: _WEIGHTED[i])


def _bio(
    m: DdModel, pick: int, where: str, op: int, sector: int, size: int
) -> tuple[int, int, int] | None:
    """The bio of a merge step: (op, sector, nr_sectors), or None when it has no place."""
    if where == "any" or not m.rqs:
        return op, sector, size
    rq = sorted(m.rqs)[pick % len(m.rqs)]
    r = m.rqs[rq]
    if where == "back":
        return r.dir, r.end, size
    if where == "front":
        return (r.dir, r.sector - size, size) if r.sector >= size else None
    nxt = m.latter(rq)
    if nxt is None or m.rqs[nxt].sector <= r.end:
        return None
    return r.dir, r.end, m.rqs[nxt].sector - r.end


def _merge_both(dd: DeadlineData, m: DdModel, op: int, sector: int, nr: int) -> int:
    """A bio merge as blk_mq_sched_try_merge() does it: the lookup, the bio merge, then
    a merge with the neighbour it now touches; the request freed, or -1."""
    freed = NIL
    with dd.locked():
        kind, rq = dd.find_merge(op, sector, nr)
        assert (int(kind), rq) == m.find_merge(op, sector, nr)
        if kind == ElvMerge.BACK_MERGE:
            start = m.rqs[rq].sector
            dd.request_merged(rq, start, sector + nr - start)
            m.request_merged(rq, start, sector + nr - start)
            nxt = dd.latter_request(rq)
            assert nxt == (m.latter(rq) if m.latter(rq) is not None else NIL)
            if nxt != NIL and m.rqs[nxt].sector == m.rqs[rq].end:
                dd.requests_merged(rq, nxt)
                m.requests_merged(rq, nxt)
                freed = nxt
        elif kind == ElvMerge.FRONT_MERGE:
            end = m.rqs[rq].end
            dd.request_merged(rq, sector, end - sector)
            m.request_merged(rq, sector, end - sector)
            prev = dd.former_request(rq)
            assert prev == (m.former(rq) if m.former(rq) is not None else NIL)
            if prev != NIL and m.rqs[prev].end == m.rqs[rq].sector:
                dd.requests_merged(prev, rq)
                m.requests_merged(prev, rq)
                freed = rq
    return freed


def test_same_dispatch_order_as_the_model():
    layout = Layout()
    spec = DeadlineData.declare(layout, "q0", NR_MODEL)
    with Arena.create(layout) as arena:

        @settings(
            max_examples=250,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.lists(_steps, min_size=20, max_size=80))
        def run(steps: list[tuple]) -> None:
            DeadlineData.init(arena, spec)
            dd = DeadlineData(arena, spec)
            try:
                _replay(dd, DdModel(NR_MODEL), steps)
            finally:
                dd.close()

        run()


def _replay(dd: DeadlineData, m: DdModel, steps: list[tuple]) -> None:
    now = 0
    in_flight: list[int] = []  # dispatched, not finished: oldest first
    queued: set[int] = set()
    ops: dict[int, int] = {}  # each request's op, for a requeue
    requeues = 0
    for step in steps:
        kind = step[0]
        if kind == "insert":
            _, op, sector, nr, at_head = step
            free = [rq for rq in range(NR_MODEL) if rq not in queued and rq not in in_flight]
            if not free:
                continue
            rq = free[0]
            dd.insert(rq, op, sector, nr, at_head, now)
            m.insert(rq, op, sector, nr, at_head, now)
            ops[rq] = op
            queued.add(rq)
        elif kind == "dispatch":
            now += step[1]
            got = dd.dispatch(now)
            assert got == m.dispatch(now), f"dispatch at {now}"
            if got != NIL:
                queued.remove(got)
                in_flight.append(got)
        elif kind == "finish":
            if in_flight:
                rq = in_flight.pop(0)
                dd.finish(rq)
                m.finish(rq)
        elif kind == "requeue":
            if in_flight:
                rq = in_flight.pop(0)
                r = dd.rq_range(rq)
                dd.insert(rq, ops[rq], r[0], r[1], step[1], now)
                m.insert(rq, ops[rq], r[0], r[1], step[1], now)
                queued.add(rq)
                requeues += 1
        elif kind == "merge":
            bio = _bio(m, *step[1:])
            if bio is None:
                continue
            freed = _merge_both(dd, m, *bio)
            if freed != NIL:
                queued.remove(freed)
                dd.finish(freed)
                m.finish(freed)
        elif kind == "knob":
            dd.store_knob(step[1], str(step[2]))
            m.store(step[1], step[2])
        else:
            assert dd.depth_updated(step[1]) == m.depth_updated(step[1])
            assert dd.limit_depth(W, False) == m.limit_depth(W, False)
        assert dd.check() == []
        assert dd.state() == m.state()
        assert dd.counters() == m.counters()
        assert dd.has_work() == m.has_work()
    # drain both: the same order to the end
    while True:
        now += MS
        got = dd.dispatch(now)
        assert got == m.dispatch(now)
        if got == NIL:
            break
        dd.finish(got)
        m.finish(got)
    for rq in in_flight:
        dd.finish(rq)
        m.finish(rq)
    assert dd.counters() == m.counters()
    # a requeued request is dispatched again and counted again, as in v6.1 (mq-deadline
    # has no requeue_request op), so it stays in owned_by_driver
    assert dd.counters()["queued"] == 0 and dd.counters()["owned_by_driver"] == requeues
    assert dd.check() == []


# -- real processes ------------------------------------------------------------------------

INSERTERS, PER_INSERTER = 3, 60
#: the sectors of one inserter's bios: far from the others', so no merge crosses over
REGION = 1 << 20


def _inserter(arena_handle, layout: Layout, spec: DeadlineSpec, k: int) -> None:
    """Submit PER_INSERTER bios of 8 sectors in this inserter's region, the even slots
    first (then say so in ``halves``), then the odd ones, each as the block layer
    would: a back merge into a queued request if one ends where the bio starts (then a
    merge with the request that now follows it, freeing that one), else a front merge,
    else a new request.  The ids this
    inserter used and freed are recorded in its row of ``<q>.ids``."""
    with Arena.attach(arena_handle, layout) as arena:
        dd = DeadlineData(arena, spec)
        ids = arena.view("ids")
        halves_off = layout["halves"].offset
        next_id = k * 2 * PER_INSERTER
        try:
            slots = list(range(0, PER_INSERTER, 2)) + list(range(1, PER_INSERTER, 2))
            for n, slot in enumerate(slots):
                sector, op = k * REGION + slot * 8, k % 2
                freed = NIL
                with dd.locked():
                    kind, rq = dd.find_merge(op, sector, 8)
                    if kind == ElvMerge.BACK_MERGE:
                        start, size = dd.rq_range(rq)
                        dd.request_merged(rq, start, size + 8)
                        nxt = dd.latter_request(rq)
                        if nxt != NIL and dd.rq_range(nxt)[0] == sector + 8:
                            dd.requests_merged(rq, nxt)
                            freed = nxt
                    elif kind == ElvMerge.FRONT_MERGE:
                        start, size = dd.rq_range(rq)
                        dd.request_merged(rq, sector, size + 8)
                if freed != NIL:
                    dd.finish(freed)
                    ids[freed]["freed"] += 1
                if kind == ElvMerge.NO_MERGE:
                    rq, next_id = next_id, next_id + 1
                    ids[rq]["used"] += 1
                    dd.insert(rq, op, sector, 8, at_head=n % 13 == 0, now_ns=time.monotonic_ns())
                if n + 1 == (PER_INSERTER + 1) // 2:
                    arena.atomic.fetch_add(halves_off, 1)  # the even half is queued
                if n % 8 == 0:
                    os.sched_yield()
        finally:
            del ids
            dd.close()


def test_concurrent_inserters_and_one_dispatcher_dispatch_every_request_once():
    nr = INSERTERS * 2 * PER_INSERTER
    layout = Layout()
    spec = DeadlineData.declare(layout, "q0", nr)
    layout.add("ids", np.dtype([("used", "<i8"), ("freed", "<i8")]), nr)
    layout.add("halves", "<u8")
    with Arena.create(layout) as arena:
        DeadlineData.init(arena, spec)
        dd = DeadlineData(arena, spec)
        procs = [
            ctx.Process(target=_inserter, args=(arena.handle, layout, spec, k))
            for k in range(INSERTERS)
        ]
        for p in procs:
            p.start()
        seen: Counter[int] = Counter()
        sectors = 0
        deadline = time.monotonic() + DEADLOCK_TIMEOUT  # only a hang guard
        try:
            # dispatch from the moment every inserter queued its even half: the odd
            # halves' merges then race with the dispatches
            halves = layout["halves"].offset
            while arena.atomic.read(halves) < INSERTERS and time.monotonic() < deadline:
                os.sched_yield()
            while time.monotonic() < deadline:
                if not dd.has_work():
                    if not any(p.is_alive() for p in procs) and not dd.has_work():
                        break
                    os.sched_yield()
                    continue
                rq = dd.dispatch(time.monotonic_ns())
                if rq != NIL:
                    seen[rq] += 1
                    sectors += dd.rq_range(rq)[1]
                    dd.finish(rq)
        finally:
            for p in procs:
                p.join(DEADLOCK_TIMEOUT)
                if p.is_alive():
                    p.kill()
                    p.join()
        assert [p.exitcode for p in procs] == [0] * INSERTERS
        assert dd.dispatch(time.monotonic_ns()) == NIL and not dd.has_work()
        ids = arena.view("ids")
        used = {rq for rq in range(nr) if ids[rq]["used"]}
        freed = {rq for rq in range(nr) if ids[rq]["freed"]}
        assert set(ids["used"]) <= {0, 1} and set(ids["freed"]) <= {0, 1}
        # every request either dispatched once or merged away once, never both
        assert set(seen.values()) == {1} and set(seen) | freed == used
        assert not set(seen) & freed
        # every bio's sectors reached the dispatcher, in some request, exactly once
        assert sectors == INSERTERS * PER_INSERTER * 8
        assert dd.check() == []
        assert dd.counters() == {
            "inserted": len(used),
            "merged": len(freed),
            "dispatched": len(seen),
            "completed": len(used),
            "queued": 0,
            "owned_by_driver": 0,
        }
        print(f"requests {len(used)}, merged away {len(freed)}")
        del ids
        dd.close()

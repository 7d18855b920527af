"""mqrt.lib.trace: ring order and wrap-around in one process, exact tails and no torn
records across real writer processes, dumps and the text view."""

from __future__ import annotations

import pickle
import time

import pytest

from mqrt.lib._atomic import TraceWriter
from mqrt.lib.shm import Arena, Layout, cacheline_struct
from mqrt.lib.trace import (
    RECORD,
    RECORD_DTYPE,
    Ev,
    NullTracer,
    Record,
    TraceError,
    Tracer,
    TraceSpec,
    dump_msgpack,
    format_records,
    last_events,
    load_msgpack,
    read_all,
    read_ring,
    render_dump,
)
from tests.helpers import ctx, run_processes

pytestmark = pytest.mark.timing

STOP = cacheline_struct([("stop", "<u8")], [("ready", "<u8")])


def check(r: Record) -> None:
    """The per-record invariant every writer in this file keeps."""
    assert r.arg == r.tag * 7 + r.cpu, r
    assert r.gen == (r.tag ^ 0x5A5A5A5A) & 0xFFFFFFFF, r
    assert r.hctx == r.cpu + 1 and r.q == r.tag % 3 and r.ev == Ev.MARK, r


def emit_numbered(tracer: Tracer, i: int) -> None:
    cpu = tracer.cpu
    tracer.emit(Ev.MARK, i, i ^ 0x5A5A5A5A, cpu + 1, i % 3, i * 7 + cpu)


@pytest.fixture
def trace():
    layout = Layout()
    spec = TraceSpec.declare(layout, nr_cpus=3, entries=8)
    with Arena.create(layout) as arena:
        yield arena, spec


def test_record_layout_and_spec():
    assert RECORD.size == 32 == RECORD_DTYPE.itemsize
    assert RECORD_DTYPE.names == Record._fields
    assert len({int(e) for e in Ev}) == len(Ev) and min(Ev) == 1
    layout = Layout()
    spec = TraceSpec.declare(layout, nr_cpus=2)
    assert spec.entries == 4096
    assert spec.head_offset(1) - spec.head_offset(0) == 64  # one cache line each
    assert spec.ring_offset(1) - spec.ring_offset(0) == 4096 * 32
    assert pickle.loads(pickle.dumps(spec)) == spec
    with pytest.raises(TraceError, match="power of two"):
        TraceSpec.declare(Layout(), 2, entries=12)
    with pytest.raises(IndexError):
        spec.ring_offset(2)


def test_single_writer_wraps_and_keeps_the_newest_in_order(trace):
    arena, spec = trace
    tr = Tracer(arena, spec, cpu=1)
    assert read_ring(arena, spec, 1) == []
    for i in range(5):
        emit_numbered(tr, i)
    assert [r.tag for r in read_ring(arena, spec, 1)] == list(range(5))  # not wrapped
    for i in range(5, 21):
        emit_numbered(tr, i)
    assert tr.head == 21
    quiet = read_ring(arena, spec, 1, quiescent=True)
    assert [r.tag for r in quiet] == list(range(13, 21))
    for r in quiet:
        check(r)
    assert [r.t_ns for r in quiet] == sorted(r.t_ns for r in quiet)
    # Live readers also drop the oldest slot: the writer could be rewriting it.
    assert read_ring(arena, spec, 1) == quiet[1:]
    # The numpy view of the same bytes agrees with the decoded records.
    view = arena.view(spec.records)[8:16]
    assert sorted(view["tag"].tolist()) == list(range(13, 21))
    # Other CPUs' rings are untouched; a new tracer for the CPU continues its ring.
    assert read_ring(arena, spec, 0) == [] and read_ring(arena, spec, 2) == []
    tr2 = Tracer(arena, spec, cpu=1, barrier=True)
    emit_numbered(tr2, 21)
    assert [r.tag for r in read_ring(arena, spec, 1, quiescent=True)] == list(range(14, 22))


def test_emit_defaults_truncation_and_bad_fields(trace):
    arena, spec = trace
    tr = Tracer(arena, spec, cpu=0)
    tr.emit(Ev.IRQ, arg=3)
    tr.emit(Ev.TAG_GET, tag=2**31 + 5, gen=2**40 + 9, hctx=70_000, q=1, arg=-(2**63) - 1)
    with pytest.raises(TypeError, match="gen, arg must be integers"):
        tr.emit(Ev.TAG_PUT, tag=4, gen=1.5, arg="x")  # type: ignore[arg-type]
    recs = read_ring(arena, spec, 0)
    assert [r[1:] for r in recs] == [
        (0, Ev.IRQ, 0, 0, -1, 0, 3),
        (0, Ev.TAG_GET, 70_000 - 65_536, 1, -(2**31) + 5, 9, 2**63 - 1),
        (0, Ev.TAG_PUT, 0, 0, 4, 0, 0),  # written whole and published, then raised
    ]
    assert tr.head == 3


def test_emit_stamps_the_monotonic_clock_and_rejects_bad_calls_unwritten(trace):
    arena, spec = trace
    tr = Tracer(arena, spec, cpu=1)
    before = time.monotonic_ns()
    tr.emit(Ev.MARK, 1)
    after = time.monotonic_ns()
    (rec,) = read_ring(arena, spec, 1)
    assert before <= rec.t_ns <= after
    for call, match in [
        (lambda: tr.emit(Ev.MARK, bogus=1), "unexpected keyword argument 'bogus'"),
        (lambda: tr.emit(Ev.MARK, 1, tag=2), "repeated keyword argument 'tag'"),
        (lambda: tr.emit(tag=2), "missing required argument 'ev'"),
        (lambda: tr.emit(1, 2, 3, 4, 5, 6, 7), "at most 6 arguments"),
    ]:
        with pytest.raises(TypeError, match=match):
            call()
    assert tr.head == 1  # a call rejected before writing writes nothing


def test_trace_writer_checks_its_geometry_and_outlives_no_buffer(trace):
    arena, spec = trace
    a = arena.atomic
    ring, head = spec.ring_offset(0), spec.head_offset(0)
    with pytest.raises(ValueError, match="power of two"):
        TraceWriter(a, ring, 6, head, 0, 0)
    with pytest.raises(ValueError, match="does not fit"):
        TraceWriter(a, a.nbytes - 64, 4, head, 0, 0)
    with pytest.raises(ValueError, match="not an aligned word"):
        TraceWriter(a, ring, 8, head + 4, 0, 0)
    with pytest.raises(ValueError, match="cpu must be"):
        TraceWriter(a, ring, 8, head, 70_000, 0)
    w = TraceWriter(a, ring, 8, head, 0, 5)
    w.emit(Ev.MARK)
    assert w.position == 6 and a.read(head) == 6
    arena.close()  # releases the buffer under the writer: an error, never a crash
    with pytest.raises(ValueError, match="released"):
        w.emit(Ev.MARK)


def test_null_tracer_is_a_no_op(trace):
    arena, spec = trace
    null = NullTracer(cpu=2)
    assert not null.enabled and Tracer(arena, spec, 0).enabled
    assert null.emit(Ev.TAG_GET, 1, 2, 0, 0, 3) is None
    assert null.head == 0 and read_all(arena, spec) == []


N_WRITE = 30_000


def _writer(handle, layout, spec, cpu, barrier):
    with Arena.attach(handle, layout) as arena:
        tr = Tracer(arena, spec, cpu, barrier=barrier)
        for i in range(N_WRITE):
            emit_numbered(tr, i)


@pytest.mark.parametrize("barrier", [False, True])
def test_concurrent_writers_exact_tails_merged_by_time(barrier):
    layout = Layout()
    spec = TraceSpec.declare(layout, nr_cpus=3, entries=1024)
    with Arena.create(layout) as arena:
        h = arena.handle
        run_processes(*[(_writer, (h, layout, spec, c, barrier)) for c in range(3)])
        recs = read_all(arena, spec, quiescent=True)
        assert len(recs) == 3 * 1024
        assert [r.t_ns for r in recs] == sorted(r.t_ns for r in recs)
        for cpu in range(3):
            mine = [r for r in recs if r.cpu == cpu]
            assert [r.tag for r in mine] == list(range(N_WRITE - 1024, N_WRITE))
            for r in mine:
                check(r)
        # A live read also drops each wrapped ring's oldest slot.
        assert read_all(arena, spec) == [r for r in recs if r.tag != N_WRITE - 1024]
        tail = last_events(recs, 5)
        assert [r.tag for r in tail if r.cpu == 2] == list(range(N_WRITE - 5, N_WRITE))
        assert len(tail) == 15 and tail == sorted(tail, key=lambda r: r.t_ns)


def _endless_writer(handle, layout, spec, ctl, barrier):
    with Arena.attach(handle, layout) as arena:
        a = arena.atomic
        tr = Tracer(arena, spec, 1, barrier=barrier)
        stop = ctl.addr(0, "stop")
        a.store_release(ctl.addr(0, "ready"), 1)
        i = 0
        while not a.load_acquire(stop):
            for _ in range(64):
                emit_numbered(tr, i)
                i += 1


@pytest.mark.parametrize("barrier", [False, True])
def test_reading_while_writing_never_returns_a_torn_record(barrier):
    layout = Layout()
    spec = TraceSpec.declare(layout, nr_cpus=2, entries=16)  # wraps every few µs
    ctl = layout.add("ctl", STOP)
    with Arena.create(layout) as arena:
        a = arena.atomic
        p = ctx.Process(target=_endless_writer, args=(arena.handle, layout, spec, ctl, barrier))
        p.start()
        reads = moved = 0
        try:
            deadline = time.monotonic() + 5.0
            while not a.load_acquire(ctl.addr(0, "ready")):
                assert time.monotonic() < deadline, "writer did not start"
                time.sleep(0.001)
            # At least 0.3 s, and on a busy host up to 3 s until the writer was
            # seen writing during 20 reads.
            start = time.monotonic()
            while (elapsed := time.monotonic() - start) < 0.3 or (moved < 20 and elapsed < 3):
                before = a.load_acquire(spec.head_offset(1))
                recs = read_ring(arena, spec, 1)
                moved += a.load_acquire(spec.head_offset(1)) != before
                reads += 1
                assert len(recs) <= 15
                for r in recs:
                    check(r)
                if recs:  # one contiguous run of record numbers, oldest first
                    first = recs[0].tag
                    assert [r.tag for r in recs] == list(range(first, first + len(recs)))
                assert [r.t_ns for r in recs] == sorted(r.t_ns for r in recs)
        finally:
            a.store_release(ctl.addr(0, "stop"), 1)
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        assert p.exitcode == 0
        assert moved > 0, (reads, moved)  # the race was really run
        final = read_ring(arena, spec, 1, quiescent=True)
        assert len(final) == 16 and final[-1].tag == a.read(spec.head_offset(1)) - 1


def sample() -> list[Record]:
    t = 1_000_000_000
    return [
        Record(t, 0, Ev.TAG_GET, 0, 0, 17, 3, 0),
        Record(t + 12_345, 1, Ev.WAKE_UP, 0, 0, -1, 0, 4),
        Record(t + 5_000, 1, Ev.TAG_SLEEP, 1, 2, -1, 0, 0),
        Record(t + 1_234_567, 0, Ev.IRQ, 1, 0, -1, 0, 2),
        Record(t + 1_300_000, 10, 999, 0, 0, 5, 1, -7),  # an event from a newer mqrt
    ]


EXPECTED = """\
+   0.000 us  cpu0   TAG_GET    q0  hctx0  tag=17  gen=3
+   5.000 us  cpu1   TAG_SLEEP  q2  hctx1  tag=-   gen=-  wq=0
+  12.345 us  cpu1   WAKE_UP    q0  hctx0  tag=-   gen=-  woke=4
+1234.567 us  cpu0   IRQ        q0  hctx1  tag=-   gen=-  cqes=2
+1300.000 us  cpu10  EV999      q0  hctx0  tag=5   gen=1  arg=-7"""


def test_text_view_is_time_ordered_and_aligned():
    assert format_records(sample()) == EXPECTED
    assert format_records([]) == "(no trace events)"
    shifted = format_records(sample()[:1], t0_ns=1_000_000_000 - 2_500)
    assert shifted.startswith("+2.500 us  cpu0  TAG_GET  q0  hctx0  tag=17  gen=3")


def test_msgpack_round_trip_and_render(tmp_path, trace):
    arena, spec = trace
    for cpu in range(3):
        tr = Tracer(arena, spec, cpu)
        for i in range(cpu * 4, cpu * 4 + 10):
            emit_numbered(tr, i)
    recs = read_all(arena, spec, quiescent=True)
    path = dump_msgpack(recs, tmp_path / "trace.msgpack", {"seed": 7, "failure": "lost wake-up"})
    dump = load_msgpack(path)
    assert dump.records == recs and all(isinstance(r, Record) for r in dump.records)
    assert dump.meta == {"seed": 7, "failure": "lost wake-up"}
    assert dump.names[int(Ev.TAG_WAKE)] == "TAG_WAKE"

    dump_msgpack(sample(), tmp_path / "s.msgpack", {"seed": 1})
    text = render_dump(tmp_path / "s.msgpack")
    lines = text.splitlines()
    assert lines[0] == "# mqrt trace s.msgpack: 5 events, cpus 0,1,10, 1300.000 us"
    assert lines[1] == "# seed: 1"
    assert "\n".join(lines[2:]) == EXPECTED

    (tmp_path / "bad").write_bytes(b"\x91\x01")
    with pytest.raises(TraceError, match="not an mqrt trace dump"):
        load_msgpack(tmp_path / "bad")

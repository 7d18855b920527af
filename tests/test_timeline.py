"""The timeline of sysfs writes (``--at``, ``--every``, job files' ``at=``/``every=``):
its syntax and validation at the edge, and real runs whose CPU 0 writer task makes
the writes (workers/kthread.py), reported as transitions."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from mqrt.bench import report as report_mod
from mqrt.bench import text as text_mod
from mqrt.bench.jobfile import parse_jobfile_text
from mqrt.bench.main import _section_timeline, build
from mqrt.bench.timeline import (
    TimelineError,
    parse_at,
    parse_every,
    parse_time_ns,
    ticks,
)
from mqrt.block import blk_sysfs
from mqrt.block.blk_sysfs import Attribute, Sleep, Wait
from mqrt.lib.knobs import KnobError
from mqrt.lib.wait import WaitQueue
from mqrt.runtime.owner import run
from tests.helpers import interrupt
from tests.test_cli import mqrt

# -- syntax -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ns"),
    [("2s", 2 * 10**9), ("2.5s", 2_500_000_000), ("500ms", 500_000_000), ("250us", 250_000),
     ("2", 2 * 10**9), ("0.3", 300_000_000), ("25ms", 25_000_000)],
)  # fmt: skip
def test_times(text, ns):
    assert parse_time_ns(text) == ns


def test_the_documented_examples_parse():
    w = parse_at("2s:nullb0/queue/nr_requests=32", "--at")
    assert (w.kind, w.at_ns, w.dev, w.attr, w.value) == (
        "at", 2 * 10**9, "nullb0", "queue/nr_requests", 32,
    )  # fmt: skip
    e = parse_every("50ms@1s..3s:queue/nr_requests=16", "--every")
    assert (e.kind, e.period_ns, e.at_ns, e.until_ns, e.dev, e.value) == (
        "every", 50_000_000, 10**9, 3 * 10**9, None, 16,
    )  # fmt: skip
    e = parse_every("10ms:nvme0n1/queue/nr_requests=8")
    assert (e.at_ns, e.until_ns, e.dev) == (0, -1, "nvme0n1")


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (parse_at, "2x:queue/nr_requests=4",
         "--at: '2x:queue/nr_requests=4': bad time '2x' (e.g. 2s, 2.5s, 500ms, 250us; "
         "a bare number is seconds)"),
        (parse_at, "-1s:queue/nr_requests=4", "bad time '-1s'"),
        (parse_at, "queue/nr_requests=4", "expected TIME:WRITE"),
        (parse_at, "1s:nullb0/queue/scheduler=bfq",
         "queue/scheduler: must be one of none, mq-deadline, got 'bfq'"),
        (parse_at, "1s:nullb0/queue/iosched/fifo_batch=-1",
         "queue/iosched/fifo_batch: must be 0..2147483647, got '-1'"),
        (parse_at, "1s:nullb0/queue/iosched/quantum=8",
         "unknown attribute 'queue/iosched/quantum' (known: queue/nr_requests, "),
        (parse_at, "1s:thaw", "unknown attribute 'thaw' (known: queue/nr_requests, "),
        (parse_at, "1s:queue/nr_requests=many",
         "queue/nr_requests: must be an integer >= 1, got 'many'"),
        (parse_at, "1s:queue/nr_requests=0", "must be an integer >= 1, got '0'"),
        (parse_at, "1s:queue/nr_requests", "queue/nr_requests needs a value"),
        (parse_every, "50ms@3s..1s:queue/nr_requests=16",
         "the window '3s..1s' is empty (FROM must be before TO)"),
        (parse_every, "50ms@1s..1s:queue/nr_requests=16", "is empty"),
        (parse_every, "500us:queue/nr_requests=16", "period '500us' is below the shortest, 1ms"),
        (parse_every, "50ms@1s..x:queue/nr_requests=16", "bad end 'x'"),
        (parse_every, "fast:queue/nr_requests=16", "bad period 'fast'"),
    ],
)  # fmt: skip
def test_bad_writes_are_one_line_errors_naming_the_option_and_the_part(parse, text, message):
    option = "--at" if parse is parse_at else "--every"
    with pytest.raises(TimelineError) as exc:
        parse(text, option)
    msg = str(exc.value)
    assert msg.startswith(f"{option}: {text!r}: ") and message in msg and "\n" not in msg


def _build(given, *writes):
    return build({"runtime": "1", **given}, list(writes))


def test_validation_against_the_runs_queues():
    spec, config = _build({"nr_devices": "2"}, parse_at("1s:nullb1/queue/nr_requests=64", "--at"))
    assert config["timeline"] == ["at 1s:nullb1/queue/nr_requests=64"]
    assert spec.timeline is not None and spec.timeline[0].dev == "nullb1"
    with pytest.raises(TimelineError, match=r"'nullb2' is not a queue of this run \(its queues: "
                       r"nullb0, nullb1\)"):  # fmt: skip
        _build({"nr_devices": "2"}, parse_at("1s:nullb2/queue/nr_requests=8", "--at"))
    with pytest.raises(TimelineError, match="'nullb0' is not a queue"):
        _build({"driver": "nvme"}, parse_at("1s:nullb0/queue/nr_requests=8", "--at"))
    with pytest.raises(
        TimelineError, match=r"queue/nr_requests: nullb0 takes 1\.\.64 \(its tag depth\), got 65"
    ):
        _build({}, parse_at("1s:queue/nr_requests=65", "--at"))
    # nvme: the SQ keeps one slot empty
    _build({"driver": "nvme", "io_queue_depth": "64"}, parse_at("1s:queue/nr_requests=63"))
    with pytest.raises(TimelineError, match=r"nvme0n1 takes 1\.\.63"):
        _build({"driver": "nvme", "io_queue_depth": "64"}, parse_at("1s:queue/nr_requests=64"))


def test_command_line_errors_are_one_line(tmp_path):
    for args, expected in [
        (["--at", "1s:nullb0/queue/scheduler=bfq"],
         "mqrt: error: --at: '1s:nullb0/queue/scheduler=bfq': queue/scheduler: must be one "
         "of none, mq-deadline, got 'bfq'"),
        (["--mode", "sq", "--at", "1s:queue/scheduler=mq-deadline"],
         "mqrt: error: --at: '1s:queue/scheduler=mq-deadline': --mode sq has no elevator "
         "(use --mode mq)"),
        (["--every", "50ms@2s..1s:queue/nr_requests=8"],
         "mqrt: error: --every: '50ms@2s..1s:queue/nr_requests=8': the window '2s..1s' is "
         "empty (FROM must be before TO)"),
        (["--hw_queue_depth", "16", "--at", "1s:queue/nr_requests=32"],
         "mqrt: error: --at: '1s:queue/nr_requests=32': queue/nr_requests: nullb0 takes "
         "1..16 (its tag depth), got 32"),
    ]:  # fmt: skip
        out = mqrt("bench", "--runtime", "0.2", *args)
        assert out.returncode == 2
        assert out.stderr.strip().startswith(expected) and out.stderr.count("\n") == 1
    help_text = mqrt("bench", "--help").stdout
    assert "--at TIME:WRITE" in help_text and "--every PERIOD[@FROM[..TO]]:WRITE" in help_text


JOBFILE = """\
[global]
runtime=1
at=0.2s:queue/nr_requests=8
[a]
every=100ms@300ms..500ms:nullb0/queue/nr_requests=16
at = 0.6s:queue/nr_requests=64
"""


def test_job_file_lines_add_writes_with_their_lines():
    (sec,) = parse_jobfile_text(JOBFILE, None, "jobs.fio")
    assert "at" not in sec.options and "every" not in sec.options
    writes = _section_timeline(sec)
    assert [(w.kind, w.text, w.source) for w in writes] == [
        ("at", "0.2s:queue/nr_requests=8", "jobs.fio:3: at"),
        ("every", "100ms@300ms..500ms:nullb0/queue/nr_requests=16", "jobs.fio:5: every"),
        ("at", "0.6s:queue/nr_requests=64", "jobs.fio:6: at"),
    ]
    bad = JOBFILE.replace("at = 0.6s", "at = 0.6x")
    (sec,) = parse_jobfile_text(bad, None, "jobs.fio")
    with pytest.raises(KnobError, match=r"^jobs\.fio:6: at: '0\.6x:queue/nr_requests=64': bad "):
        _section_timeline(sec)


def test_job_file_value_out_of_range_names_its_line(tmp_path):
    path = tmp_path / "jobs.fio"
    path.write_text(JOBFILE.replace("nr_requests=16", "nr_requests=99"))
    out = mqrt("bench", str(path))
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"mqrt: error: {path}:5: every: '100ms@300ms..500ms:nullb0/queue/nr_requests=99': "
        "queue/nr_requests: nullb0 takes 1..64 (its tag depth), got 99"
    )


# -- real runs ---------------------------------------------------------------------------------

#: A run the writes land in: 2 CPUs keeping 16 I/Os each, timer completions.
LOADED = {"cpus": "2", "irqmode": "timer", "completion_nsec": "50000", "iodepth": "16"}


def test_at_writes_resize_the_tag_bitmap_in_order():
    spec, _ = build(
        {**LOADED, "runtime": "1.5", "nr_devices": "2", "shared_tags": "0"},
        [
            parse_at("0.2s:nullb0/queue/nr_requests=8", "--at"),
            parse_at("0.5s:queue/nr_requests=32", "--at"),
            parse_at("0.7s:nullb1/queue/nr_requests=64", "--at"),
        ],
    )
    result = run(spec)
    assert result.invariants["violations"] == 0
    trans = result.sysfs["transitions"]
    # the write without a device goes to each queue in turn
    assert [(t["write"], t["dev"], t["value"]) for t in trans] == [
        ("0.2s:nullb0/queue/nr_requests=8", "nullb0", "8"),
        ("0.5s:queue/nr_requests=32", "nullb0", "32"),
        ("0.5s:queue/nr_requests=32", "nullb1", "32"),
        ("0.7s:nullb1/queue/nr_requests=64", "nullb1", "64"),
    ]
    assert all(t["attr"] == "queue/nr_requests" for t in trans)
    # the depth each write found and left, read back from the shared tag bitmap
    assert [(t["nr_requests_before"], t["nr_requests"]) for t in trans] == [
        (64, 8), (8, 32), (64, 32), (32, 64),
    ]  # fmt: skip
    assert [t["scheduled_ns"] for t in trans] == [2e8, 5e8, 5e8, 7e8]
    for t in trans:
        assert t["scheduled_ns"] <= t["start_ns"] <= t["end_ns"]
        assert t["duration_ns"] == t["end_ns"] - t["start_ns"]
    starts = [t["start_ns"] for t in trans]
    assert starts == sorted(starts)
    assert [(w["started"], w["skipped"]) for w in result.sysfs["writes"]] == [(1, 0)] * 3


def test_every_makes_the_ticks_of_its_window_less_the_skipped_ones():
    every = parse_every("20ms@100ms..700ms:queue/nr_requests=16", "--every")
    after_end = parse_at("5s:queue/nr_requests=8", "--at")  # after the deadline: not made
    spec, _ = build({**LOADED, "runtime": "0.8"}, [every, after_end])
    result = run(spec)
    assert result.invariants["violations"] == 0
    w_every, w_at = result.sysfs["writes"]
    due = ticks(every, 800_000_000)
    assert due == 30
    trans = result.sysfs["transitions"]
    assert len(trans) == w_every["started"] == due - w_every["skipped"]
    assert w_at["started"] == 0 and ticks(after_end, 800_000_000) == 0
    for t in trans:
        assert 100_000_000 <= t["scheduled_ns"] < 700_000_000
        assert (t["scheduled_ns"] - 100_000_000) % 20_000_000 == 0
        assert t["nr_requests"] == 16


def test_bench_reports_the_transitions():
    out = mqrt(
        "bench", "--runtime", "1.5", "--cpus", "2", "--irqmode", "timer", "--quiet",
        "--at", "0.2s:queue/nr_requests=8", "--every", "100ms@300ms..600ms:queue/nr_requests=32",
        "--output-format", "json,normal",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout[out.stdout.index("\nnullb0: (") :]
    report = json.loads(out.stdout[: len(out.stdout) - len(text)])
    tr = report["mqrt"]["points"][0]["run"]["transitions"]
    assert report["mqrt"]["schema"] == "mqrt.bench/4"
    at, every = tr["writes"]
    # each tick made or skipped (a host that keeps CPU 0 off its core past the end)
    assert at["started"] + at["skipped"] == 1 and every["started"] + every["skipped"] == 3
    assert len(tr["list"]) == at["started"] + every["started"]
    s = tr["summary"]["queue/nr_requests"]
    assert s["count"] == len(tr["list"]) and s["errors"] == 0 and s["violations"] == 0
    assert s["duration_ns_max"] >= s["duration_ns_median"] > 0
    assert s["fields_median"]["nr_requests"] in (8, 20, 32)
    assert "mqrt: transitions:" in text
    assert f"  queue/nr_requests: {s['count']} writes, duration median" in text
    assert (
        f"  at 0.2s:queue/nr_requests=8: {at['started']} started, 0 late, {at['skipped']} skipped"
    ) in text


def test_the_summary_sums_what_a_transition_must_never_see():
    base = {"attr": "freeze", "duration_ns": 10}
    sysfs = {
        "writes": [{"write": "1s:freeze", "kind": "at", "started": 2, "late": 0, "skipped": 0}],
        "transitions": [
            {**base, "refs_while_frozen": 0, "started_while_frozen": 2, "in_flight": 5},
            {**base, "refs_while_frozen": 1, "started_while_frozen": 0, "in_flight": 7},
        ],
    }
    s = report_mod.transitions(sysfs)["summary"]["freeze"]
    assert s["violations"] == 3
    assert s["fields_median"]["in_flight"] == 6
    out = io.StringIO()
    text_mod._transition_lines(report_mod.transitions(sysfs), out)
    assert "freeze: 2 writes, 3 violations, duration median" in out.getvalue()


# -- a store that sleeps: Wait and Sleep through the runner ----------------------------------


def _store_wait_for_completions(ctx, q, n):
    """Sleep on hctx 0's first tag wait queue until this CPU's block layer completed
    ``n`` more requests, then 1 ms on a timer; what it saw."""
    mq = ctx.mq
    completed = mq.counters
    start = completed()["completed"]
    head = mq.queues[q].hctxs[0].tags.bitmap_tags.ws[0].head
    woken = 0

    def done() -> bool:
        return completed()["completed"] >= start + n

    try:
        yield Wait(head, done)
        woken = 1
        yield Sleep(1_000_000)
    finally:
        # a closed store leaves nothing queued: the runner took it off the queue
        assert ctx.waiters.me not in WaitQueue(ctx.waiters, head).waiters()
    return {"completed": completed()["completed"] - start, "woken": woken}


@contextlib.contextmanager
def _registered(attr: Attribute) -> Iterator[None]:
    blk_sysfs.register(attr)
    try:
        yield
    finally:
        del blk_sysfs.ATTRIBUTES[attr.name]


def _store_sleep(ctx, q, ms):
    """Sleep ``ms`` on the CPU's timer."""
    t = ctx.clock()
    yield Sleep(ms * 1_000_000)
    return {"slept_ns": ctx.clock() - t}


def _attr(name, store):
    return Attribute(name=name, help=f"{name}=N", parse=lambda text: int(text or "0"), store=store)


def test_a_store_sleeps_on_a_wait_queue_while_the_cpus_task_runs():
    with (
        _registered(_attr("test/wait_completions", _store_wait_for_completions)),
        _registered(_attr("test/sleep", _store_sleep)),
    ):
        spec, _ = build(
            {**LOADED, "runtime": "1.5"},
            [
                parse_at("0.1s:test/wait_completions=2000", "--at"),
                parse_at("0.2s:test/sleep=100", "--at"),
                # due while the sleep runs: starts after it
                parse_at("0.25s:test/wait_completions=10", "--at"),
                # never satisfied before the end: closed at exit, reported aborted
                parse_at("0.5s:test/wait_completions=100000000", "--at"),
            ],
        )
        result = run(spec)
    assert result.invariants["violations"] == 0
    trans = result.sysfs["transitions"]
    writes = result.sysfs["writes"]
    # each one after the other, in order (a write due while another runs waits)
    assert [t["write"] for t in trans] == [w["write"] for w in writes][: len(trans)]
    assert all(a["end_ns"] <= b["start_ns"] for a, b in itertools.pairwise(trans))
    first, sleep, second, *last = trans
    assert first["woken"] == 1 and first["completed"] >= 2000
    assert first["duration_ns"] >= 1_000_000  # its Sleep after the wait
    assert sleep["slept_ns"] >= 100_000_000 and sleep["duration_ns"] >= sleep["slept_ns"]
    # due at 0.25 s, while the sleep (from 0.2 s at the earliest, 100 ms) ran
    assert second["woken"] == 1 and second["completed"] >= 10 and writes[2]["late"] == 1
    # the last one never sees its condition: closed at exit (if it started before the
    # deadline; if not, counted skipped)
    if last:
        assert last[0].get("aborted") is True and "woken" not in last[0]
    else:
        assert writes[3]["skipped"] == 1


def test_race_scenarios_give_their_timeline_in_bench_syntax():
    from mqrt.race.catalogue import CATALOGUE

    for bug in CATALOGUE.values():
        for text in bug.scenario.timeline:
            parse_at(text, "timeline")  # the bench's parser takes each
    out = mqrt("race", "list", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["resize_wakeup_hang"]["timeline"] == ["0.3s:nullb0/debug/nr_requests_unfrozen=4"]
    assert "timeline: 0.3s:nullb0/debug/nr_requests_unfrozen=4" in mqrt("race", "list").stdout


#: Registers, in the command's process (the CPUs inherit it through fork), a store
#: that says when it starts, sleeps on a wait queue nobody wakes for a condition that
#: never holds, and says when it is closed.
_FOREVER = """
import os
from mqrt.block import blk_sysfs
def _forever(ctx, q, value):
    head = ctx.mq.queues[q].hctxs[0].tags.bitmap_tags.ws[0].head
    open(os.environ["MARK"] + ".started", "w").close()
    try:
        yield blk_sysfs.Wait(head, lambda: False)
    finally:
        open(os.environ["MARK"] + ".closed", "w").close()
    return {}
blk_sysfs.register(blk_sysfs.Attribute("test/forever", "test/forever=N", int, _forever))
"""


def test_ctrl_c_closes_a_parked_store(tmp_path):
    mark = str(tmp_path / "store")
    code = f"{_FOREVER}\nimport sys\nfrom mqrt.cli import main\nsys.exit(main(sys.argv[1:]))"
    p = subprocess.Popen(
        [sys.executable, "-c", code, "bench", "--runtime", "60", "--cpus", "2", "-q",
         "--at", "0:test/forever=1", "--output-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MARK": mark},
    )  # fmt: skip

    def started() -> bool:
        while not os.path.exists(mark + ".started") and p.poll() is None:
            time.sleep(0.02)  # waiting for a state (the store started), not for a time
        return True

    out, err = interrupt(p, started)
    assert p.returncode == 130, err
    assert os.path.exists(mark + ".closed")
    tr = json.loads(out)["mqrt"]["points"][0]["run"]["transitions"]
    (t,) = tr["list"]
    assert t["attr"] == "test/forever" and t["aborted"] is True
    assert tr["writes"] == [
        {"write": "0:test/forever=1", "kind": "at", "started": 1, "late": 0, "skipped": 0}
    ]
    assert tr["summary"]["test/forever"]["aborted"] == 1

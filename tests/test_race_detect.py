"""Each online detector fires on a constructed violation in a real run (the code is
broken on purpose in the owner before the CPUs are forked), and a correct run stays
clean with the detectors on."""

from __future__ import annotations

import os

import pytest

from mqrt.bench.main import build
from mqrt.block.blk_mq import BlkMq
from mqrt.lib.sbitmap import Sbitmap, SbitmapQueue
from mqrt.lib.wait import Waiters
from mqrt.runtime.owner import run

pytestmark = pytest.mark.timing


def watched(**given):
    given.setdefault("runtime", 5)
    given.setdefault("cpus", 2)
    spec, _config = build(given)
    spec.detect = True
    return run(spec)


def test_a_correct_run_with_waiters_stays_clean():
    result = watched(runtime=0.6, irqmode="timer", completion_nsec=20_000, hw_queue_depth=16,
                     iodepth=16)  # fmt: skip
    assert result.finding is None and result.invariants["violations"] == 0
    assert sum(c["cpu_counters"]["tag_sleeps"] for c in result.cpus) > 0  # it did wait


def test_lost_wakeup(monkeypatch):
    monkeypatch.setattr(SbitmapQueue, "wake_up", lambda self, nr: None)  # frees wake nobody
    result = watched(irqmode="timer", completion_nsec=20_000, hw_queue_depth=8, iodepth=16)
    f = result.finding
    assert f is not None and f["detector"] == "lost_wakeup", f
    # (found during the run: the detectors decide by counting, so how soon in
    # wall-clock time depends on the host's load, not on the verdict)
    # every CPU asleep with the map's tags free: nobody is left to free a tag
    assert f["snapshot"]["sleeping"] and "tags are free, every CPU is asleep" in f["message"]
    (tags,) = f["snapshot"]["maps"].values()
    assert "ws_active=" in tags["tags"] and tags["held"] == []


def test_lost_wakeup_counted_while_others_run(monkeypatch):
    """A sleeper no wake-up reaches while the others keep running: decided by the
    frees its map saw during that one sleep, not by how long it slept."""
    real = Waiters.set_running

    def never_cpu3(self, slot):  # wake-ups pass over cpu3's entry, as if it ran
        return False if slot == 3 else real(self, slot)

    monkeypatch.setattr(Waiters, "set_running", never_cpu3)
    result = watched(cpus=4, irqmode="timer", completion_nsec=20_000, hw_queue_depth=8,
                     iodepth=16, submit_queues=1)  # fmt: skip
    f = result.finding
    assert f is not None and f["detector"] == "lost_wakeup", f
    assert f["message"].startswith("cpu3 asleep on"), f["message"]
    assert "frees of that map with no wake-up" in f["message"]


def test_livelock(monkeypatch):
    """Every legacy wake-up with sleepers asks to go round again, forever: the CPUs
    that free a tag spin, counted in their retries while nothing is submitted or
    completed; the runtime kills them and still ends the run and cleans up."""
    monkeypatch.setattr(SbitmapQueue, "_legacy_wake_up_once", lambda self, nr: (True, nr))
    result = watched(sbitmap="legacy", irqmode="timer", completion_nsec=20_000,
                     hw_queue_depth=8, iodepth=16, submit_queues=1)  # fmt: skip
    f = result.finding
    assert f is not None and f["detector"] == "livelock", f
    assert "retry loops spinning with no I/O submitted or completed" in f["message"]
    assert f["spinning"] and all(f"cpu{i} " in f["message"] for i in f["spinning"])
    killed = [m for m in result.messages if "was spinning and could not be told to exit" in m]
    assert len(killed) >= len(f["spinning"])
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"mqrt-{os.getpid()}-")]


def test_hang():
    # null_blk's timeout fault: every request is lost until its 30 s timeout
    result = watched(timeout="1,100,0,-1", io_timeout=30_000, iodepth=4)
    f = result.finding
    assert f is not None and f["detector"] == "hang", f
    assert "request(s) holding tags" in f["message"]


def test_tag_owned_twice(monkeypatch):
    real_get = Sbitmap.get

    def get_always_zero(self):  # hands out bit 0 whether or not it is free
        real_get(self)
        return 0

    monkeypatch.setattr(Sbitmap, "get", get_always_zero)
    result = watched(irqmode="timer", completion_nsec=50_000, iodepth=4)
    f = result.finding
    assert f is not None and f["detector"] == "violation", f


@pytest.mark.parametrize("model", ["5.10", "6.x"])
def test_a_correct_shared_tag_bitmap_run_stays_clean(model):
    """Both models of BLK_MQ_F_TAG_HCTX_SHARED under the detectors: 2 CPUs on 2
    hctxs sleeping for the tags of one bitmap, nothing found."""
    result = watched(runtime=0.6, submit_queues=2, shared_tag_bitmap=1, shared_tag_model=model,
                     irqmode="timer", completion_nsec=20_000, hw_queue_depth=8,
                     iodepth=8)  # fmt: skip
    assert result.finding is None and result.invariants["violations"] == 0
    assert sum(c["cpu_counters"]["tag_waits"] for c in result.cpus) > 0


def test_tag_held_by_two_hctxs_of_a_shared_sbitmap(monkeypatch):
    """5.10's shared sbitmap: tag t names request t of each hctx's pool, so a bit
    handed to two hctxs leaves every CPU's own check clean (each owns a different
    request); the owner finds the tag held twice."""
    real_get = Sbitmap.get

    def get_always_zero(self):
        real_get(self)
        return 0

    monkeypatch.setattr(Sbitmap, "get", get_always_zero)
    result = watched(submit_queues=2, shared_tag_bitmap=1, shared_tag_model="5.10",
                     irqmode="timer", completion_nsec=200_000, iodepth=1)  # fmt: skip
    f = result.finding
    assert f is not None and f["detector"] == "violation", f
    assert "tag 0 held by requests" in f["message"], f
    assert list(f["snapshot"]["maps"]) == ["nullb0.tag_set/shared_sbitmap"]


def test_double_completion(monkeypatch):
    real = BlkMq.complete_request

    def twice(self, rq, gen=-1, status=None):
        won = real(self, rq, gen, status)
        real(self, rq, gen, status)  # a second completion of the same request
        return won

    monkeypatch.setattr(BlkMq, "complete_request", twice)
    result = watched(irqmode="softirq", iodepth=4)
    f = result.finding
    assert f is not None and f["detector"] == "double_completion", f


def test_nr_active_below_zero(monkeypatch):
    real = BlkMq.end_request

    def end_and_decrement_again(self, rq, status=None):
        hctx = self.queues[self.buf[rq.base + 52]].hctxs[self.buf[rq.base + 50]]
        real(self, rq, status)
        self.a.fetch_sub32(hctx.nr_active_off, 1)

    monkeypatch.setattr(BlkMq, "end_request", end_and_decrement_again)
    result = watched(nr_devices=2, shared_tags=1, irqmode="timer", completion_nsec=20_000,
                     iodepth=4)  # fmt: skip
    f = result.finding
    assert f is not None and f["detector"] in ("violation", "nr_active_negative"), f


@pytest.mark.parametrize("point", ["sbq.clear.before_wake", "tag.get.before_sleep"])
def test_injected_delays_are_inserted_and_keep_the_run_correct(point):
    spec, _ = build({"runtime": 0.4, "cpus": 2, "irqmode": "timer", "hw_queue_depth": 8,
                     "iodepth": 8})  # fmt: skip
    spec.detect = True
    spec.inject = {point: (50.0, 100)}
    result = run(spec)
    assert result.finding is None and result.invariants["violations"] == 0
    assert sum(c["inject_hits"].get(point, 0) for c in result.cpus) > 0


def test_bench_inject_option_arms_points_and_reports_hits():
    import json

    from tests.test_cli import mqrt

    out = mqrt("bench", "--runtime", "0.3", "--irqmode", "timer", "--hw_queue_depth", "8",
               "--inject", "sbq.clear.before_wake=20:50", "--output-format", "json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    cpus = json.loads(out.stdout)["mqrt"]["points"][0]["run"]["cpus"]
    assert sum(c["inject_hits"].get("sbq.clear.before_wake", 0) for c in cpus) > 0
    bad = mqrt("bench", "--inject", "no.such.point=1:2")
    assert bad.returncode == 2 and "inject: no point 'no.such.point'" in bad.stderr


def test_a_sleeper_held_to_its_fair_share_is_a_hang_not_a_lost_wakeup(monkeypatch):
    """Frees that never uncount their requests: each device's nr_active creeps up to
    its fair share of the shared map, and its submitters sleep on free tags they may
    not take.  No wake-up was lost (they are woken and sleep again); nothing can
    move: a hang, with the reason read from shared memory as hctx_may_queue() does."""
    monkeypatch.setattr(BlkMq, "_dec_active", lambda self, hctx: None)
    result = watched(nr_devices=2, shared_tags=1, hw_queue_depth=16, irqmode="timer",
                     completion_nsec=20_000, iodepth=8)  # fmt: skip
    f = result.finding
    assert f is not None and f["detector"] == "hang", f
    assert "no sleeper may take a free tag" in f["message"], f["message"]
    assert "at its fair share 8 of 16" in f["message"], f["message"]

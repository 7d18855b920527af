"""The NVMe driver against a real controller process: phase-bit wraps, interrupts,
faults that end with every request finished once, stale command ids, and a device
killed mid-run."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from mqrt.bench.main import build
from mqrt.block.blk_stat import LatHist
from mqrt.runtime.owner import run
from mqrt.runtime.spec import RunError
from tests.test_runtime import assert_clean, totals

pytestmark = pytest.mark.timing


def run_nvme(**given):
    given.setdefault("runtime", 0.4)
    given.setdefault("cpus", 2)
    given["driver"] = "nvme"
    spec, _config = build(given)
    return run(spec)


def device(result) -> dict[str, int]:
    return result.device["counters"]


def driver(result) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in result.cpus:
        for k, v in c["driver"].items():
            out[k] = out.get(k, 0) + v
    return out


def test_nvme_run_finishes_every_request_and_wraps_the_phase_many_times():
    # 8-entry queues: every CQ wraps (and flips its phase) every 8 completions.
    result = run_nvme(io_queue_depth=8, iodepth=4, latency_ns=0, rw="randrw")
    assert_clean(result)
    t, dev = totals(result), device(result)
    assert t["ios"] > 200
    assert dev["commands"] == t["requests"] == dev["completions"]
    assert dev["completions"] // 8 > 20  # laps
    assert result.device["queue_depth"] == 8 and result.device["io_queues"] == 2
    assert dev["interrupts"] > 0 and driver(result)["genctr_mismatch"] == 0


def test_coalescing_delivers_many_completions_per_interrupt():
    result = run_nvme(latency_ns=0, irq_coalesce_thr=7, irq_coalesce_time=2, iodepth=32)
    assert_clean(result)
    dev = device(result)
    assert dev["coalesced"] > dev["interrupts"]  # more than one CQE per interrupt


def test_irq_poll_reaps_masked_vectors_and_every_request_ends_once():
    # After an interrupt its vector stays masked while the CPU polls the CQ: CQEs are
    # found by polling (no interrupt of their own), each command completes once, and
    # the vectors are re-armed at the end (the drain finishes: nothing is left).
    result = run_nvme(irq_poll_us=200, latency_ns=20_000, iodepth=8, lost_irq=0)
    assert_clean(result)
    dev, drv, t = device(result), driver(result), totals(result)
    assert drv["irq_polled"] > 0
    assert dev["commands"] == dev["completions"] == t["requests"] == drv["cqes"]
    assert drv["genctr_mismatch"] == 0


def test_dropped_completions_end_in_a_controller_reset_and_finish_once():
    # timeout -> Abort (the controller has no such command) -> timeout again ->
    # reset: every started command is cancelled with HOST_ABORTED_CMD and retried.
    result = run_nvme(drop_completion=5, io_timeout=40, latency_ns=20_000, runtime=0.6)
    assert_clean(result)
    dev, drv, t = device(result), driver(result), totals(result)
    assert dev["dropped"] > 0
    assert 0 < drv["resets"] <= dev["resets"]  # the controller saw each CC.EN 1 -> 0
    assert drv["aborts_sent"] > 0
    assert drv["cancelled"] >= dev["dropped"]  # a dropped command is only ever cancelled
    assert t["requeued"] == drv["retries"]
    # every cancelled command is retried or fails (after 5 retries); on a loaded host
    # an Abort may also find a slow command still in service and complete it with
    # ABORT_REQ, which is retried as well
    assert t["errors"] + drv["retries"] >= drv["cancelled"]
    assert t["errors"] <= drv["cancelled"]
    assert t["ios"] == t["requests"]  # and each request ended exactly once


def test_commands_held_past_their_timeout_are_aborted_and_retried():
    # 10% of commands take 1 s against a 100 ms timeout: the Abort completes them with
    # ABORT_REQ (no DNR), so they are retried; none fails.  (A timeout short enough for
    # a loaded host's device process to miss escalates to controller resets, each of
    # which retries every command the controller held: often enough, and a command
    # runs out of nvme_max_retries.)
    result = run_nvme(delay_pct=10, delay_ns=1_000_000_000, io_timeout=100, latency_ns=20_000)
    assert_clean(result)
    dev, drv, t = device(result), driver(result), totals(result)
    assert dev["aborts"] > 0 and drv["retries"] >= dev["aborts"]
    assert t["errors"] == 0 and t["ios"] == t["requests"]


def latencies(result) -> dict[str, LatHist]:
    """Every job's slat, clat and lat, both directions, merged."""
    out = {kind: LatHist() for kind in ("slat", "clat", "lat")}
    for c in result.cpus:
        for job in c["jobs"]:
            for d in ("read", "write"):
                for kind, hist in out.items():
                    hist.merge(LatHist.from_bytes(job[d][kind]))
    return out


def test_a_retried_command_books_its_whole_life_as_completion_latency():
    # fio's view of an I/O the driver retried (held past its timeout, Aborted, requeued
    # and issued again): its slat is its first submission only, its clat runs from
    # there to the final completion.  A command the Abort retried was outstanding for
    # at least its timeout (the timeout work never fires before the deadline), so the
    # clat holds that much; the submission path itself never waits that long (no tag
    # waits: 1023 tags a queue for 32 I/Os a job).
    timeout_ms = 100
    result = run_nvme(
        delay_pct=10, delay_ns=1_000_000_000, io_timeout=timeout_ms, latency_ns=20_000
    )
    assert_clean(result)
    assert driver(result)["retries"] > 0
    lat = latencies(result)
    timeout_ns = timeout_ms * 1_000_000
    assert lat["slat"].max < timeout_ns <= lat["clat"].max <= lat["lat"].max
    assert lat["slat"].n == lat["clat"].n == lat["lat"].n == totals(result)["ios"]


def test_a_lost_interrupt_is_found_by_the_timeout_polling_the_cq():
    # iodepth 1: nothing else will raise the vector, only the timeout can find it.
    result = run_nvme(lost_irq=20, io_timeout=20, iodepth=1, latency_ns=10_000, cpus=1)
    assert_clean(result)
    assert device(result)["lost_irqs"] > 0
    assert driver(result)["completion_polled"] > 0
    assert totals(result)["errors"] == 0


def test_error_statuses_reach_the_job():
    result = run_nvme(error_status=10, latency_ns=0)
    assert_clean(result)
    assert totals(result)["errors"] == device(result)["errors"] > 0


def test_namespaces_share_the_controllers_tag_set():
    result = run_nvme(nr_namespaces=2, io_queue_depth=16, iodepth=16, latency_ns=20_000)
    assert_clean(result)
    assert len(result.queues) == 2
    per_ns = [sum(c["jobs"][q]["read"]["ios"] for c in result.cpus) for q in range(2)]
    assert min(per_ns) > 0.25 * sum(per_ns)


def test_polled_io_goes_to_the_poll_queues_and_raises_no_interrupt():
    result = run_nvme(poll_queues=2, hipri=1, latency_ns=5_000, iodepth=8, rw="randrw")
    assert_clean(result)
    t, drv = totals(result), driver(result)
    assert result.device["io_queues"] == 4  # 2 interrupt-driven, then 2 poll queues
    assert t["ios"] > 100
    assert drv["interrupts"] == 0  # no I/O vector fired on any CPU
    assert t["polled"] == drv["cqes"] == t["requests"]  # each reaped by a poll
    assert t["ipis_sent"] == 0  # completed by the CPU that reaped it


@pytest.mark.parametrize("given", [{"hipri": 1}, {"poll_queues": 1}])
def test_without_both_poll_queues_and_hipri_io_is_interrupt_driven(given):
    result = run_nvme(latency_ns=0, **given)
    assert_clean(result)
    t, drv = totals(result), driver(result)
    assert t["polls"] == 0 and drv["interrupts"] > 0 and drv["cqes"] == t["requests"]


def test_a_stale_completion_is_caught_by_the_genctr_check():
    from mqrt.device.nvme import NvmeOps

    class FakeTags:
        nr_tags = 8
        rq_base = 0

        def rq_of(self, rqs, tag):  # Tags.rq_of() of a tag no scheduler request holds
            return rqs[self.rq_base + tag]

    class FakeRq:
        pdu = bytearray([3, 0])
        gen = 0

    class FakeMq:
        def __init__(self):
            self.rqs = [[FakeRq()] * 8]

        def complete_request(self, *a, **k):
            raise AssertionError("a stale CQE must not complete anything")

    ops = NvmeOps.__new__(NvmeOps)
    ops.stats = {"genctr_mismatch": 0}
    ops._handle_cqe(FakeMq(), FakeTags(), (2 << 12) | 5, 0)  # genctr 2, the request is at 3
    assert ops.stats["genctr_mismatch"] == 1


def test_the_device_killed_mid_run_is_reported_and_nothing_is_left():
    me = psutil.Process()
    killed: list[int] = []

    def progress(snap):
        if killed or snap["elapsed_s"] < 0.2:
            return
        dev = [p for p in me.children() if p.pid == getattr(progress, "dev_pid", -1)]
        for p in dev:
            killed.append(p.pid)
            os.kill(p.pid, signal.SIGKILL)

    spec, _ = build({"driver": "nvme", "runtime": 3, "cpus": 2, "latency_ns": 20_000})
    import mqrt.runtime.owner as rt

    original = rt._Run._start_device

    def start_device(self):
        original(self)
        progress.dev_pid = self.device.pid

    spec.progress = progress
    rt._Run._start_device = start_device
    try:
        with pytest.raises(RunError) as err:
            run(spec)
    finally:
        rt._Run._start_device = original
    assert killed
    msg = str(err.value)
    assert "device" in msg and "SIGKILL" in msg and str(killed[0]) in msg
    assert [c["cpu"] for c in err.value.partial.cpus] == [0, 1]  # the CPUs still reported

"""``--mode sq`` (the legacy single queue under one lock) and ``--mode raw`` (the
driver fed directly) on real CPUs and a real device: every request ends once, and
each mode takes the path it claims."""

from __future__ import annotations

import pytest

from mqrt.lib.knobs import KnobError
from tests.test_nvme import run_nvme
from tests.test_runtime import assert_clean, run_nullb, totals


@pytest.mark.parametrize("irqmode", ["none", "softirq", "timer"])
@pytest.mark.parametrize("mode", ["sq", "raw"])
def test_every_request_finishes_once_in_each_mode(mode, irqmode):
    result = run_nullb(mode=mode, irqmode=irqmode, rw="randrw", iodepth=12, hw_queue_depth=16)
    assert_clean(result)
    t = totals(result)
    assert t["ios"] > 0 and t["ios"] == t["requests"] == t["completed"]
    hctxs = {(h["q"], h["hctx"]) for c in result.cpus for h in c["hctx"]}
    if mode == "sq":
        assert hctxs <= {(0, 0)}  # one hw queue for every CPU
        assert "queue_lock_contended" in t  # the legacy lock was in the path
    else:
        # no tags from the sbitmap, no plug, no waiting for tags
        assert t["batch_tags"] == 0 and t["plug_flushes"] == 0 and t["tag_sleeps"] == 0


def test_raw_mode_with_more_iodepth_than_slots_waits_for_its_own_completions():
    result = run_nullb(mode="raw", irqmode="timer", completion_nsec=50_000, iodepth=32,
                       hw_queue_depth=4)  # fmt: skip
    assert_clean(result)
    assert totals(result)["ios"] > 0


@pytest.mark.parametrize("model", ["5.10", "6.x"])
def test_raw_mode_with_shared_tag_bitmap_splits_the_one_tag_space(model):
    """Shared tags (either model) are one tag space for every hw queue: the CPUs of
    raw mode split it between them instead of each taking a whole hw queue's."""
    result = run_nullb(mode="raw", shared_tag_bitmap=1, shared_tag_model=model,
                       irqmode="timer", completion_nsec=50_000, iodepth=8,
                       hw_queue_depth=8)  # fmt: skip
    assert_clean(result)
    t = totals(result)
    assert t["ios"] > 0 and t["ios"] == t["requests"] == t["completed"]


@pytest.mark.parametrize("mode", ["sq", "raw"])
def test_nvme_in_each_mode(mode):
    result = run_nvme(mode=mode, latency_ns=0, rw="randrw")
    assert_clean(result)
    t = totals(result)
    assert t["ios"] == t["requests"] > 0
    assert result.device["io_queues"] == (1 if mode == "sq" else 2)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"mode": "sq", "submit_queues": 2}, "submit_queues: --mode sq uses one hw queue (1)"),
        (
            {"mode": "raw", "submit_queues": 1},
            "submit_queues: --mode raw uses one hw queue per CPU",
        ),
        ({"mode": "fast"}, "mode: must be mq|sq|raw"),
    ],
)
def test_mode_conflicts_are_one_line_errors(given, message):
    with pytest.raises(KnobError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_nullb(**given)

"""Bugs in the active-request count of a shared tag map (``hctx->nr_active``, or the
queue's ``nr_active_requests_shared_tags``): a request counted but never uncounted,
or uncounted without having been counted."""

from __future__ import annotations

from mqrt.block.blk_mq_complete import BlkMqCompletion
from mqrt.block.blk_mq_structs import HwCtx
from mqrt.race.entry import Bug, Scenario

# -- 3b87c6ea671a: a completion batch never uncounted its requests ------------------------------


def _flush_tag_batch_uncounted(self: BlkMqCompletion, hctx: HwCtx, tag_list: list[int]) -> None:
    """blk_mq_flush_tag_batch() from f794f3351f26 until 3b87c6ea671a (the Linux 5.16
    cycle, linux-block's for-5.16/block): each hctx's tags of a completion batch went
    back, and the queue references with them -- nothing else: the active count every
    request of a shared queue took when it got its tag stayed."""
    assert hctx.tags is not None  # its requests came from them
    hctx.tags.put_tags(tag_list)  # the bug: no nr_active update


BATCH_NR_ACTIVE_LEAK = Bug(
    name="batch_nr_active_leak",
    commit="3b87c6ea671a",
    subject="blk-mq: update hctx->nr_active in blk_mq_end_request_batch()",
    what="batched completions leave their requests counted active: each queue creeps up to "
    "its fair share of a shared map and its submitters sleep forever on free tags",
    explanation=(
        "Batched completions (blk_mq_end_request_batch, f794f3351f26, used by nvme's "
        "interrupt and poll paths) give a batch's tags back per hctx with "
        "blk_mq_flush_tag_batch(). With shared tags and no I/O scheduler each request "
        "is counted in its hctx's nr_active when it gets its tag (RQF_MQ_INFLIGHT) and "
        "uncounted when it is freed, but the batch path freed the tags without "
        "uncounting them. So every batched completion leaked one active request: a "
        "queue's nr_active crept up until it reached its fair share of the shared map "
        "(hctx_may_queue), and from then on every allocation on it failed and its "
        "submitters slept on the map's wait queues, woken by the other queue's frees "
        "only to find their queue still 'at its share' -- with none of its requests in "
        "flight and the map free, until the queue's timeout work finds it idle. The fix"
        " (3b87c6ea671a, reported on two NVMe namespaces) subtracts the batch from "
        "nr_active in blk_mq_flush_tag_batch(). Scenario: the nvme driver with two "
        "namespaces on one I/O queue of 64 tags (fair share 32 each), 100 us service "
        "time, each interrupt's completions ended as one batch (nvme_irq's "
        "io_comp_batch, even a batch of one); 2 CPUs keep 16 I/Os in flight on each "
        "namespace."
    ),
    scenario=Scenario(
        given={
            "driver": "nvme",
            "nr_namespaces": 2,
            "io_queue_depth": 65,
            "nr_io_queues": 1,
            "latency_ns": 100_000,
            "iodepth": 16,
            "cpus": 2,
        },
        attempt_s=5.0,
    ),
    patches=((BlkMqCompletion, "_flush_tag_batch", _flush_tag_batch_uncounted),),
    detectors=("hang",),
)


ENTRIES = (BATCH_NR_ACTIVE_LEAK,)

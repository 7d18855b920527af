"""Bugs in how many frees wake a sleeper (``wake_batch``): sized for the wrong
depth, not recalculated, or not applied to the counts of the wait queues."""

from __future__ import annotations

from typing import Any

from mqrt.block.blk_mq_tag import Tags
from mqrt.lib import inject
from mqrt.lib import sbitmap as sbitmap_module
from mqrt.lib.lockstat import LockClass
from mqrt.lib.sbitmap import SBQ_WAIT_QUEUES, SBQ_WAKE_BATCH, SbitmapQueue
from mqrt.lib.wait import spin_lock, spin_unlock
from mqrt.race.entry import Bug, Scenario

# -- 180dccb0dba4: wake_batch not recalculated for the fair share ---------------------------


def _update_active_without_recalc(self: Tags, delta: int) -> int:
    """Before 180dccb0dba4: __blk_mq_tag_busy()/__blk_mq_tag_idle() changed
    active_queues only; wake_batch stayed sized for the whole depth."""
    spin_lock(self.a, self._lock, LockClass.TAGS_LOCK)
    try:
        return self._count_active(delta)
    finally:
        spin_unlock(self.a, self._lock)


WAKE_BATCH_FAIR_SHARE = Bug(
    name="wake_batch_fair_share",
    commit="180dccb0dba4",
    subject="blk-mq: fix tag_get wait task can't be awakened",
    what="a queue held to a fair share below wake_batch sleeps for a tag and is never woken",
    explanation=(
        "With shared tags each active queue may hold only its fair share of the depth "
        "(hctx_may_queue). A queue over its share sleeps on the tag map's wait queues "
        "like a task that found the map full, and sleepers are woken only after "
        "wake_batch tags have been freed. wake_batch was sized for the whole depth "
        "(depth / 8, at most 8), so once more than 8 queues were active the share could "
        "be smaller than wake_batch: the sleeping queue's own requests, all that is left "
        "in flight when the other queues are quiet but still counted active, free fewer "
        "tags than a batch, and nobody wakes it. The fix recalculates wake_batch from "
        "the fair share whenever the number of active queues changes "
        "(sbitmap_queue_recalculate_wake_batch). Scenario: 10 null_blk devices on one "
        "shared tag set of 64 tags (wake_batch 8); devices 1-9 do a short burst and stay "
        "active, device 0 keeps 32 I/Os queued per CPU but may hold only 7."
    ),
    scenario=Scenario(
        given={
            "nr_devices": 10,
            "shared_tags": 1,
            "hw_queue_depth": 64,
            "irqmode": "timer",
            "completion_nsec": 20_000,
            "iodepth": 32,
            "io_timeout": 30_000,
            "cpus": 2,
        },
        queue_jobs={q: {"time_based": 0, "size": "16k", "iodepth": 4} for q in range(1, 10)},
        attempt_s=5.0,
    ),
    patches=((Tags, "_update_active", _update_active_without_recalc),),
)


# -- 6c0ca7ae292a: wait_cnt left above a lowered wake_batch ------------------------------------


def _update_wake_batch_keep_wait_cnt(self: SbitmapQueue, wake_batch: int) -> None:
    """Before 6c0ca7ae292a: a new wake_batch was stored, but each wait queue kept
    counting down from the old one."""
    if self.a.read32(self._wake_batch) != wake_batch:
        self.a.set32(self._wake_batch, wake_batch)


RESIZE_WAKEUP_HANG = Bug(
    name="resize_wakeup_hang",
    commit="6c0ca7ae292a",
    subject="sbitmap: fix wakeup hang after sbq resize",
    what="after nr_requests is lowered, sleepers wait for more frees than can happen",
    explanation=(
        "In the legacy scheme each of the 8 wait queues counts frees down from "
        "wake_batch (wait_cnt) and wakes its sleepers at zero. Writing a smaller "
        "nr_requests resizes the tag bitmap and lowers wake_batch, but the wait queues "
        "went on counting down from the old, larger batch: with fewer tags than that "
        "left to free, the count never reached zero and the sleepers were never woken. "
        "The fix resets every wait_cnt when wake_batch changes. Scenario: legacy "
        "sbitmap, 64 tags (wake_batch 8), 2 CPUs keeping 32 I/Os each; 0.3 s in, "
        "nr_requests drops to 4, by the resize alone (debug/nr_requests_unfrozen): "
        "the sleepers that hang are the ones already waiting when it lands."
    ),
    scenario=Scenario(
        given={
            "sbitmap": "legacy",
            "hw_queue_depth": 64,
            "irqmode": "timer",
            "completion_nsec": 50_000,
            "iodepth": 32,
            "cpus": 2,
        },
        timeline=("0.3s:nullb0/debug/nr_requests_unfrozen=4",),
        attempt_s=3.0,
    ),
    patches=((SbitmapQueue, "_update_wake_batch", _update_wake_batch_keep_wait_cnt),),
)


# -- a0934fd2b120: the wait counts' reset seen before the new wake_batch -----------------------


def _update_wake_batch_counts_seen_first(self: SbitmapQueue, wake_batch: int) -> None:
    """sbitmap_queue_update_wake_batch() of Linux 4.10 to 5.1, in the order a weakly
    ordered CPU may make its stores visible: smp_mb__before_atomic() orders nothing
    against atomic_set(), a plain store, so the reset of every wait_cnt to 1 may be
    seen before the new wake_batch.  This host never reorders two stores, so the
    port puts them in that order."""
    a = self.a
    if a.read32(self._wake_batch) == wake_batch:
        return
    if self.legacy:
        for off in self._wait_cnt:
            a.set32(off, 1)
    if inject.armed:
        inject.hit("sbq.batch.between_stores")
    a.set32(self._wake_batch, wake_batch)


BATCH_STORES_REORDERED = Bug(
    name="batch_stores_reordered",
    commit="a0934fd2b120",
    subject="sbitmap: fix improper use of smp_mb__before_atomic()",
    what="a waker sees the wait counts reset but the old wake_batch, and puts the old batch "
    "back after nr_requests is lowered: sleepers wait for more frees than can happen",
    explanation=(
        "6c0ca7ae292a made a resize reset every wait queue's wait_cnt to 1 after storing "
        "the new, smaller wake_batch, so no queue keeps counting down from the old batch; "
        "a barrier was to keep the two stores in that order for a waker that reads them "
        "the other way round (its count, then wake_batch). It was "
        "smp_mb__before_atomic(), which orders only against read-modify-write atomics, "
        "and atomic_set() is a plain store: the memory model lets another CPU see the "
        "counts at 1 and still the old wake_batch. A waker that then counts a queue "
        "from 1 down to 0 resets it to the old batch, and every queue it reaches before "
        "the new batch lands counts down from the old one again: with 2 tags left and "
        "8 frees needed, sleepers on those queues are never woken, as before "
        "6c0ca7ae292a. The fix makes it smp_mb(). On this host two stores are "
        "never reordered, so the entry issues them in the order a weakly ordered CPU "
        "may show them; the window is a waker on another CPU between the two. In the "
        "kernel an nr_requests write freezes the queue first; the resizes that meet "
        "wakers are kyber's, which resizes its domain-token sbitmaps from a timer as "
        "latencies move. mqrt has no kyber, so the scenario resizes the tag map itself "
        "under load without the freeze (debug/nr_requests_unfrozen). "
        "Scenario: legacy sbitmap, 64 tags (wake_batch 8), 3 CPUs keeping 48 I/Os "
        "each, 20 us timer completions; 1 s in, nr_requests drops to 2 (wake_batch 1), "
        "the resizing CPU held up to 20 ms between the stores; the jobs stop 0.5 s "
        "later. The resize runs on one of the CPUs, so while it is held only the other "
        "two submit: their 96 I/Os over 64 tags keep sleepers on several wait queues "
        "for the window's wakers. Once the resize is over the "
        "old and the fixed code are the same, and 6.1's wake-up, which both run, "
        "has a lost wake-up of its own: a waker that took the only wait queue with "
        "sleepers to wait_cnt 0 makes every free skip it until it resets the count "
        "(30514bd2dd4e accepts that; 4f8126bb2308, 6.2, removes the counts). With 2 "
        "tags and every CPU cycling through sleeps, a waker the host deschedules "
        "there for a slice can see every tag freed meanwhile, so the run stops "
        "soon after the window instead of going on at depth 2."
    ),
    scenario=Scenario(
        given={
            "sbitmap": "legacy",
            "hw_queue_depth": 64,
            "irqmode": "timer",
            "completion_nsec": 20_000,
            "iodepth": 48,
            "cpus": 3,
        },
        timeline=("1s:nullb0/debug/nr_requests_unfrozen=2",),
        inject={"sbq.batch.between_stores": (100.0, 20000)},
        attempt_s=1.5,
    ),
    patches=((SbitmapQueue, "_update_wake_batch", _update_wake_batch_counts_seen_first),),
    window=(
        "a resize between its reset of the wait counts and its store of the new "
        "wake_batch; a waker on another CPU counting a wait queue from 1 to 0 and "
        "reading wake_batch inside it"
    ),
)


# -- b5fcf7871acb: a minimum batch of 4 above a small fair share --------------------------------


def _recalculate_wake_batch_min4(self: SbitmapQueue, users: int) -> None:
    """Before b5fcf7871acb: the batch for ``users`` sharers had a floor of 4 when
    the map has 32 tags or more."""
    depth = self.sb.depth
    share = (depth + users - 1) // users
    min_batch = 4 if depth >= 4 * SBQ_WAIT_QUEUES else 1
    self._update_wake_batch(max(min_batch, min(share // SBQ_WAIT_QUEUES, SBQ_WAKE_BATCH)))


WAKE_BATCH_MIN4 = Bug(
    name="wake_batch_min4",
    commit="b5fcf7871acb",
    subject="sbitmap: correct wake_batch recalculation to avoid potential IO hung",
    what="a floor of 4 on the shared-tag wake_batch strands sleepers of a small fair share",
    explanation=(
        "180dccb0dba4 sized wake_batch from the fair share of shared tags, but kept a "
        "minimum batch of 4 for maps of 32 tags or more. In the legacy scheme a batch "
        "of frees wakes the sleepers of one wait queue only, and each wait queue counts "
        "its own batch down. With a fair share of 7 and sleepers spread over several "
        "wait queues, the queue's own 7 tags in flight complete one batch of 4, wake one "
        "wait queue, and the 3 left over cannot finish the next: when the submitters "
        "that keep the tags busy stop, the sleepers of the other wait queues are never "
        "woken while the quiet queues keep their share. The fix drops the floor "
        "(wake_batch = share / 8, at least 1, so every free counts toward a wake-up). "
        "Scenario: legacy sbitmap, 10 null_blk devices sharing 64 tags (fair share 7), "
        "devices 1-9 quiet after a 4-I/O burst but still active; 6 CPUs on device 0 "
        "each submit one I/O at a time up to 32 in flight (300 us timer completions), so "
        "most of them sleep over the share; every 1 s attempt ends with the sleepers "
        "woken one batch at a time, each taking one tag and stopping."
    ),
    scenario=Scenario(
        given={
            "sbitmap": "legacy",
            "nr_devices": 10,
            "shared_tags": 1,
            "hw_queue_depth": 64,
            "irqmode": "timer",
            "completion_nsec": 300_000,
            "iodepth": 32,
            "iodepth_batch_submit": 1,
            "io_timeout": 30_000,
            "cpus": 6,
        },
        queue_jobs={q: {"time_based": 0, "size": "16k", "iodepth": 4} for q in range(1, 10)},
        attempt_s=1.0,
    ),
    patches=((SbitmapQueue, "recalculate_wake_batch", _recalculate_wake_batch_min4),),
)


# -- 10825410b956: a floor of 4 even on tiny queues ----------------------------------------------


def _recalculate_wake_batch_floor4(self: SbitmapQueue, users: int) -> None:
    """sbitmap_queue_recalculate_wake_batch() as 180dccb0dba4 added it: the fair
    share itself clamped to 4..SBQ_WAKE_BATCH (no division by the wait queues, and
    never below 4, whatever the depth)."""
    share = (self.sb.depth + users - 1) // users
    self._update_wake_batch(min(max(share, 4), SBQ_WAKE_BATCH))


WAKE_BATCH_ABOVE_DEPTH = Bug(
    name="wake_batch_above_depth",
    commit="10825410b956",
    subject="blk-mq: Fix wrong wakeup batch configuration which will cause hang",
    what="on a shallow shared queue, wake_batch is raised above the depth: nobody is ever woken",
    explanation=(
        "180dccb0dba4 started recalculating wake_batch whenever a shared tag map gained "
        "or lost an active queue: the fair share, (depth + users - 1) / users, clamped to "
        "4..SBQ_WAKE_BATCH, so never below 4. On a queue of depth 1 to 3 that raised "
        "wake_batch above the number of tags: a sleeper needs 4 frees, only the depth can "
        "ever be in flight, and once every submitter sleeps nothing wakes them. The fix "
        "clamps the minimum batch to 1 unless the depth is at least 32 (and b5fcf7871acb "
        "later dropped the floor). Scenario: 2 null_blk devices sharing a tag set of 2 "
        "tags, 2 CPUs keeping 4 I/Os each per device."
    ),
    scenario=Scenario(
        given={
            "nr_devices": 2,
            "shared_tags": 1,
            "hw_queue_depth": 2,
            "irqmode": "timer",
            "completion_nsec": 50_000,
            "iodepth": 4,
            "cpus": 2,
        },
        attempt_s=3.0,
    ),
    patches=((SbitmapQueue, "recalculate_wake_batch", _recalculate_wake_batch_floor4),),
)


# -- Linux 4.18 (min_shallow_depth): a batch larger than a shallow limit ----------------------


def _calc_wake_batch_without_shallow(spec: Any, depth: int, min_shallow_depth: int) -> int:
    """sbq_calc_wake_batch() before min_shallow_depth existed: a batch for the whole
    depth, whatever shallow limit the allocators use."""
    return max(1, min(depth // SBQ_WAIT_QUEUES, SBQ_WAKE_BATCH))


SHALLOW_MISSED_WAKEUP = Bug(
    name="shallow_missed_wakeup",
    commit="v4.18-rc1",  # Omar Sandoval, 2018; the hash could not be checked here
    subject="sbitmap: fix missed wakeups caused by sbitmap_queue_get_shallow()",
    what="writes limited to a shallow depth can never free a whole wake_batch",
    explanation=(
        "I/O schedulers limit some requests to a shallow part of the tag map (kyber's "
        "and mq-deadline's async_depth for writes, bfq's weights) with "
        "sbitmap_queue_get_shallow(). wake_batch was sized for the whole depth, so when "
        "only shallow allocators were waiting, fewer tags than a batch could ever be in "
        "flight: their frees never completed a batch and the sleepers were never woken. "
        "The fix makes users declare the smallest shallow depth they will use "
        "(sbitmap_queue_min_shallow_depth, blk_mq_set_min_shallow_depth) and sizes "
        "wake_batch for it. Scenario: randwrite with async_depth 1 on 64 tags of 4 "
        "words: a shallow depth of 1 bit per word, as sbitmaps up to 6.16 apply it, so "
        "4 usable tags (wake_batch 8 without the fix, 1 with it), one CPU keeping 16 "
        "writes queued."
    ),
    scenario=Scenario(
        given={
            "rw": "randwrite",
            "async_depth": 1,
            "hw_queue_depth": 64,
            "irqmode": "timer",
            "completion_nsec": 50_000,
            "iodepth": 16,
            "cpus": 1,
        },
        attempt_s=3.0,
    ),
    patches=((sbitmap_module, "_calc_wake_batch", _calc_wake_batch_without_shallow),),
)


ENTRIES = (
    WAKE_BATCH_FAIR_SHARE,
    RESIZE_WAKEUP_HANG,
    BATCH_STORES_REORDERED,
    WAKE_BATCH_MIN4,
    WAKE_BATCH_ABOVE_DEPTH,
    SHALLOW_MISSED_WAKEUP,
)

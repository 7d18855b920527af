"""The catalogue of historical sbitmap and shared-tag bugs ``mqrt race`` can switch
back on.

Each entry names the kernel commit that fixed the bug, says what went wrong, and
carries the buggy version of *our* function (the port in :mod:`mqrt.lib.sbitmap` and
:mod:`mqrt.block.blk_mq_tag` is the fixed code).  Switching a bug on replaces that function
on its class in the owner process before the CPUs are forked, so they run the old
code; switching it off puts ours back.  A scenario (options of ``mqrt bench``, per
queue jobs, injection points) is what provokes it on this kind of host, and the
detectors of :mod:`mqrt.runtime.detectors` say when it happened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mqrt.block.blk_mq_tag import Tags
from mqrt.lib import inject
from mqrt.lib import sbitmap as sbitmap_module
from mqrt.lib.sbitmap import SBQ_WAIT_QUEUES, SBQ_WAKE_BATCH, Sbitmap, SbitmapQueue, SbqWait
from mqrt.lib.wait import spin_lock, spin_unlock


@dataclass(frozen=True)
class Scenario:
    """What provokes a bug: bench options for the run, per-queue job options on top
    of them (queue index -> options), armed injection points, and how long one
    attempt runs (seconds)."""

    given: dict[str, Any]
    queue_jobs: dict[int, dict[str, Any]] = field(default_factory=dict)
    inject: dict[str, tuple[float, int]] = field(default_factory=dict)
    #: sysfs writes during the run: (seconds after the start, action, args)
    actions: tuple[tuple[float, str, tuple], ...] = ()
    attempt_s: float = 5.0


@dataclass(frozen=True)
class Bug:
    name: str
    commit: str
    subject: str
    what: str  #: one line: what goes wrong
    explanation: str  #: a paragraph: the mechanism, and the fix
    scenario: Scenario
    #: (class or module, attribute, buggy function): what switching the bug on replaces
    patches: tuple[tuple[Any, str, Callable[..., Any]], ...]
    #: the detectors expected to catch it
    detectors: tuple[str, ...] = ("lost_wakeup", "hang")

    @contextlib.contextmanager
    def switched_on(self) -> Iterator[None]:
        """The buggy code in place for the duration (in this process, and so in the
        CPUs forked meanwhile)."""
        saved = [(cls, attr, cls.__dict__[attr]) for cls, attr, _fn in self.patches]
        try:
            for cls, attr, fn in self.patches:
                setattr(cls, attr, fn)
            yield
        finally:
            for cls, attr, orig in saved:
                setattr(cls, attr, orig)


# -- 180dccb0dba4: wake_batch not recalculated for the fair share ---------------------------


def _update_active_without_recalc(self: Tags, delta: int) -> int:
    """Before 180dccb0dba4: __blk_mq_tag_busy()/__blk_mq_tag_idle() changed
    active_queues only; wake_batch stayed sized for the whole depth."""
    spin_lock(self.a, self._lock)
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
        "nr_requests drops to 4."
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
        actions=((0.3, "nr_requests", (0, 4)),),
        attempt_s=3.0,
    ),
    patches=((SbitmapQueue, "_update_wake_batch", _update_wake_batch_keep_wait_cnt),),
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


# -- 72d04bdcf3f7: the sbitmap_word::cleared race ----------------------------------------------


def _deferred_clear_racy(
    self: Sbitmap, index: int, depth: int, alloc_hint: int, wrap: bool
) -> bool:
    """Before 72d04bdcf3f7: ``cleared`` was tested without swap_lock, and a word
    with nothing to fold was reported as full.  (The kernel of 5.10 to 6.10 took no
    lock at all here; taking it around the fold only, as the fix's first version
    did, leaves the same race.)"""
    a = self.a
    if not a.read(self._cleared[index]):
        return False
    lock = self._swap_lock[index]
    spin_lock(a, lock)
    try:
        mask = a.xchg(self._cleared[index], 0)
        if inject.armed:
            inject.hit("sbitmap.fold.after_xchg")
        a.fetch_andnot(self._word[index], mask)
        return True
    finally:
        spin_unlock(a, lock)


CLEARED_RACE = Bug(
    name="cleared_race",
    commit="72d04bdcf3f7",
    subject="sbitmap: fix io hung due to race on sbitmap_word::cleared",
    what="an allocator sees a full word with nothing to fold and sleeps while tags are free",
    explanation=(
        "Frees are deferred: a freed tag's bit goes to the word's cleared mask, and an "
        "allocator that finds the word full folds cleared back in under swap_lock. The "
        "check for something to fold was made without the lock: while one allocator "
        "had taken the cleared mask (xchg) but not yet cleared those bits from the "
        "word, a second saw the word full and cleared empty, concluded the map was "
        "full and slept, with most tags free. Only a whole batch of later frees could "
        "wake it; with little else in flight that takes long or never comes. The fix "
        "tests and folds under the lock and re-checks the word for a free bit. "
        "Scenario (the commit's: one 64-bit word, wake_batch 8): two null_blk devices "
        "with their own 256 tags (64-bit words); 25 ms in, device 0's nr_requests is "
        "cut to 64, leaving it one word (the resize also folds the first round's "
        "frees, so the word starts empty). 2 CPUs each submit one I/O to device 0 every "
        "50 ms (rate_iops 20, 20 us completions), so they allocate in step and the word "
        "fills with deferred frees every 32 rounds. The failed search is delayed up to "
        "300 us before the fold (the two allocators arrive apart) and the fold is held "
        "open up to 5 ms; the loser sleeps while 8 frees of the other CPU's one I/O "
        "every 50 ms take 400 ms. Device 1 carries the bulk of the I/O (32 deep per "
        "CPU) so that a run of the fixed code completes many requests."
    ),
    scenario=Scenario(
        given={
            "nr_devices": 2,
            "shared_tags": 0,
            "hw_queue_depth": 256,
            "irqmode": "timer",
            "completion_nsec": 20_000,
            "iodepth": 32,
            "iodepth_batch_submit": 1,
            "cpus": 2,
        },
        queue_jobs={0: {"iodepth": 1, "rate_iops": 20}},
        actions=((0.025, "nr_requests", (0, 64)),),
        inject={
            "sbitmap.get.before_fold": (100.0, 300),
            "sbitmap.fold.after_xchg": (100.0, 5000),
        },
        attempt_s=3.6,
    ),
    patches=((Sbitmap, "deferred_clear", _deferred_clear_racy),),
)


# -- 4acb83417cad: a batch of frees counted as one ----------------------------------------------


def _clear_batch_counted_once(self: SbitmapQueue, offset: int, tags: list[int]) -> None:
    """sbitmap_queue_clear_batch() before 4acb83417cad: the batch's bits were freed,
    then sbitmap_queue_wake_up() ran once, so the whole batch counted as one free
    toward wake_batch."""
    self._clear_bits(offset, tags)
    self.wake_up(1)
    self.sb.update_cpu_hint(self.cpu, tags[-1] - offset)


BATCH_COUNTED_ONCE = Bug(
    name="batch_counted_once",
    commit="4acb83417cad",
    subject="sbitmap: fix batched wait_cnt accounting",
    what="a batched completion's tags count as one free: sleepers wait on frees that never come",
    explanation=(
        "Batched completions (blk_mq_end_request_batch, used by nvme's interrupt and "
        "poll paths) give a batch of tags back with one sbitmap_queue_clear_batch(). In "
        "the legacy scheme each wait queue counts frees down from wake_batch (wait_cnt) "
        "and wakes its sleepers at zero, but clear_batch() called the wake-up once per "
        "batch, so k tags freed together counted as one. A wait queue then needed "
        "wake_batch batches instead of wake_batch tags: with the tags in flight coming "
        "back in fewer batches than the sleepers' counts need, they were never woken, "
        "the map empty. The fix passes the number of bits freed to "
        "sbitmap_queue_wake_up() and counts them all against wait_cnt. Scenario: legacy "
        "sbitmap, the nvme driver with one I/O queue of 64 tags (wake_batch 8), 100 us "
        "service time and interrupt coalescing (8 completions or 100 us per "
        "interrupt), so each interrupt ends a batch; 4 CPUs submit one I/O at a time up "
        "to 32 in flight each."
    ),
    scenario=Scenario(
        given={
            "driver": "nvme",
            "sbitmap": "legacy",
            "io_queue_depth": 65,
            "nr_io_queues": 1,
            "latency_ns": 100_000,
            "irq_coalesce_thr": 7,
            "irq_coalesce_time": 1,
            "iodepth": 32,
            "iodepth_batch_submit": 1,
            "cpus": 4,
        },
        attempt_s=1.0,
    ),
    patches=((SbitmapQueue, "clear_batch", _clear_batch_counted_once),),
)


# -- 872b844c: a waiter not counted in ws_active ------------------------------------------------


def _prepare_to_wait_uncounted(self: SbitmapQueue, ws_index: int, wait: SbqWait) -> None:
    """The shared-tag wait before 872b844c: the task queued itself on the wait queue
    directly, without counting itself in ws_active."""
    self.ws[ws_index].prepare_to_wait_exclusive()


def _finish_wait_uncounted(self: SbitmapQueue, ws_index: int, wait: SbqWait) -> None:
    self.ws[ws_index].finish_wait()


WS_ACTIVE_UNCOUNTED = Bug(
    name="ws_active_uncounted",
    commit="872b844c (unverified)",
    subject="blk-mq: Fix sbitmap ws_active for shared tags",
    what="a waiter that does not count itself in ws_active is skipped by every free",
    explanation=(
        "sbitmap_queue_clear() skips the wake-up entirely while ws_active is 0, so a "
        "free costs one load when nobody sleeps; that only works if every sleeper counts "
        "itself in ws_active (sbitmap_prepare_to_wait). With shared tags, "
        "blk_mq_mark_tag_wait() queued the hctx's dispatch_wait entry on the tag wait "
        "queue with __add_wait_queue(), uncounted: no free ever looked at it, and when "
        "it was the only waiter it waited until something else reran the queue. The fix "
        "increments and decrements ws_active around that wait. mqrt has no "
        "dispatch-time driver tag (no I/O scheduler), so the same omission is switched "
        "on where our tasks wait for a tag: the sleepers queue without counting "
        "themselves: every free skips the wake-up by construction, so this entry shows "
        "the mechanism, not the kernel's interleaving. The commit id could not be "
        "checked against the kernel's history. Scenario: 2 null_blk devices on one "
        "shared tag set of 16 tags, 2 CPUs keeping 16 I/Os each, 50 us completions."
    ),
    scenario=Scenario(
        given={
            "nr_devices": 2,
            "shared_tags": 1,
            "hw_queue_depth": 16,
            "irqmode": "timer",
            "completion_nsec": 50_000,
            "iodepth": 16,
            "cpus": 2,
        },
        attempt_s=3.0,
    ),
    patches=(
        (SbitmapQueue, "prepare_to_wait", _prepare_to_wait_uncounted),
        (SbitmapQueue, "finish_wait", _finish_wait_uncounted),
    ),
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
        "wake_batch for it. Scenario: randwrite with async_depth 2 on 64 tags (wake_batch "
        "8 without the fix, 1 with it), one CPU keeping 16 writes queued."
    ),
    scenario=Scenario(
        given={
            "rw": "randwrite",
            "async_depth": 2,
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


# -- 48c033314f37: a wait_cnt left at zero when its wait queue emptied -------------------------


def _legacy_wake_up_once_no_reset(self: SbitmapQueue, nr: int) -> tuple[bool, int]:
    """__sbq_wake_up() between 040b83fcecfb and 48c033314f37: after counting the
    frees down, a wait queue found empty (its sleeper left meanwhile) made the waker
    return at once, even when it had just brought wait_cnt to 0 -- without resetting
    it to wake_batch."""
    a = self.a
    if nr <= 0:
        return False, nr
    i = self._legacy_wake_ptr()
    if i < 0:
        return False, nr
    ws = self.ws[i]
    cnt_off = self._wait_cnt[i]
    cur = a.read32(cnt_off)
    while True:
        if cur == 0:
            return True, nr
        sub = min(nr, cur)
        wait_cnt = cur - sub
        found = a.cmpxchg32(cnt_off, cur, wait_cnt)
        if found == cur:
            break
        cur = found
    if inject.armed:
        inject.hit("sbq.wake.before_reset")
    if not ws.active():
        return True, nr  # the bug: at wait_cnt == 0 nobody resets it now
    if wait_cnt > 0:
        return False, nr
    nr -= sub
    wake_batch = a.read32(self._wake_batch)
    ws.wake_up_nr(wake_batch)
    old = a.read32(self._wake_index)
    a.cmpxchg32(self._wake_index, old, (old + 1) % SBQ_WAIT_QUEUES)
    a.set32(cnt_off, wake_batch)
    return nr > 0, nr


WAIT_CNT_LEFT_AT_ZERO = Bug(
    name="wait_cnt_left_at_zero",
    commit="48c033314f37",
    subject="sbitmap: Avoid leaving waitqueue in invalid state in __sbq_wake_up()",
    what="a free that brings a wait queue's count to 0 just as its sleeper leaves never "
    "resets it: that wait queue is never woken again",
    explanation=(
        "After 040b83fcecfb, __sbq_wake_up() decremented the chosen wait queue's "
        "wait_cnt and then returned at once if the queue had no waiters any more. If "
        "that decrement was the one that reached 0 -- the queue's last sleeper having "
        "just left it (it found a tag on its own, or another free woke it) -- nobody "
        "reset wait_cnt to wake_batch. sbq_wake_ptr() skips a queue whose count is 0, "
        "so every task that later sleeps on it waits for a wake-up that never comes, "
        "while the other queues keep working. The fix resets the count whenever it "
        "reached 0 and retries the wake-up elsewhere if the queue was empty. The window "
        "is between the waker's choice of the queue and its look at the queue's "
        "waiters; a sleeper that retries its allocation after queueing itself closes "
        "it from the other side. Scenario: legacy sbitmap, one null_blk device of 16 "
        "tags (wake_batch 2), 4 CPUs keeping 16 I/Os each, 20 us timer completions, and "
        "the waker held up to 200 us after counting (injected, 30 % of frees)."
    ),
    scenario=Scenario(
        given={
            "sbitmap": "legacy",
            "hw_queue_depth": 16,
            "irqmode": "timer",
            "completion_nsec": 20_000,
            "iodepth": 16,
            "cpus": 4,
            "submit_queues": 1,
        },
        inject={"sbq.wake.before_reset": (30.0, 200)},
        attempt_s=3.0,
    ),
    patches=((SbitmapQueue, "_legacy_wake_up_once", _legacy_wake_up_once_no_reset),),
)


CATALOGUE = {
    b.name: b
    for b in (
        WAKE_BATCH_FAIR_SHARE,
        RESIZE_WAKEUP_HANG,
        WAKE_BATCH_MIN4,
        CLEARED_RACE,
        BATCH_COUNTED_ONCE,
        WS_ACTIVE_UNCOUNTED,
        WAKE_BATCH_ABOVE_DEPTH,
        SHALLOW_MISSED_WAKEUP,
        WAIT_CNT_LEFT_AT_ZERO,
    )
}

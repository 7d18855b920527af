"""Bugs that spin: a CPU going round a retry loop that can never end, with nothing
submitted or completed (the ``livelock`` detector's findings)."""

from __future__ import annotations

from mqrt.lib.sbitmap import SBQ_WAIT_QUEUES, SbitmapQueue
from mqrt.race.entry import Bug, Scenario

# -- 30514bd2dd4e: a wake-up spinning on a wait queue whose count is being reset -----------------


def _legacy_wake_ptr_any_count(self: SbitmapQueue) -> int:
    """sbq_wake_ptr() before 30514bd2dd4e, ported from the block tree for Linux 6.1
    of September 2022 (after 040b83fcecfb, 4acb83417cad and 48c033314f37; its
    __sbq_wake_up() is our _legacy_wake_up_once() as it stands, the fix touched
    only this function): the first wait state from wake_index with sleepers, whatever
    its wait_cnt -- also one whose count a waker has just taken to 0 and not yet
    reset, on which __sbq_wake_up() can only ask to be called again."""
    a = self.a
    if not a.read32(self._ws_active):
        return -1
    wake_index = a.read32(self._wake_index)
    for _ in range(SBQ_WAIT_QUEUES):
        if self.ws[wake_index].active():
            if wake_index != a.read32(self._wake_index):
                a.set32(self._wake_index, wake_index)
            return wake_index
        wake_index = (wake_index + 1) % SBQ_WAIT_QUEUES
    return -1


WAKE_PTR_COUNT_ZERO = Bug(
    name="wake_ptr_count_zero",
    commit="30514bd2dd4e",
    subject="sbitmap: fix lockup while swapping",
    what="a wake-up nested in another on the same CPU spins forever on a wait queue whose "
    "count the interrupted one took to 0",
    explanation=(
        "In the legacy scheme a waker counts frees down on the wait queue "
        "sbq_wake_ptr() picks; the one that takes its wait_cnt to 0 wakes a batch of "
        "sleepers, moves wake_index on and resets the count to wake_batch. A second "
        "waker that finds the count 0 meanwhile returns true from __sbq_wake_up(): try "
        "again, another waker is resetting it. But sbq_wake_ptr() chose any wait queue "
        "with sleepers, "
        "whatever its count, so the retry picks the same queue, and again. Across CPUs "
        "that is a wait until the other waker resets the count; on one CPU it is "
        "forever: a task freeing a tag in process context (Hugh Dickins's lockup: a "
        "request freed after a bio merge, while swapping) is interrupted between "
        "taking the count to 0 and resetting it, and the interrupt's softirq ends a "
        "request of the same tag map: its wake-up spins, and the task it interrupted "
        "never runs again to reset the count. Every other CPU that frees a tag then "
        "spins on the same queue. The fix makes sbq_wake_ptr() skip a queue whose "
        "count is 0 (at the price of a rare lost wake-up, as its message says). "
        "Scenario: legacy sbitmap, one null_blk queue of 16 tags (4 words of 4 bits, "
        "wake_batch 2) shared by 4 CPUs, 1 ms hrtimer completions, sequential reads "
        "submitted 4 at a time: each plug takes a batch of free tags from one word, "
        "merges its 4 bios into one request and frees the unused tags at the end of "
        "the plug, in process context (mqrt's counterpart of the request freed after a "
        "merge in the commit's backtrace), while the CPU's expired hrtimers wait to "
        "complete requests. The waker that takes a count to 0 is held up to 100 us "
        "(injected, 30 % of the times) and an interrupt arriving then runs nested: the "
        "injected delay takes the CPU's pending interrupts (expired hrtimers, IPIs, "
        "then softirqs), as a kernel CPU takes them in the middle of the task's code "
        "and mqrt's CPUs otherwise never do. Without it (--no-inject) only the "
        "cross-CPU form can show: the others spinning while a waker the host "
        "deschedules holds a count at 0."
    ),
    scenario=Scenario(
        given={
            "sbitmap": "legacy",
            "hw_queue_depth": 16,
            "submit_queues": 1,
            "irqmode": "timer",
            "completion_nsec": 1_000_000,
            "rw": "read",
            "bs": 4096,
            "iodepth": 32,
            "iodepth_batch_submit": 4,
            "cpus": 4,
        },
        inject={"sbq.wake.before_reset": (30.0, 100)},
        inject_irqs=True,
        attempt_s=3.0,
    ),
    patches=((SbitmapQueue, "_legacy_wake_ptr", _legacy_wake_ptr_any_count),),
    detectors=("livelock",),
    window=(
        "a task between the cmpxchg that brings a wait queue's wait_cnt to 0 and its "
        "reset of it; a free in an interrupt taken on the same CPU (or a free on another "
        "CPU while the task is off the core) choosing that wait queue inside it"
    ),
)


ENTRIES = (WAKE_PTR_COUNT_ZERO,)

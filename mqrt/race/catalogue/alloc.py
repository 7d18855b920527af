"""Bugs on the allocation side of the sbitmap: finding, folding and hinting free
bits."""

from __future__ import annotations

from mqrt.lib import inject
from mqrt.lib.lockstat import LockClass
from mqrt.lib.sbitmap import Sbitmap
from mqrt.lib.wait import spin_lock, spin_unlock
from mqrt.race.entry import Bug, Scenario

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
    spin_lock(a, lock, LockClass.TAGS_SWAP_LOCK)
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
        "50 ms from the run's common start (rate_iops 20, 20 us completions), so they "
        "allocate in step and the word fills with deferred frees at the 33rd round, "
        "1.65 s in. The failed search is delayed up to 300 us before the fold (the two "
        "allocators arrive apart) and the fold is held open up to 20 ms; the loser "
        "sleeps until 8 frees of the other CPU's one I/O every 50 ms, 400 ms, but the "
        "jobs stop 0.25 s after the word filled, and nothing wakes it. Device 1 carries "
        "1,000 I/Os a second per CPU (32 deep) so that a run of the fixed code "
        "completes requests; more would hold its own folds open often enough to put "
        "the two CPUs out of step on device 0."
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
        queue_jobs={0: {"iodepth": 1, "rate_iops": 20}, 1: {"rate_iops": 1000}},
        timeline=("25ms:nullb0/debug/nr_requests_unfrozen=64",),
        inject={
            "sbitmap.get.before_fold": (100.0, 300),
            "sbitmap.fold.after_xchg": (100.0, 20000),
        },
        attempt_s=1.9,
    ),
    patches=((Sbitmap, "deferred_clear", _deferred_clear_racy),),
    window=(
        "one allocator between its xchg of a word's cleared mask and its clearing of "
        "those bits in the word; another allocator's failed search of the word and its "
        "unlocked look at cleared landing inside it"
    ),
)


ENTRIES = (CLEARED_RACE,)

# Looked at and left out: "sbitmap: fix hint wrap in the failure case" (Chengming Zhou,
# 2023; upstream id not verified here).  In __sbitmap_get_word() a lost
# test_and_set_bit_lock() near the end of the word sent the search back to bit 0, or
# wrapped it twice; every bit is still searched, so no free bit is reported taken --
# only round_robin's strict order suffers, which no detector watches (and the word
# search here is one C call, find_and_set_zero_bit).

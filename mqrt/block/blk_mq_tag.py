"""Port of ``block/blk-mq-tag.c``: tag allocation on sbitmap_queues, reserved tags,
active-queue tracking and the fair share of a shared tag map.

Tag allocation using scalable bitmaps: each :class:`Tags` (``struct blk_mq_tags``)
owns a ``bitmap_tags`` sbitmap_queue for normal tags and, when the set reserves some,
a ``breserved_tags`` one; reserved tags are numbered ``0..nr_reserved_tags-1`` and
normal tags follow them.  When several request queues share the tags
(``BLK_MQ_F_TAG_QUEUE_SHARED``) each active queue is held to its fair share of the
depth (:meth:`Tags.may_queue`, the kernel's ``hctx_may_queue``) and ``wake_batch`` is
recalculated for the number of active users.

``BLK_MQ_F_TAG_HCTX_SHARED`` comes in two models (``TagSet.shared_tag_model``):

* "6.x" (Linux 5.16+, ``set->shared_tags``): one tags for every hctx, with one
  request pool of queue_depth; the active users are that tags' ``active_queues``.
* "5.10" (``blk_mq_init_shared_sbitmap()``): every hctx keeps its own tags and
  request pool of queue_depth (``tags->static_rqs``), but their ``bitmap_tags`` and
  ``breserved_tags`` point at the set's ``__bitmap_tags`` and ``__breserved_tags``
  (:func:`share_sbitmap`).  A tag numbers a bit of the shared bitmap and names the
  request at that hctx's ``rq_base + tag``; the active users are the set's
  ``active_queues_shared_sbitmap``.

Deviations from Linux
    * A tag's request lives in the tag set's request pool in shared memory at
      ``rq_base + tag`` (``tags->static_rqs``): without an elevator the driver tag
      is the request's identity and ``tags->rqs[]`` is not written.  A scheduler
      request (a queue's sched pool, :class:`~mqrt.block.blk_mq_structs.SchedRequest`)
      that takes a driver tag at dispatch is named in ``rqs[tag]`` (its request id)
      while it holds it; :meth:`Tags.rq_of` turns a driver tag into its request
      either way.
    * ``tags->lock`` is a bit spinlock in the arena.
    * 5.10 shared sbitmap: the header of the set's tags (``active_queues``, the
      kernel's ``set->active_queues_shared_sbitmap``, and ``lock``) is every hctx's
      tags header, so the lock that guards the shared bitmaps' wake_batch
      recalculation is one for the set.
    * The wait loop sleeps through the calling CPU's ``schedule`` callback, which keeps
      taking that CPU's interrupts, IPIs and timers while the task sleeps.

Concurrency
    * ``active_queues``: changed under ``lock`` together with ``wake_batch``
      (``blk_mq_update_wake_batch``, 4f1731df60f9 of 6.5, carried by every
      generation); read locklessly by :meth:`Tags.may_queue` (READ_ONCE), as in the
      kernel.
    * ``rqs[tag]``: written (store-release) by the CPU that took the driver tag for
      a scheduler request, before ->queue_rq; reset by the CPU that puts the tag
      back, before the bitmap's clear; read (load-acquire) by whoever turns a busy
      tag into its request (completion by tag, the iterators).
    * ``nr_active`` (per hctx, or per queue with ``TAG_HCTX_SHARED``): atomic
      increment after a tag is taken, decrement when it is freed; the fair-share test
      reads it before taking the tag, so it can overshoot by one per racing CPU, as
      in the kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from mqrt.block.blk_mq_types import RQ_ALLOCATED, RQ_STATE_MASK, RqState
from mqrt.lib import inject, trace
from mqrt.lib.lockstat import LockClass
from mqrt.lib.sbitmap import UINT_MAX, SbitmapQueue, SbitmapQueueSpec, SbqGeneration, SbqWait
from mqrt.lib.shm import Arena, Layout, Region, cacheline_struct
from mqrt.lib.trace import Ev
from mqrt.lib.wait import Waiters, spin_lock, spin_unlock

if TYPE_CHECKING:
    from mqrt.block.blk_mq_structs import Request

#: busy_tag_iter_fn: called for a busy tag's request with the state word the iterator
#: found it in (its instance: RQ_ALLOCATED, MQ_RQ_* and the generation); False stops
#: the walk.
BusyTagIterFn = Callable[["Request", int], bool]

_IDLE = int(RqState.IDLE)

#: The "no tag" sentinel (BLK_MQ_NO_TAG).
BLK_MQ_NO_TAG = -1
#: ``tags->rqs[tag]`` of a tag no scheduler request holds.
RQS_NONE = -1
#: The smallest usable depth beyond the reserved tags (BLK_MQ_TAG_MIN).
BLK_MQ_TAG_MIN = 1
#: The floor of a queue's fair share of a shared tag map.
FAIR_SHARE_MIN = 4

#: The scalar part of struct blk_mq_tags.
TAGS_HEADER = cacheline_struct(
    [("active_queues", "<i4")],  # users of a shared map; changed under lock
    [("lock", "<u8")],  # tags->lock (bit spinlock)
)


@dataclass(frozen=True)
class TagsSpec:
    """Placement of one ``struct blk_mq_tags`` (picklable, data-free)."""

    index: int  #: which tags of the set (hctx index, or 0 for 6.x shared tags)
    nr_tags: int  #: every tag, reserved ones included (the set's queue_depth)
    nr_reserved_tags: int
    rq_base: int  #: request id of tag 0 in the set's request pool
    header: Region
    bitmap_tags: SbitmapQueueSpec
    breserved_tags: SbitmapQueueSpec | None
    rqs: Region  #: tags->rqs[]: the scheduler request holding each tag, by request id


def declare_tags(
    layout: Layout,
    name: str,
    index: int,
    nr_tags: int,
    nr_reserved_tags: int,
    nr_cpus: int,
    rq_base: int,
    *,
    round_robin: bool = False,
    generation: SbqGeneration = SbqGeneration.CURRENT,
) -> TagsSpec:
    """blk_mq_init_tags(): reserve one tags' header and bitmaps in ``layout``."""
    depth = nr_tags - nr_reserved_tags
    header = layout.add(f"{name}.header", TAGS_HEADER)
    rqs = layout.add(f"{name}.rqs_map", "<i4", nr_tags)
    bitmap = SbitmapQueue.declare(
        layout,
        f"{name}.bitmap_tags",
        depth,
        nr_cpus,
        round_robin=round_robin,
        generation=generation,
    )
    reserved = None
    if nr_reserved_tags:
        reserved = SbitmapQueue.declare(
            layout,
            f"{name}.breserved_tags",
            nr_reserved_tags,
            nr_cpus,
            round_robin=round_robin,
            generation=generation,
        )
    return TagsSpec(index, nr_tags, nr_reserved_tags, rq_base, header, bitmap, reserved, rqs)


def share_sbitmap(shared: TagsSpec, index: int, rq_base: int) -> TagsSpec:
    """blk_mq_init_tags() with BLK_MQ_F_TAG_HCTX_SHARED then blk_mq_init_shared_sbitmap()
    (Linux 5.10): hctx ``index``'s tags, with requests of its own from ``rq_base``,
    whose bitmaps are the set's (``tags->bitmap_tags = &set->__bitmap_tags;
    tags->breserved_tags = &set->__breserved_tags;``) and whose header is the set's."""
    return replace(shared, index=index, rq_base=rq_base)


def init_tags(
    arena: Arena, spec: TagsSpec, seed: int = 0, min_shallow_depth: int = UINT_MAX
) -> None:
    """Owner only: empty bitmaps, no active queues; ``min_shallow_depth`` is the
    shallowest limit allocations of bitmap_tags will use (an I/O scheduler's, set by
    blk_mq_set_min_shallow_depth())."""
    o = spec.header.offsets()
    arena.atomic.set32(o.active_queues, 0)
    arena.atomic.set(o.lock, 0)
    arena.buf[spec.rqs.offset : spec.rqs.offset + spec.rqs.nbytes] = b"\xff" * spec.rqs.nbytes
    SbitmapQueue.init(arena, spec.bitmap_tags, seed, min_shallow_depth)
    if spec.breserved_tags is not None:
        SbitmapQueue.init(arena, spec.breserved_tags, seed + 1)


class Tags:
    """One CPU's handle on a ``struct blk_mq_tags``."""

    def __init__(
        self, arena: Arena, spec: TagsSpec, waiters: Waiters, cpu: int, sched: bool = False
    ):
        """``sched``: these are an elevator's sched tags (their words count as lock
        class ``sched_tags.bitmap``, not ``tags.bitmap``)."""
        self.spec = spec
        cls = LockClass.SCHED_TAGS_BITMAP if sched else LockClass.TAGS_BITMAP
        self.a = arena.atomic
        self.cpu = cpu
        self.index = spec.index  #: the hctx these tags serve (0 for 6.x shared tags)
        self.nr_tags = spec.nr_tags
        self.nr_reserved_tags = spec.nr_reserved_tags
        self.rq_base = spec.rq_base
        self.bitmap_tags = SbitmapQueue(arena, spec.bitmap_tags, waiters, cpu, lock_class=cls)
        self.bitmap_sb = self.bitmap_tags.sb  #: for the allocation fast path
        self.breserved_tags = (
            SbitmapQueue(arena, spec.breserved_tags, waiters, cpu, lock_class=cls)
            if spec.breserved_tags is not None
            else None
        )
        o = spec.header.offsets()
        self._active_queues = o.active_queues
        self._lock = o.lock
        self._rqs = spec.rqs.offset
        #: The share this CPU's last fair-share check allowed (0: not limited); lets
        #: the caller record how far a limited user went (max_active).
        self.last_share = 0
        #: Contention counters of this CPU on these tags.
        self.nr_tag_waits = 0
        self.nr_tag_sleeps = 0

    # -- active queues and the fair share -------------------------------------------------

    @property
    def active_queues(self) -> int:
        return self.a.read32(self._active_queues)

    def _update_active(self, delta: int) -> int:
        """Change active_queues and recalculate wake_batch for the new count, both
        under tags->lock (4f1731df60f9, 6.5: before it the count was an atomic and
        the recalculation ran unlocked, so a racing busy/idle could leave wake_batch
        sized for a stale count; ``mqrt race run active_queues_unlocked``)."""
        spin_lock(self.a, self._lock, LockClass.TAGS_LOCK)
        try:
            users = self._count_active(delta)
            self.update_wake_batch(users)
            return users
        finally:
            spin_unlock(self.a, self._lock)

    def update_wake_batch(self, users: int) -> None:
        """blk_mq_update_wake_batch(): size both bitmaps' wake_batch for ``users``."""
        if users > 0:
            self.bitmap_tags.recalculate_wake_batch(users)
            if self.breserved_tags is not None:
                self.breserved_tags.recalculate_wake_batch(users)

    def _count_active(self, delta: int) -> int:
        """active_queues += delta (the caller holds tags->lock); the new count."""
        users = self.a.read32(self._active_queues) + delta
        self.a.set32(self._active_queues, users)
        if trace.on:
            trace.emit(Ev.TAG_BUSY if delta > 0 else Ev.TAG_IDLE, -1, 0, self.index, 0, users)
        return users

    def tag_busy(self, state_off: int, active_bit: int) -> None:
        """__blk_mq_tag_busy(): mark a user active (its hctx's TAG_ACTIVE bit, or its
        queue's HCTX_ACTIVE flag with shared tags) and count it once."""
        if self.a.test_bit(state_off, active_bit) or self.a.test_and_set_bit(state_off, active_bit):
            return
        if inject.armed:
            inject.hit("tag.busy.before_recalc")
        self._update_active(+1)

    def tag_idle(self, state_off: int, active_bit: int) -> None:
        """__blk_mq_tag_idle(): the user went idle: uncount it and wake every waiter
        of the normal tags, so they re-evaluate their fair share
        (blk_mq_tag_wakeup_all(tags, false): reserved waiters are not held to a
        share, so they are left alone)."""
        if not self.a.test_and_clear_bit(state_off, active_bit):
            return
        self._update_active(-1)
        self.bitmap_tags.wake_all()

    def may_queue(self, state_off: int, active_bit: int, nr_active_off: int) -> bool:
        """hctx_may_queue() for a shared map: may this user take one more tag?"""
        a = self.a
        self.last_share = 0
        depth = self.bitmap_tags.sb.depth
        if depth == 1:  # a map of one tag cannot be shared out
            return True
        if not a.test_bit(state_off, active_bit):
            return True
        users = a.read32(self._active_queues)
        if users <= 1:
            return True
        share = max((depth + users - 1) // users, FAIR_SHARE_MIN)
        self.last_share = share  # instrumentation: this CPU's last check was limited
        return a.read32(nr_active_off) < share

    def fair_share(self) -> int:
        """The depth each active user may hold right now (for reports and tests)."""
        users = max(1, self.active_queues)
        depth = self.bitmap_tags.sb.depth
        return depth if depth == 1 else max((depth + users - 1) // users, FAIR_SHARE_MIN)

    # -- allocation -------------------------------------------------------------------------

    def get_tag(
        self,
        reserved: bool,
        nowait: bool,
        may_queue: Callable[[], bool] | None,
        wait_index: int,
        run_queue: Callable[[], None],
        schedule: Callable[[], None],
        shallow: int = 0,
    ) -> int:
        """blk_mq_get_tag(): a tag (reserved tags first in the numbering), or
        BLK_MQ_NO_TAG if none is free and ``nowait``.

        ``may_queue`` is the fair-share test of a shared map (None when not shared);
        a user over its share sleeps as if the map were full.  Before sleeping, the
        hardware queue is run (``run_queue``) so requests already queued can complete
        and free tags; ``schedule`` sleeps this CPU's task until a wake-up while still
        taking its interrupts.
        """
        if reserved:
            bt = self.breserved_tags
            if bt is None:
                raise ValueError("reserved tag requested from tags with no reserved tags")
            offset = 0
        else:
            bt = self.bitmap_tags
            offset = self.nr_reserved_tags

        if reserved:
            may_queue = None  # __blk_mq_get_tag(): reserved tags are not shared out

        def try_get() -> int:
            if may_queue is not None and not may_queue():
                return -1
            return bt.get_shallow(shallow) if shallow else bt.sb.get()

        tag = try_get()
        if tag != -1:
            return tag + offset
        if trace.on:
            trace.emit(Ev.TAG_GET_FAIL, -1, 0, self.index, 0, int(nowait))
        if nowait:
            return BLK_MQ_NO_TAG
        self.nr_tag_waits += 1
        wait = SbqWait()
        ws_index = bt.wait_ptr(wait_index)
        try:
            while True:
                tag = try_get()
                if tag != -1:
                    break
                if inject.armed:
                    inject.hit("tag.get.after_fail")
                run_queue()
                tag = try_get()
                if tag != -1:
                    break
                bt.prepare_to_wait(ws_index, wait)
                tag = try_get()
                if tag != -1:
                    break
                self.nr_tag_sleeps += 1
                if inject.armed:
                    inject.hit("tag.get.before_sleep")
                if trace.on:
                    trace.emit(Ev.TAG_SLEEP, -1, 0, self.index, 0, ws_index)
                schedule()
                if trace.on:
                    trace.emit(Ev.TAG_WAKE, -1, 0, self.index, 0, ws_index)
                bt.finish_wait(ws_index, wait)
                ws_index = bt.wait_ptr(wait_index)
        finally:
            bt.finish_wait(ws_index, wait)
        return tag + offset

    def put_tag(self, tag: int, cpu: int) -> None:
        """blk_mq_put_tag(): free ``tag``; it becomes the allocating ``cpu``'s next
        hint (cache locality), and waiters are woken by batch."""
        nr = tag - self.nr_reserved_tags
        bt = self.bitmap_tags if nr >= 0 else self.breserved_tags
        assert bt is not None  # a reserved tag came from breserved_tags
        if nr < 0:
            nr = tag
        if not bt.count_frees:  # the common case: nobody counts frees
            bt.clear(nr, cpu)
            return
        bt.free_begin()  # the race detectors' evidence
        bt.clear(nr, cpu)
        bt.free_end(1)

    def put_tags(self, tag_list: list[int]) -> None:
        """blk_mq_put_tags(): a batch of (non-reserved) tags back in one
        sbitmap_queue_clear_batch()."""
        bt = self.bitmap_tags
        if bt.count_frees:
            bt.free_begin()
        bt.clear_batch(self.nr_reserved_tags, tag_list)
        if bt.count_frees:
            bt.free_end(len(tag_list))

    # -- tags->rqs[]: a driver tag's request -----------------------------------------------------

    def set_rq(self, tag: int, rq_id: int) -> None:
        """``tags->rqs[tag] = rq``: a scheduler request took driver ``tag``."""
        self.a.store_release32(self._rqs + 4 * tag, rq_id)

    def clear_rq(self, tag: int) -> None:
        """A scheduler request gives driver ``tag`` back (before the bitmap's clear)."""
        self.a.set32(self._rqs + 4 * tag, RQS_NONE)

    def rq_id_of(self, tag: int) -> int:
        """The request id holding driver ``tag``: the scheduler request ``rqs[tag]``
        names, else the driver pool's request of that tag (``rq_base + tag``)."""
        r = self.a.load_acquire32(self._rqs + 4 * tag)
        return self.rq_base + tag if r == RQS_NONE else r

    def nr_sched_held(self) -> int:
        """How many driver tags scheduler requests hold now (``rqs[]`` entries set),
        read one by one: for observers."""
        read32 = self.a.read32
        return sum(1 for t in range(self.nr_tags) if read32(self._rqs + 4 * t) != RQS_NONE)

    def rq_of(self, rqs: Sequence[Request], tag: int) -> Request:
        """The request of driver ``tag`` (``tags->rqs[tag]``), from ``rqs``, the tag
        set's accessors by request id."""
        return rqs[self.rq_id_of(tag)]

    # -- iterating over busy tags (blk_mq_queue_tag_busy_iter, blk_mq_tagset_busy_iter) -------

    def find_and_get_req(self, rqs: Sequence[Request], tag: int) -> int:
        """blk_mq_find_and_get_req(): the state word of the request that owns ``tag``
        now (the instance the caller holds: its generation), or -1 if no request owns
        it (the tag was taken but its request is not set up yet, or was freed since
        the bitmap was read).

        The kernel takes a reference (refcount_inc_not_zero) so that the request
        cannot be freed and reused while ->fn runs.  A request's memory never moves
        here and there is no refcount: the word read once, with acquire (the
        allocating CPU set RQ_ALLOCATED after it wrote the request), names the
        instance, and a callback acts on the request only at that generation (a
        cmpxchg against it, as :meth:`BlkMqCompletion.complete_request` does with
        ``gen``); whatever it finds of another generation is not its own."""
        st = self.a.load_acquire(self.rq_of(rqs, tag).base)
        return st if st & RQ_ALLOCATED else -1

    def busy_iter(
        self,
        rqs: Sequence[Request],
        fn: BusyTagIterFn,
        started: bool = False,
        match: Callable[[Request], bool] | None = None,
    ) -> bool:
        """bt_for_each() / bt_tags_for_each() over the reserved tags, then the
        normal ones: ``fn(rq, state)`` for every tag in use whose request is owned
        (:meth:`find_and_get_req`), with ``started`` only if it was started
        (blk_mq_request_started(): not IDLE), and only if ``match(rq)`` (bt_iter's
        test that the request is the queue's and the hctx's).  ``rqs`` are the
        caller's accessors of the tag set's requests, by request id.  False if
        ``fn`` stopped the walk."""
        go = True

        def visit(offset: int) -> Callable[[int], bool]:
            def one(bitnr: int) -> bool:
                nonlocal go
                tag = bitnr + offset
                rq = self.rq_of(rqs, tag)
                st = self.a.load_acquire(rq.base)  # find_and_get_req(), on that request
                if not st & RQ_ALLOCATED or (started and st & RQ_STATE_MASK == _IDLE):
                    return True
                if match is not None and not match(rq):
                    return True
                go = fn(rq, st)
                return go

            return one

        if self.breserved_tags is not None:
            self.breserved_tags.sb.for_each_set(visit(0))
            if not go:
                return False
        self.bitmap_tags.sb.for_each_set(visit(self.nr_reserved_tags))
        return go

    # -- debugfs ------------------------------------------------------------------------------

    def show(self) -> str:
        """The body of debugfs ``hctxN/tags``.  For debugging; the format may change."""
        out = [
            f"nr_tags={self.nr_tags}",
            f"nr_reserved_tags={self.nr_reserved_tags}",
            f"active_queues={self.active_queues}",
            "",
            "bitmap_tags:",
            self.bitmap_tags.show().rstrip("\n"),
        ]
        if self.breserved_tags is not None:
            out += ["", "breserved_tags:", self.breserved_tags.show().rstrip("\n")]
        return "\n".join(out) + "\n"


# -- what a tag sleeper waits for ---------------------------------------------------------------

_KEY_FIELD = 1 << 16


def tag_wait_key(queue: int, hctx: int, shallow: int) -> int:
    """The key a task about to wait for a tag publishes in its wait-queue entry
    (:meth:`~mqrt.lib.wait.Waiters.set_waits_for`): its request queue, its hctx and
    the shallow depth its allocation is held to (0: none).  With it an observer can
    ask what the sleeper may take, as blk_mq_get_tag() would (the race detectors)."""
    if not (0 <= hctx < _KEY_FIELD and 0 <= shallow < _KEY_FIELD and queue >= 0):
        raise ValueError(f"tag wait key out of range: queue {queue} hctx {hctx} shallow {shallow}")
    return (queue << 32) | (hctx << 16) | shallow


def decode_tag_wait_key(key: int) -> tuple[int, int, int]:
    """(queue, hctx, shallow) of a :func:`tag_wait_key`."""
    return key >> 32, (key >> 16) & (_KEY_FIELD - 1), key & (_KEY_FIELD - 1)


def _each_once(tags: Iterable[Tags | None]) -> list[Tags]:
    """The distinct tags among an hctx list's (shared tags once; an hctx no CPU
    maps has none: blk_mq_hw_queue_mapped())."""
    out: dict[int, Tags] = {}
    for t in tags:
        if t is not None:
            out.setdefault(id(t), t)
    return list(out.values())


def queue_tag_busy_iter(
    tags: Iterable[Tags | None],
    rqs: Sequence[Request],
    fn: BusyTagIterFn,
    match: Callable[[Request], bool],
) -> None:
    """blk_mq_queue_tag_busy_iter(): ``fn`` for every owned request of a queue's
    hctxs' ``tags`` that ``match`` says is the queue's, started or not."""
    for t in _each_once(tags):
        if not t.busy_iter(rqs, fn, match=match):
            return


def tagset_busy_iter(
    tags: Iterable[Tags | None], rqs: Sequence[Request], fn: BusyTagIterFn
) -> None:
    """blk_mq_tagset_busy_iter(): ``fn`` for every started request of a tag set's
    ``tags``, whichever queue it belongs to (BT_TAG_ITER_STARTED)."""
    for t in _each_once(tags):
        if not t.busy_iter(rqs, fn, started=True):
            return

"""mqrt.lib.sbitmap: the kernel's arithmetic, scripted wake-ups, and real processes."""

from __future__ import annotations

import os
import random
import time

import psutil
import pytest

from mqrt.block.blk_mq_tag import Tags, declare_tags, init_tags
from mqrt.lib import inject
from mqrt.lib.sbitmap import (
    SBQ_WAIT_QUEUES,
    SbitmapQueue,
    SbitmapWarning,
    SbqGeneration,
    SbqWait,
    calculate_shift,
)
from mqrt.lib.shm import Arena, Layout
from mqrt.lib.wait import TaskState, Waiters
from tests.helpers import run_processes

pytestmark = pytest.mark.timing

GENERATIONS = list(SbqGeneration)


class Rig:
    """One arena holding a sbitmap_queue and a waiter table, with handles per CPU.

    With ``tags=True`` the sbitmap_queue is the ``bitmap_tags`` of a real
    ``struct blk_mq_tags`` (no reserved tags), so the block layer's tag wait loop
    (:meth:`Tags.get_tag`) can run on it."""

    def __init__(self, depth, nr_cpus=2, nr_waiters=2, tags=False, **kw):
        self.layout = Layout()
        self.wspec = Waiters.declare(self.layout, nr_waiters)
        if tags:
            self.tags_spec = declare_tags(self.layout, "tags", 0, depth, 0, nr_cpus, 0, **kw)
            self.spec = self.tags_spec.bitmap_tags
        else:
            self.tags_spec = None
            self.spec = SbitmapQueue.declare(self.layout, "tags", depth, nr_cpus, **kw)
        self.owners = self.layout.add("owners", "<i8", depth)
        self.sleeps = self.layout.add("sleeps", "<u8")
        self.frees = self.layout.add("frees", "<u8")  #: tags put, by every process
        #: each process's wait_index (an atomic_t, as an hctx's)
        self.wait_index = self.layout.add("wait_index", "<i4", nr_cpus)
        self.arena = Arena.create(self.layout)
        Waiters.init(self.arena, self.wspec)
        if tags:
            init_tags(self.arena, self.tags_spec, seed=1)
        else:
            SbitmapQueue.init(self.arena, self.spec, seed=1)
        self.eventfds = Waiters.create_eventfds(self.wspec)

    def waiters(self, me):
        return Waiters(self.arena, self.wspec, self.eventfds, me)

    def sbq(self, cpu=0, me=0):
        return SbitmapQueue(self.arena, self.spec, self.waiters(me), cpu=cpu, seed=cpu)

    def tags(self, waiters, cpu=0):
        return Tags(self.arena, self.tags_spec, waiters, cpu)

    def close(self):
        for fd in self.eventfds:
            os.close(fd)
        self.arena.close()


@pytest.fixture
def rig_factory():
    rigs = []

    def make(*args, **kw):
        rig = Rig(*args, **kw)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


@pytest.mark.parametrize(
    ("depth", "shift"),
    [(1, 6), (3, 6), (4, 0), (8, 1), (32, 3), (64, 4), (128, 5), (256, 6), (10240, 6)],
)
def test_calculate_shift(depth, shift):
    assert calculate_shift(depth) == shift


@pytest.mark.parametrize(
    ("gen", "depth", "min_shallow", "expected"),
    [
        ("newest", 64, None, 8),
        ("newest", 16, None, 2),
        ("newest", 4, None, 1),
        ("newest", 1024, None, 8),
        ("newest", 64, 4, 1),  # 6.17: min(64, 4) / 8 clamps to 1
        ("newest", 64, 32, 4),
        ("current", 64, 4, 2),  # 6.6 counts per word, as 6.1 does
        ("current", 64, 32, 8),
        ("legacy", 64, None, 8),
        ("legacy", 64, 4, 2),  # 4 words x min(16, 4) usable bits = 16 -> 2
        ("legacy", 64, 32, 8),  # per word min(16, 32) = 16: shallow depth does not bind
    ],
)
def test_wake_batch(rig_factory, gen, depth, min_shallow, expected):
    rig = rig_factory(depth, generation=SbqGeneration(gen))
    q = rig.sbq()
    if min_shallow is not None:
        q.set_min_shallow_depth(min_shallow)
    assert q.wake_batch == expected


@pytest.mark.parametrize(
    ("gen", "depth", "users", "expected"),
    [
        ("current", 64, 4, 2),  # share 16 -> 2
        ("current", 64, 16, 1),
        ("legacy", 64, 4, 2),  # b5fcf7871acb is in every generation (mqrt race undoes it)
        ("legacy", 16, 4, 1),
    ],
)
def test_recalculate_wake_batch(rig_factory, gen, depth, users, expected):
    q = rig_factory(depth, generation=SbqGeneration(gen)).sbq()
    q.recalculate_wake_batch(users)
    assert q.wake_batch == expected


@pytest.mark.parametrize("gen", GENERATIONS)
def test_every_bit_once_then_full_then_folded(rig_factory, gen):
    q = rig_factory(40, generation=gen).sbq()
    tags = [q.get() for _ in range(40)]
    assert sorted(tags) == list(range(40))
    assert q.get() == -1
    assert q.sb.alloc_hints()[0] == 0  # a failed get resets the hint
    q.clear(17, 0)
    q.clear(3, 1)
    show = q.show()
    assert "busy=38\n" in show and "cleared=2\n" in show
    assert q.sb.weight() == 38
    assert q.sb.alloc_hints() == [17, 3]  # a freed tag is its CPU's next hint
    assert sorted([q.get(), q.get()]) == [3, 17]  # found after folding `cleared`
    assert "cleared=0\n" in q.show()
    assert q.get() == -1


def test_show_format_matches_debugfs(rig_factory):
    q = rig_factory(64, nr_cpus=2).sbq()
    lines = q.show().splitlines()
    keys = [line.split("=", 1)[0] for line in lines if "=" in line and not line.startswith("\t")]
    assert keys == [
        "depth", "busy", "cleared", "bits_per_word", "map_nr", "alloc_hint",
        "wake_batch", "wake_index", "ws_active", "ws", "round_robin", "min_shallow_depth",
    ]  # fmt: skip
    assert lines[lines.index("ws={") + 1] == "\t{.wait=inactive},"
    assert lines[-1] == "min_shallow_depth=4294967295"
    legacy = rig_factory(64, generation=SbqGeneration.LEGACY).sbq()
    assert "\t{.wait_cnt=8, .wait=inactive}," in legacy.show()


def test_bitmap_show_hexdump(rig_factory):
    q = rig_factory(40).sbq()
    sb = q.sb
    for nr in (0, 9, 16, 39):
        sb.a.set_bit(sb._word[nr >> sb.shift], nr & (sb.bits_per_word - 1))
    # bits 0 and 9 -> bytes 01 02; bit 16 -> byte 2 = 01; bit 39 -> byte 4 = 80
    assert sb.bitmap_show() == "00000000: 0102 0100 80\n"
    q.clear(9, 0)  # pending in `cleared`: no longer shown as in use
    assert sb.bitmap_show() == "00000000: 0100 0100 80\n"


def test_round_robin_hands_out_bits_in_order(rig_factory):
    q = rig_factory(16, round_robin=True).sbq()
    assert [q.get() for _ in range(5)] == [0, 1, 2, 3, 4]
    q.clear(1, 0)
    assert q.get() == 5  # freed bits are not reused until the hint wraps
    assert q.sb.alloc_hints()[0] == 6


@pytest.mark.parametrize(("gen", "usable"), [("newest", 8), ("current", 32), ("legacy", 32)])
def test_shallow_depth_whole_bitmap_or_per_word(rig_factory, gen, usable):
    q = rig_factory(64, generation=SbqGeneration(gen)).sbq()
    q.set_min_shallow_depth(8)
    got = []
    while (nr := q.get_shallow(8)) != -1:
        got.append(nr)
    assert len(got) == usable
    if gen == "newest":  # 8 of 64 bits, spread as 2 per 16-bit word
        assert sorted(got) == [0, 1, 16, 17, 32, 33, 48, 49]
    else:  # the first 8 bits of every word
        assert all(nr % 16 < 8 for nr in got)


def test_shallow_below_minimum_warns_once(rig_factory):
    q = rig_factory(64).sbq()
    q.set_min_shallow_depth(16)
    with pytest.warns(SbitmapWarning, match="below min_shallow_depth 16"):
        q.get_shallow(4)
    q.get_shallow(4)  # once only (filterwarnings=error would fail a second warning)


def test_batch_get_and_clear(rig_factory):
    q = rig_factory(64).sbq()
    mask, offset = q.get_batch(4)
    assert bin(mask).count("1") == 4
    tags = [offset + i for i in range(64) if mask >> i & 1]
    assert all(q.sb.test_bit(t) for t in tags)
    q.clear_batch(0, tags)
    assert q.sb.weight() == 0
    rr = rig_factory(64, round_robin=True).sbq()
    assert rr.get_batch(4) == (0, 0)


def test_resize(rig_factory):
    q = rig_factory(64).sbq()
    q.resize(10)
    assert q.sb.depth == 10 and q.sb.map_nr == 1  # the shift stays: 16 bits per word
    assert q.wake_batch == 1
    assert sorted(q.get() for _ in range(10)) == list(range(10))
    assert q.get() == -1
    with pytest.raises(ValueError, match=r"resize depth must be in 1\.\.64"):
        q.resize(65)


# -- wake-ups, scripted in one process --------------------------------------------------


def _sleep_on(rig, me, ws_index=0):
    """Queue waiter `me` on a wait state as blk_mq_get_tag would, without sleeping."""
    q = rig.sbq(me=me)
    wait = SbqWait()
    q.prepare_to_wait(ws_index, wait)
    return q, wait


def _woken(rig, slot):
    w = rig.waiters(None)
    return w.a.read32(w.entry(slot) + w._state) == TaskState.RUNNING


@pytest.mark.parametrize("gen", GENERATIONS)
def test_waiter_woken_after_exactly_wake_batch_frees(rig_factory, gen):
    rig = rig_factory(32, nr_waiters=2, generation=gen)  # wake_batch 4
    freer = rig.sbq(me=0)
    tags = [freer.get() for _ in range(32)]
    sleeper, wait = _sleep_on(rig, 1)
    assert "ws_active=1" in freer.show()
    for i, tag in enumerate(tags[:4]):
        assert not _woken(rig, 1), f"woken after {i} frees"
        freer.clear(tag, 0)
    assert _woken(rig, 1)
    assert sleeper.ws[0].w.schedule(0)  # the eventfd was kicked
    sleeper.finish_wait(0, wait)
    assert "ws_active=0" in freer.show()


@pytest.mark.parametrize("gen", GENERATIONS)
def test_batch_wakes_wake_batch_waiters(rig_factory, gen):
    """106397376c03 'sbitmap: fix batching wakeup': a batch wakes wake_batch waiters,
    not one."""
    rig = rig_factory(32, nr_waiters=6, generation=gen)  # wake_batch 4
    freer = rig.sbq(me=0)
    tags = [freer.get() for _ in range(32)]
    for me in range(1, 6):
        _sleep_on(rig, me, ws_index=0)
    for tag in tags[:4]:
        freer.clear(tag, 0)
    assert [_woken(rig, me) for me in range(1, 6)] == [True, True, True, True, False]


def test_current_wakeup_spreads_over_wait_states(rig_factory):
    rig = rig_factory(16, nr_waiters=4)  # wake_batch 2
    freer = rig.sbq(me=0)
    tags = [freer.get() for _ in range(16)]
    _sleep_on(rig, 1, ws_index=0)
    _sleep_on(rig, 2, ws_index=3)
    _sleep_on(rig, 3, ws_index=3)
    freer.clear(tags[0], 0)
    freer.clear(tags[1], 0)
    # ws 0 had one waiter; the batch of 2 goes on to the next active state.
    assert [_woken(rig, s) for s in (1, 2, 3)] == [True, True, False]
    assert "wake_index=4" in freer.show()


def test_legacy_wait_cnt_counts_down_and_resets(rig_factory):
    rig = rig_factory(16, nr_waiters=3, generation=SbqGeneration.LEGACY)  # wake_batch 2
    freer = rig.sbq(me=0)
    tags = [freer.get() for _ in range(16)]
    _sleep_on(rig, 1, ws_index=0)
    freer.clear(tags[0], 0)
    assert "\t{.wait_cnt=1, .wait=active}," in freer.show()
    freer.clear(tags[1], 0)
    assert _woken(rig, 1)
    show = freer.show()
    assert show.count(".wait_cnt=2,") == SBQ_WAIT_QUEUES and "wake_index=1" in show


def test_legacy_resize_resets_wait_cnt(rig_factory):
    """6c0ca7ae292a: after a resize lowers wake_batch, a waiter must still be woken."""
    rig = rig_factory(64, nr_waiters=2, generation=SbqGeneration.LEGACY)  # wake_batch 8
    freer = rig.sbq(me=0)
    freer.resize(8)  # wake_batch 1
    tags = [freer.get() for _ in range(8)]
    _sleep_on(rig, 1)
    freer.clear(tags[0], 0)
    assert _woken(rig, 1)


def test_legacy_wakeup_kicks_the_woken_after_the_count_is_reset(rig_factory):
    """From the free that takes a wait state's wait_cnt to 0 to its reset, every other
    free skips that wait state (sbq_wake_ptr), and with it the only one with
    sleepers wakes nobody (30514bd2dd4e).  The task a legacy wake-up woke is set
    running at once, but its eventfd is written only after the reset: a waker whose
    write hands its host core to the woken task holds no count at 0 meanwhile.
    Looked at from an interrupt taken at the point before the reset (the injected
    spin takes them), the woken task is running and its eventfd still unwritten."""
    rig = rig_factory(8, nr_waiters=2, generation=SbqGeneration.LEGACY)  # wake_batch 1
    freer = rig.sbq(me=0)
    efd = rig.eventfds[1]
    seen: list[tuple[int, bool, int]] = []  # (wait_cnt, woken, eventfd count) there

    def at_the_point():
        if not seen:
            try:
                kicked = os.eventfd_read(efd)
            except BlockingIOError:
                kicked = 0
            seen.append((freer.a.read32(freer._wait_cnt[0]), _woken(rig, 1), kicked))

    inject.configure({"sbq.wake.before_cnt_reset": (100.0, 200)}, seed=1, with_irqs=True)
    inject.irq_hook = at_the_point
    try:
        for _ in range(50):  # until an interrupt came in the spin (the first, mostly)
            tags = [freer.get() for _ in range(8)]
            sleeper, wait = _sleep_on(rig, 1)
            assert sleeper.ws[0].w.block()  # blocked in its wait point: needs the kick
            freer.clear(tags[0], 0)
            assert _woken(rig, 1)
            kicked_after = os.eventfd_read(efd) if not seen or not seen[0][2] else 0
            sleeper.ws[0].w.unblock()
            sleeper.finish_wait(0, wait)
            for tag in tags[1:]:
                freer.clear(tag, 0)
            if seen:
                break
    finally:
        inject.configure({})
        inject.irq_hook = None
    assert seen, "no interrupt was taken at the point in 50 wake-ups"
    assert seen[0] == (0, True, 0), f"at the point: (wait_cnt, woken, kicks) = {seen[0]}"
    assert kicked_after == 1


def test_wake_all(rig_factory):
    rig = rig_factory(16, nr_waiters=4)
    q = rig.sbq(me=0)
    for me, ws in ((1, 0), (2, 5), (3, 7)):
        _sleep_on(rig, me, ws)
    q.wake_all()
    assert all(_woken(rig, s) for s in (1, 2, 3))


# -- real processes ----------------------------------------------------------------------


def _owners_hammer(rig, cpu, loops, seed):
    q = rig.sbq(cpu=cpu, me=cpu)
    a = rig.arena.atomic
    rng = random.Random(seed)
    held = []
    for _ in range(loops):
        if len(held) < 3 and rng.random() < 0.6:
            nr = q.get()
            if nr != -1:
                assert a.fetch_add(rig.owners.addr(nr), 1) == 0, f"bit {nr} owned twice"
                held.append(nr)
        elif held:
            nr = held.pop(rng.randrange(len(held)))
            assert a.fetch_sub(rig.owners.addr(nr), 1) == 1
            q.clear(nr, cpu)
    for nr in held:
        a.fetch_sub(rig.owners.addr(nr), 1)
        q.clear(nr, cpu)


@pytest.mark.slow
@pytest.mark.parametrize("round_robin", [False, True])
def test_no_bit_owned_twice_across_processes(rig_factory, round_robin):
    nproc = 4
    rig = rig_factory(12, nr_cpus=nproc, nr_waiters=nproc, round_robin=round_robin)
    run_processes(*[(_owners_hammer, (rig, cpu, 20_000, cpu)) for cpu in range(nproc)])
    assert not rig.arena.view(rig.owners).any()
    assert rig.sbq().sb.weight() == 0


#: A sleeper looks again this often whether anybody still frees tags: if nobody freed
#: one during a whole interval, the sleeper is stranded (a lost wake-up).  Progress is
#: counted, not timed, so a loaded host that slows everyone does not fail the test.
STRANDED_S = 5.0


def _a_sibling_can_run() -> bool:
    """Another child of this process's parent is runnable (psutil)."""
    try:
        siblings = psutil.Process(os.getppid()).children()
    except psutil.Error:
        return False
    for p in siblings:
        try:
            if p.pid != os.getpid() and p.status() == psutil.STATUS_RUNNING:
                return True
        except psutil.Error:
            continue
    return False


def _sleepy_worker(rig, cpu, rounds, max_hold):
    """Take 1..max_hold tags one at a time through blk-mq's tag wait loop
    (blk_mq_get_tag(), sleeping when none is free), keep them a moment, free them
    (blk_mq_put_tag()).  max_hold is small enough that some process can always
    finish its set (nproc * (max_hold - 1) < depth), so a hang is a lost wake-up,
    not a deadlock: a sleep through which no process frees a tag for STRANDED_S fails
    the process."""
    waiters = rig.waiters(cpu)
    tags = rig.tags(waiters, cpu)
    a = rig.arena.atomic
    rng = random.Random(cpu)
    wait_index = rig.wait_index.addr(cpu)
    a.set32(wait_index, cpu % SBQ_WAIT_QUEUES)
    i = 0

    frees = rig.frees.addr()

    def schedule():
        seen = a.read(frees)
        while not waiters.schedule(STRANDED_S):
            now = a.read(frees)
            # stranded: no free for a while and no other worker runnable (a loaded
            # host may keep them off the cores for longer than any timeout)
            assert now != seen or _a_sibling_can_run(), (
                f"cpu {cpu} stranded at round {i}: nobody freed a tag for {STRANDED_S} s "
                f"and every other worker is asleep\n{tags.show()}"
            )
            seen = now

    for i in range(rounds):
        held = []
        for _ in range(rng.randint(1, max_hold)):
            nr = tags.get_tag(False, False, None, wait_index, _no_queue_to_run, schedule)
            assert a.fetch_add(rig.owners.addr(nr), 1) == 0
            held.append(nr)
        if i % 5 == 0:
            time.sleep(0.0002)
        for nr in held:
            a.fetch_sub(rig.owners.addr(nr), 1)
            tags.put_tag(nr, cpu)
            a.fetch_add(frees, 1)
    a.fetch_add(rig.sleeps.addr(), tags.nr_tag_sleeps)


def _no_queue_to_run():
    """get_tag's run_queue: no hardware queue holds requests that could free tags."""


@pytest.mark.slow
@pytest.mark.parametrize("gen", GENERATIONS)
@pytest.mark.parametrize("depth", [4, 16])
def test_sleepers_are_never_stranded(rig_factory, gen, depth):
    """More sleepers than depth / 8 can satisfy, each taking tags through the block
    layer's wait loop (Tags.get_tag): every process must finish, woken by other
    processes' frees (a stranded waiter times out and fails)."""
    nproc = 6
    max_hold = (depth - 1) // nproc + 1
    rig = rig_factory(depth, nr_cpus=nproc, nr_waiters=nproc, tags=True, generation=gen)
    # A saturated host may run the processes one after the other, so that nobody
    # ever waits: run again (longer) until somebody slept.
    for rounds in (1500, 4500, 13500):
        run_processes(*[(_sleepy_worker, (rig, cpu, rounds, max_hold)) for cpu in range(nproc)])
        q = rig.sbq()
        assert q.sb.weight() == 0
        assert "ws_active=0" in q.show()
        if rig.arena.atomic.read(rig.sleeps.addr()) > 0:
            break
    assert rig.arena.atomic.read(rig.sleeps.addr()) > 0, "nobody slept: the test proves nothing"


def test_wait_ptr_moves_one_shared_wait_index_round_robin(rig_factory):
    """sbq_wait_ptr() on an hctx's atomic_t wait_index: every CPU of the hctx takes
    the next wait state in turn (the index is the hctx's, not each CPU's), wrapping
    at SBQ_WAIT_QUEUES."""
    rig = rig_factory(depth=16)
    off = rig.wait_index.addr(0)
    cpu0, cpu1 = rig.sbq(cpu=0, me=0), rig.sbq(cpu=1, me=1)
    taken = [(cpu0 if i % 2 == 0 else cpu1).wait_ptr(off) for i in range(SBQ_WAIT_QUEUES + 2)]
    assert taken == [*range(SBQ_WAIT_QUEUES), 0, 1]

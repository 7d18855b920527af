"""lock_stat (mqrt/lib/lockstat.py): the contention counters against known contention.

Two forked processes hammering one shared word (the C find-and-set, a bit spinlock)
must count lost races; one process alone must count none, and every acquisition.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np
import pytest

from mqrt.lib import lockstat
from mqrt.lib._atomic import AtomicView, cpu_relax
from mqrt.lib.lockstat import (
    ACQUISITIONS,
    CLASS_NAMES,
    CONTENTIONS,
    FIELDS,
    RETRIES,
    WAIT_MAX_NS,
    WAIT_NS,
    LockClass,
)
from mqrt.lib.shm import Arena, Layout, Region
from mqrt.lib.wait import spin_lock, spin_unlock
from tests.test_cli import mqrt

#: Operations each process does at least (and, alone, exactly).
N_OPS = 20_000
#: Operations after which a process gives up waiting for a lost race to be counted.
OP_BUDGET = 2_000_000
CHUNK = 1_000
CLS = LockClass.TAGS_BITMAP


def _arena() -> tuple[Layout, Region, Region]:
    layout = Layout()
    region = lockstat.declare(layout, 2)
    words = layout.add("words", "<u8", 8)  # word 0: the contended one; 1: start; 2: stop
    return layout, region, words


def _word(words: Region, i: int) -> int:
    return words.offset + 8 * i


def _run_pair(
    arena: Arena, region: Region, words: Region, op: Callable[[AtomicView, int], None]
) -> list[int]:
    """Fork two processes, CPUs 0 and 1, each running ``op(a, cpu)`` in chunks from a
    common start until both did N_OPS and a lost race was counted (or one hit the op
    budget); their ops done, per CPU."""
    a = arena.atomic
    start, stop = _word(words, 1), _word(words, 2)
    done_off = [_word(words, 3 + cpu) for cpu in range(2)]
    pids = []
    for cpu in range(2):
        pid = os.fork()
        if pid == 0:  # the child: only os._exit leaves it
            code = 1
            try:
                lockstat.install(a, region, cpu)
                a.fetch_add(start, 1)
                while a.read(start) < 2:  # the barrier: both hammer at once
                    cpu_relax()
                done = 0
                while not a.read(stop):
                    for _ in range(CHUNK):
                        op(a, cpu)
                    done += CHUNK
                    lockstat.publish()
                    a.set(done_off[cpu], done)
                    counters = lockstat.read(arena, region)
                    raced = counters[:, CLS, RETRIES].sum() > 0
                    both = min(a.read(o) for o in done_off) >= N_OPS
                    if (raced and both) or done >= OP_BUDGET:
                        a.set(stop, 1)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    return [a.read(o) for o in done_off]


def _alone(arena: Arena, region: Region, op: Callable[[AtomicView, int], None]) -> None:
    """One process (this one, as CPU 0) doing N_OPS of ``op``."""
    a = arena.atomic
    lockstat.install(a, region, 0)
    try:
        for _ in range(N_OPS):
            op(a, 0)
        lockstat.publish()
    finally:
        lockstat.uninstall()


def _find_op(words: Region, region: Region, at: bool) -> Callable[[AtomicView, int], None]:
    """Take a bit of a 2-bit word (both processes start at bit 0) and give it back."""
    word = _word(words, 0)

    def op(a: AtomicView, cpu: int) -> None:
        stat = lockstat.stat_off(CLS)
        if at:
            nr = a.find_and_set_zero_bit_at(word, 8, 6, 2, 0, stat)
        else:
            nr = a.find_and_set_zero_bit(word, 2, 0, True, stat)
        assert nr in (0, 1)
        a.clear_bit_unlock(word, nr)

    return op


@pytest.mark.timing
@pytest.mark.parametrize("at", [False, True], ids=["find_and_set_zero_bit", "_at"])
def test_find_and_set_counts_lost_races_of_two_processes(at: bool) -> None:
    layout, region, words = _arena()
    with Arena.create(layout) as arena:
        done = _run_pair(arena, region, words, _find_op(words, region, at))
        c = lockstat.read(arena, region)
    tot = c[:, CLS, :].sum(axis=0)
    assert tot[RETRIES] > 0, f"no lost race counted in {done} ops"
    assert 0 < tot[CONTENTIONS] <= tot[RETRIES]
    assert tot[WAIT_NS] > 0 and c[:, CLS, WAIT_MAX_NS].max() <= tot[WAIT_NS]
    # every op took a bit once: acquisitions exact, per CPU
    assert list(c[:, CLS, ACQUISITIONS]) == done
    others = np.delete(c, CLS, axis=1)
    assert not others.any(), "only the class passed counts"


@pytest.mark.parametrize("at", [False, True], ids=["find_and_set_zero_bit", "_at"])
def test_find_and_set_alone_counts_no_contention(at: bool) -> None:
    layout, region, words = _arena()
    with Arena.create(layout) as arena:
        _alone(arena, region, _find_op(words, region, at))
        c = lockstat.read(arena, region)
    assert c[0, CLS, ACQUISITIONS] == N_OPS
    assert c[0, CLS, CONTENTIONS] == c[0, CLS, RETRIES] == c[0, CLS, WAIT_NS] == 0
    assert c.sum() == N_OPS  # nothing else, and nothing on CPU 1's block


def test_find_and_set_without_stat_off_counts_nothing() -> None:
    layout, region, words = _arena()
    with Arena.create(layout) as arena:
        a = arena.atomic
        assert a.find_and_set_zero_bit(_word(words, 0), 2, 0, True) == 0
        assert a.find_and_set_zero_bit(_word(words, 0), 2, 0, True, -1) == 1
        assert a.find_and_set_zero_bit_at(_word(words, 0), 8, 6, 2, 0, -1) == -1
        with pytest.raises(IndexError):
            a.find_and_set_zero_bit(_word(words, 0), 2, 0, True, arena.atomic.nbytes - 8)
        assert not lockstat.read(arena, region).any()


def _lock_op(words: Region) -> Callable[[AtomicView, int], None]:
    """A bit spinlock around a short critical section."""
    lock, data = _word(words, 0), _word(words, 5)

    def op(a: AtomicView, cpu: int) -> None:
        spin_lock(a, lock, LockClass.CTX_LOCK)
        a.set(data, a.read(data) + 1)
        for _ in range(20):
            cpu_relax()
        spin_unlock(a, lock)

    return op


@pytest.mark.timing
def test_spin_lock_counts_contention_of_two_processes() -> None:
    layout, region, words = _arena()
    global CLS
    saved, CLS = CLS, LockClass.CTX_LOCK  # what _run_pair waits to see
    try:
        with Arena.create(layout) as arena:
            done = _run_pair(arena, region, words, _lock_op(words))
            c = lockstat.read(arena, region)
            data = arena.atomic.read(_word(words, 5))
    finally:
        CLS = saved
    cls = LockClass.CTX_LOCK
    tot = c[:, cls, :].sum(axis=0)
    assert data == sum(done)  # the lock excluded
    assert tot[CONTENTIONS] > 0 and tot[WAIT_NS] > 0
    assert tot[RETRIES] >= tot[CONTENTIONS]
    assert list(c[:, cls, ACQUISITIONS]) == done


def test_spin_lock_alone_counts_acquisitions_only() -> None:
    layout, region, words = _arena()
    with Arena.create(layout) as arena:
        _alone(arena, region, _lock_op(words))
        c = lockstat.read(arena, region)
    cls = LockClass.CTX_LOCK
    assert c[0, cls, ACQUISITIONS] == N_OPS
    assert c[0, cls, CONTENTIONS] == c[0, cls, WAIT_NS] == c[0, cls, RETRIES] == 0
    assert c.sum() == N_OPS


def test_summary_and_proc_format() -> None:
    c = np.zeros((2, len(LockClass), len(FIELDS)), dtype=np.uint64)
    c[0, LockClass.DD_LOCK] = [3, 100, 9_000, 5_000, 7, 1]
    c[1, LockClass.DD_LOCK] = [1, 50, 1_000, 1_000, 1, 0]
    c[1, LockClass.HCTX_LOCK, ACQUISITIONS] = 10
    s = lockstat.summary(c)
    assert set(s) == set(CLASS_NAMES.values())
    dd = s["dd.lock"]
    assert dd == {
        "contentions": 4, "acquisitions": 150, "wait_ns": 10_000, "wait_max_ns": 5_000,
        "wait_avg_ns": 2_500, "retries": 8, "yields": 1, "contentions_per_cpu": [3, 1],
    }  # fmt: skip
    text = lockstat.format_proc(s).splitlines()
    assert text[0] == "lock_stat version 0.4"
    assert text[1] == text[3] == "-" * (40 + 1 + 12 * 15)
    assert text[2].split()[:3] == ["class", "name", "con-bounces"]
    assert text[2].endswith("holdtime-avg")
    assert text[4] == ""
    # most contended first; every class with acquisitions, none without
    assert [line.split(":")[0].strip() for line in text[5:]] == ["dd.lock", "hctx.lock"]
    cols = text[5].split(":")[1].split()
    assert cols == ["0", "4", "0.00", "5.00", "10.00", "2.50", "0", "150",
                    "0.00", "0.00", "0.00", "0.00"]  # fmt: skip
    assert len(text[5]) == len(text[2])  # the columns line up with the header


def test_class_names_are_complete_and_unique() -> None:
    assert set(CLASS_NAMES) == set(LockClass)
    assert len(set(CLASS_NAMES.values())) == len(LockClass)


@pytest.mark.timing
def test_bench_json_has_lock_stat_consistent_with_the_run() -> None:
    out = mqrt(
        "bench", "--runtime", "0.5", "--cpus", "2", "--irqmode", "none",
        "--output-format", "json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    (point,) = report["mqrt"]["points"]
    ls = point["lock_stat"]
    assert set(ls) == set(CLASS_NAMES.values())
    for name, s in ls.items():
        counts = [v for k, v in s.items() if k != "contentions_per_cpu"]
        assert all(isinstance(v, int) and v >= 0 for v in counts), name
        assert len(s["contentions_per_cpu"]) == 2
        assert sum(s["contentions_per_cpu"]) == s["contentions"], name
        assert s["wait_max_ns"] <= s["wait_ns"] and s["contentions"] <= s["retries"]
        assert s["contentions"] <= s["acquisitions"], name  # acquisitions always counted
    ios = point["run"]["summary"]["ios"]
    # every I/O took a driver tag: one acquisition of a tag word each, at least
    assert ios > 0 and ls["tags.bitmap"]["acquisitions"] >= ios
    assert ls["unclassified"]["acquisitions"] == 0  # every lock site names its class

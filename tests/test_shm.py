"""mqrt.lib.shm: layout declaration, ownership, and cleanup on every exit path."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from mqrt.lib import shm
from mqrt.lib.shm import CACHELINE, Arena, ArenaHandle, Layout, cacheline_struct
from tests.helpers import ctx, wait_until


def test_cacheline_struct_puts_each_group_on_its_own_line():
    dt = cacheline_struct([("a", "<u8"), ("b", "<u4"), ("c", "<u8")], [("d", "<i4")])
    assert dt.fields["a"][1] == 0
    assert dt.fields["b"][1] == 8
    assert dt.fields["c"][1] == 16  # natural alignment after the u4
    assert dt.fields["d"][1] == CACHELINE
    assert dt.itemsize == 2 * CACHELINE


def test_layout_regions_are_aligned_and_disjoint():
    layout = Layout()
    a = layout.add("a", cacheline_struct([("x", "<u8")]), count=3)
    b = layout.add("b", np.dtype("<u1"), count=5)
    c = layout.add("c", cacheline_struct([("y", "<u4")]))
    spans = sorted((r.offset, r.offset + r.nbytes) for r in (a, b, c))
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))
    assert all(r.offset % CACHELINE == 0 for r in (a, b, c))
    assert layout.size % CACHELINE == 0 and layout.size >= c.offset + c.nbytes
    assert a.addr(2, "x") == a.offset + 2 * CACHELINE
    assert a.offsets(1).x == a.offset + CACHELINE
    with pytest.raises(IndexError):
        a.addr(3)
    with pytest.raises(ValueError, match="already has a region"):
        layout.add("a", "<u8")
    assert "total" in layout.describe()


def test_owner_creates_0600_named_by_pid_and_unlinks():
    layout = Layout()
    layout.add("x", "<u8", 16)
    with Arena.create(layout) as arena:
        name = arena.name
        assert name.startswith(f"mqrt-{os.getpid()}-")
        assert shm.segment_owner(name) == os.getpid()
        assert os.stat(f"/dev/shm/{name}").st_mode & 0o777 == 0o600
        assert name in shm.list_segments()
    assert not os.path.exists(f"/dev/shm/{name}")
    arena.close()  # idempotent


def test_owner_unlinks_when_the_block_raises():
    layout = Layout()
    layout.add("x", "<u8")
    with pytest.raises(RuntimeError), Arena.create(layout) as arena:
        name = arena.name
        raise RuntimeError("boom")
    assert not os.path.exists(f"/dev/shm/{name}")


def test_attach_checks_the_handle():
    layout = Layout()
    layout.add("x", "<u8", 8)
    with Arena.create(layout) as arena:
        other = Layout()
        other.add("x", "<u8", 9)
        with pytest.raises(ValueError, match="layout needs"):
            Arena.attach(arena.handle, other)
        bad = ArenaHandle(arena.name, arena.handle.size, layout_version=999)
        with pytest.raises(ValueError, match="layout version 999"):
            Arena.attach(bad, layout)


def _child_writes(handle, layout):
    with Arena.attach(handle, layout) as arena:
        assert not arena.is_owner
        arena.atomic.set(layout["x"].addr(0), 42)


def test_child_attaches_writes_and_never_unlinks():
    layout = Layout()
    layout.add("x", "<u8")
    with Arena.create(layout) as arena:
        p = ctx.Process(target=_child_writes, args=(arena.handle, layout))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        p.close()
        assert arena.atomic.read(layout["x"].addr(0)) == 42
        assert os.path.exists(f"/dev/shm/{arena.name}")


def test_forked_copy_of_owner_does_not_unlink():
    layout = Layout()
    layout.add("x", "<u8")
    with Arena.create(layout) as arena:
        p = ctx.Process(target=arena.close)  # the child holds a copy of the owner object
        p.start()
        p.join(30)
        assert p.exitcode == 0
        p.close()
        assert os.path.exists(f"/dev/shm/{arena.name}")


ATTACH_AND_EXIT = """
import sys
from mqrt.lib.shm import Arena, ArenaHandle, Layout
layout = Layout(); layout.add("x", "<u8")
with Arena.attach(ArenaHandle(sys.argv[1], int(sys.argv[2])), layout) as arena:
    arena.atomic.fetch_add(0, 1)
"""


def test_unrelated_attacher_does_not_destroy_segment():
    """python/cpython#82300: an attaching process's resource tracker must neither
    unlink the owner's segment nor warn about it."""
    layout = Layout()
    layout.add("x", "<u8")
    with Arena.create(layout) as arena:
        out = subprocess.run(
            [sys.executable, "-c", ATTACH_AND_EXIT, arena.name, str(arena.handle.size)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "leaked" not in out.stderr and "resource_tracker" not in out.stderr
        assert os.path.exists(f"/dev/shm/{arena.name}")
        assert arena.atomic.read(0) == 1


OWNER_SCRIPT = """
import multiprocessing as mp, sys, time
from mqrt.lib.shm import Arena, Layout, exit_on_sigterm

def child(handle, layout):
    with Arena.attach(handle, layout):
        time.sleep(3600)

layout = Layout(); layout.add("x", "<u8", 64)
with exit_on_sigterm(), Arena.create(layout, guard=True) as arena:
    kids = [mp.get_context("fork").Process(target=child, args=(arena.handle, layout))
            for _ in range(2)]
    try:
        for k in kids:
            k.start()
        print(arena.name, *[k.pid for k in kids], flush=True)
        time.sleep(3600)
    finally:
        for k in kids:
            k.kill()
            k.join()
"""


def _start_owner():
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    name, *kids = proc.stdout.readline().split()
    assert os.path.exists(f"/dev/shm/{name}")
    return proc, name, [int(k) for k in kids]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_owner_interrupted_unlinks(sig):
    proc, name, _ = _start_owner()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert not os.path.exists(f"/dev/shm/{name}"), err


def test_sigkilled_child_leaves_nothing_once_owner_ends():
    proc, name, kids = _start_owner()
    os.kill(kids[0], signal.SIGKILL)
    assert wait_until(lambda: not _alive(kids[0]), timeout=10)
    assert os.path.exists(f"/dev/shm/{name}")  # the owner still has it
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert not os.path.exists(f"/dev/shm/{name}")


def test_sigkilled_owner_is_cleaned_by_the_guardian():
    proc, name, kids = _start_owner()
    for k in kids:
        os.kill(k, signal.SIGKILL)
    proc.kill()
    proc.communicate(timeout=30)
    assert wait_until(lambda: not os.path.exists(f"/dev/shm/{name}"), timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_an_mqrt_process_has_one_thread():
    """A second thread (numpy's BLAS pool) could take a process-directed SIGTERM, and
    the main thread would then sleep on through it (the owner would never unlink)."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import mqrt.lib.shm, psutil; print(psutil.Process().num_threads())",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")},
    ).stdout
    assert out.strip() == "1"


def test_a_readonly_mapping_reads_live_words_and_can_write_none():
    """Arena.open_readonly: PROT_READ, loads see the owner's later stores, every write
    is refused before it is tried (a store would fault), the mapping never unlinks
    and still reads the last state once the owner has unlinked the segment."""
    layout = Layout()
    r = layout.add("words", cacheline_struct([("a", "<u8"), ("b", "<i4")]), 2)
    with Arena.create(layout) as owner:
        ro = Arena.open_readonly(owner.name)
        assert ro.readonly and ro.atomic.readonly and not owner.readonly
        off = r.addr(1, "a")
        owner.atomic.set(off, 41)
        assert ro.atomic.read(off) == 41
        owner.atomic.fetch_add(off, 1)
        assert ro.atomic.load_acquire(off) == 42
        assert not ro.view(r).flags.writeable
        for op, args in (
            ("set", (off, 1)), ("fetch_add", (off, 1)), ("cmpxchg", (off, 42, 0)),
            ("xchg", (off, 0)), ("set_bit", (off, 0)), ("test_and_set_bit_lock", (off, 0)),
            ("store_release32", (r.addr(1, "b"), 1)), ("find_and_set_zero_bit", (off, 8, 0, True)),
        ):  # fmt: skip
            with pytest.raises(PermissionError):
                getattr(ro.atomic, op)(*args)
        assert owner.atomic.read(off) == 42  # untouched
        name = owner.name
    assert not os.path.exists(f"/dev/shm/{name}")  # the owner unlinked it
    assert ro.atomic.read(off) == 42  # the mapping outlives the name
    ro.close()
    with pytest.raises(FileNotFoundError):
        Arena.open_readonly(name)

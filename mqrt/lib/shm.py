"""The shared-memory arena: one owner, one declared layout, attach by name.

No kernel counterpart: this is what the kernel gets for free (one address space).

Layout
    Every structure that lives in shared memory is declared once, as a numpy
    structured dtype built by :func:`cacheline_struct`, and placed in a
    :class:`Layout` as a named :class:`Region`.  Each region starts on its own
    64-byte cache line; inside a struct, each *group* of fields starts a new line, so
    words written by different CPUs never share one (the kernel's
    ``____cacheline_aligned_in_smp``).  Offsets are computed here and nowhere else:
    hot paths read them from :meth:`Region.offsets`; debug views use
    :meth:`Arena.view` (a numpy structured array over the same bytes).

Ownership
    One process, the owner, creates the segment (:meth:`Arena.create`), initialises
    it, and is the only one that unlinks it.  Children attach by
    :class:`ArenaHandle` (name, size, layout version) and only ever ``close()``.
    Names are ``mqrt-<owner pid>-<owner start time>-<random>`` (the start time in
    clock ticks since boot, as ``/proc/<pid>/stat`` has it) so a leak names its
    culprit and a reused pid is never taken for a live owner; the segment is created
    0600.  The owner unlinks on every exit path it can see: the ``with`` block (normal
    end, exception, Ctrl-C), SIGTERM (turned into ``SystemExit`` by
    :func:`exit_on_sigterm`), interpreter exit (``atexit``).  For the paths it cannot
    see (SIGKILL, a signal to the whole process group), a guarded arena
    (``Arena.create(layout, guard=True)``) has a **guardian**: a forked child in a
    session of its own, which group signals do not reach, that waits for the owner's
    death (a pidfd) and then unlinks the segment; the owner, when it unlinks, tells it
    to exit and reaps it.  :func:`reclaim_stale` removes what is left anyway (a
    guardian killed too), and the first guarded arena of a process calls it.

Untracked segments
    No segment is registered with Python's resource tracker, neither the owner's nor
    an attachment.  The tracker is a process in the run's group, so it dies with the
    run and was never a safety net against group signals; and a tracker killed during
    a run is restarted by the next unregister, which then fails (a ``KeyError``
    traceback from the new tracker).  The guardian owns that cleanup instead, and
    unlinks go straight to ``/dev/shm``.

Python 3.11's resource tracker (python/cpython#82300)
    ``SharedMemory(name)`` registers the segment with the *attaching* process's
    resource tracker, which then unlinks it (with a warning) when that process ends,
    pulling the memory from under the owner; ``track=False`` only arrived in 3.13.
    :func:`_untracked` creates and attaches without registering: ``track=False``
    where it exists, otherwise by suppressing the registration for the duration of
    the call.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import select
import signal
import struct
import sys
import weakref
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass, field
from multiprocessing import resource_tracker, shared_memory
from types import MappingProxyType, SimpleNamespace
from typing import Any

import numpy as np

from mqrt.lib._atomic import AtomicView
from mqrt.lib.idr import Ida

#: Size of a cache line on every machine we target (x86-64, arm64).
CACHELINE = 64
#: Prefix of every segment a run creates, followed by ``<owner pid>-<random>``.
SEGMENT_PREFIX = "mqrt-"
#: Bumped whenever the layout of any shared structure changes shape.
LAYOUT_VERSION = 8
#: Where Linux keeps POSIX shared memory.
SHM_DIR = "/dev/shm"


def _align(n: int, to: int = CACHELINE) -> int:
    return (n + to - 1) // to * to


def cacheline_struct(*groups: Sequence[tuple[str, str | np.dtype]]) -> np.dtype:
    """Build a little-endian structured dtype in which each group of fields starts a
    new cache line.

    Each group is a sequence of ``(name, numpy format)`` pairs laid out in order with
    natural alignment; the struct's size is rounded up to a whole number of lines.
    Put fields written by different parties in different groups.
    """
    names: list[str] = []
    formats: list[str | np.dtype] = []
    offsets: list[int] = []
    off = 0
    for group in groups:
        off = _align(off)
        for name, fmt in group:
            dt = np.dtype(fmt)
            off = _align(off, dt.alignment)
            names.append(name)
            formats.append(fmt)
            offsets.append(off)
            off += dt.itemsize
    return np.dtype(
        {"names": names, "formats": formats, "offsets": offsets, "itemsize": _align(off)}
    )


_STRUCT_CODES = {("u", 1): "B", ("u", 2): "H", ("u", 4): "I", ("u", 8): "Q",
                 ("i", 1): "b", ("i", 2): "h", ("i", 4): "i", ("i", 8): "q",
                 ("f", 4): "f", ("f", 8): "d"}  # fmt: skip


def dtype_fields(
    dtype: np.dtype,
) -> MappingProxyType[str, tuple[np.dtype, int] | tuple[np.dtype, int, Any]]:
    """The fields of a structured ``dtype``, ``name -> (dtype, offset[, title])`` as
    numpy's ``dtype.fields`` has them; a TypeError for a dtype that has none."""
    fields = dtype.fields
    if fields is None:
        raise TypeError(f"{dtype} is not a structured dtype")
    return fields


def field_offset(dtype: np.dtype, name: str) -> int:
    """Byte offset of field ``name`` in ``dtype`` (a KeyError names a missing field)."""
    return int(dtype_fields(dtype)[name][1])


def field_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """The dtype of field ``name`` in ``dtype`` (a KeyError names a missing field)."""
    return dtype_fields(dtype)[name][0]


def struct_of(dtype: np.dtype, first: str, last: str, skip: tuple[str, ...] = ()) -> struct.Struct:
    """A little-endian :class:`struct.Struct` for the fields ``first`` .. ``last`` of
    ``dtype``, in offset order, starting at ``first``'s offset: gaps, fields named
    ``pad*`` and those in ``skip`` become pad bytes.  Hot paths pack and unpack
    several fields with one call this way while the layout stays declared once, in
    the dtype."""
    fields = sorted(
        ((off, name, dt) for name, (dt, off, *_) in dtype_fields(dtype).items()), key=lambda f: f[0]
    )
    names = [name for _, name, _ in fields]
    lo, hi = names.index(first), names.index(last)
    if lo > hi:
        raise ValueError(f"struct_of: {first!r} comes after {last!r}")
    fmt, pos = "<", fields[lo][0]
    for off, name, dt in fields[lo : hi + 1]:
        fmt += "x" * (off - pos)
        if name.startswith("pad") or name in skip:
            fmt += f"{dt.itemsize}x"
        elif dt.kind == "V":
            fmt += f"{dt.itemsize}s"
        else:
            fmt += _STRUCT_CODES[(dt.kind, dt.itemsize)]
        pos = off + dt.itemsize
    return struct.Struct(fmt)


@dataclass(frozen=True)
class Region:
    """A named, cache-line-aligned array of ``count`` structs in the arena."""

    name: str
    offset: int  #: byte offset of element 0 in the segment
    dtype: np.dtype
    count: int = 1

    @property
    def stride(self) -> int:
        """Bytes from one element to the next."""
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.stride * self.count

    def _fields(self) -> tuple[int, dict[str, int]]:
        """(stride, field name -> offset in an element), worked out once per region
        (not a dataclass field: equality, hash and repr ignore it).  The runtime's
        owner has asked for most regions' before it forks, so the CPUs inherit
        them instead of asking numpy again, hundreds of times each."""
        try:
            return self.__dict__["_field_offsets"]
        except KeyError:
            pass
        names = self.dtype.names
        fields = (
            {name: int(spec[1]) for name, spec in dtype_fields(self.dtype).items()}
            if names is not None
            else {}
        )
        got = (int(self.dtype.itemsize), fields)
        object.__setattr__(self, "_field_offsets", got)
        return got

    def addr(self, index: int = 0, fieldname: str | None = None) -> int:
        """Absolute offset of element ``index`` (or of one of its fields)."""
        if not 0 <= index < self.count:
            raise IndexError(f"{self.name}[{index}] out of range 0..{self.count - 1}")
        stride, fields = self._fields()
        base = self.offset + index * stride
        if fieldname is None:
            return base
        if not fields:
            field_offset(self.dtype, fieldname)  # its TypeError
        return base + fields[fieldname]

    def offsets(self, index: int = 0) -> SimpleNamespace:
        """Absolute offsets of every field of element ``index``, as attributes."""
        base = self.addr(index)
        if not self._fields()[1]:
            dtype_fields(self.dtype)  # its TypeError
        return SimpleNamespace(**{name: base + off for name, off in self._fields()[1].items()})


@dataclass
class Layout:
    """The arena's map: regions in declaration order, each on its own cache line,
    and the id spaces of the objects declared on it (:meth:`ida`)."""

    regions: dict[str, Region] = field(default_factory=dict)
    size: int = 0
    ids: dict[str, Ida] = field(default_factory=dict, repr=False)

    def ida(self, space: str) -> Ida:
        """The id space ``space`` of this arena (created empty on first use): ids
        dense from 0 for objects that per-process tables index (the block layer's
        queue ids)."""
        return self.ids.setdefault(space, Ida())

    def add(self, name: str, dtype: np.dtype | str, count: int = 1) -> Region:
        """Append a region of ``count`` elements of ``dtype`` and return it."""
        if name in self.regions:
            raise ValueError(f"layout already has a region named {name!r}")
        if count < 1:
            raise ValueError(f"region {name!r}: count must be >= 1, got {count}")
        region = Region(name, _align(self.size), np.dtype(dtype), count)
        self.regions[name] = region
        self.size = _align(region.offset + region.nbytes)
        return region

    def __getitem__(self, name: str) -> Region:
        return self.regions[name]

    def describe(self) -> str:
        """The layout as a table: offset, size, count and name of every region."""
        lines = [f"{'offset':>10} {'bytes':>10} {'count':>6}  region"]
        for r in self.regions.values():
            lines.append(f"{r.offset:#10x} {r.nbytes:>10} {r.count:>6}  {r.name}")
        lines.append(f"{'':>10} {self.size:>10}  total")
        return "\n".join(lines)


@dataclass(frozen=True)
class ArenaHandle:
    """What a child needs to attach: never the data, only where it is."""

    name: str
    size: int
    layout_version: int = LAYOUT_VERSION


def _untracked(name: str, create: bool = False, size: int = 0) -> shared_memory.SharedMemory:
    """Create or attach to a segment without registering it with this process's
    resource tracker (see the module docstring, python/cpython#82300)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, create=create, size=size, track=False)
    # Python < 3.13: no track= parameter
    original = resource_tracker.register

    def skip_shared_memory(name: Sized, rtype: str) -> None:  # as typeshed has register()
        if rtype != "shared_memory":
            original(name, rtype)

    resource_tracker.register = skip_shared_memory
    try:
        return shared_memory.SharedMemory(name=name, create=create, size=size)
    finally:
        resource_tracker.register = original


def _unlink(name: str) -> None:
    """Remove segment ``name`` from /dev/shm (gone already is fine).  Not
    ``SharedMemory.unlink()``: that also unregisters from the resource tracker, which
    never saw our segments."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHM_DIR, name))


def proc_start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat``
    field 22), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Guardian:
    """The owner's end of a segment's guardian (see the module docstring): the
    guardian's pid and the pipe on which the owner says "unlinked, exit"."""

    def __init__(self, name: str):
        owner = os.getpid()
        r, w = os.pipe()
        # Stop signals wait until the guardian is known: one delivered in the fork's
        # at-fork hooks (logging's among them) would be lost as "Exception ignored".
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover (the guardian: it never returns)
                _guard(name, owner, r)
            os.close(r)
            self.pid, self._w = pid, w
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def release(self) -> None:
        """Tell the guardian the segment is unlinked, and reap it.  Idempotent."""
        if self._w < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self._w, b"x")
        os.close(self._w)
        self._w = -1
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)  # a stopped guardian would never read it
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _guard(name: str, owner: int, r: int) -> None:
    """The guardian's life, in the forked child: leave the owner's session, keep no
    descriptor but the pipe, wait for the owner's death (a pidfd; without one, a
    change of parent, polled) or for its word, unlink ``name`` if the owner died,
    exit.  Only os calls: nothing that could wait for a lock another thread held at
    the fork, and never back into the owner's code (``os._exit`` on every path)."""
    try:
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked across the fork
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, r)
        os.closerange(r + 1, os.sysconf("SC_OPEN_MAX"))
        poll = select.poll()
        poll.register(r, select.POLLIN)
        pidfd = -1
        with contextlib.suppress(AttributeError, OSError):
            pidfd = os.pidfd_open(owner)
            poll.register(pidfd, select.POLLIN)
        owner_died = True
        while os.getppid() == owner:
            events = dict(poll.poll(-1 if pidfd >= 0 else 500))
            if pidfd in events:
                break
            if r in events:
                owner_died = not os.read(r, 1)  # a word: done; EOF: every writer died
                break
        if owner_died:
            _unlink(name)
    finally:
        os._exit(0)


class Arena:
    """One shared-memory segment holding every shared structure of a run.

    Use :meth:`create` in the owner and :meth:`attach` in children, both as context
    managers.  ``atomic`` is the :class:`~mqrt.lib._atomic.AtomicView` through which all
    shared words are read and written.
    """

    def __init__(
        self,
        shm: shared_memory.SharedMemory | None,
        layout: Layout,
        owner: bool,
        guardian: _Guardian | None = None,
        *,
        readonly: tuple[str, mmap.mmap] | None = None,
    ):
        self._shm = shm
        self._mmap: mmap.mmap | None = None
        self.layout = layout
        if readonly is not None:  # open_readonly(): a PROT_READ mapping, loads only
            self._name, self._mmap = readonly
            self._mem: memoryview | None = memoryview(self._mmap)
            self.atomic = AtomicView(self._mem, readonly=True)
        else:
            assert shm is not None and shm.buf is not None, "a closed segment"
            self._name, self._mem = shm.name, shm.buf
            self.atomic = AtomicView(shm.buf)
        #: pid of the creating process, or None in an attached child.  Compared with
        #: os.getpid() before unlinking, so a forked copy of the owner never unlinks.
        self._owner_pid = os.getpid() if owner else None
        self._closed = False
        self._guardian = guardian
        self._finalizer: weakref.finalize[[str, int, _Guardian | None], Arena] | None = None
        if owner:
            self._finalizer = weakref.finalize(
                self, _unlink_at_exit, self._name, os.getpid(), guardian
            )

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    def create(cls, layout: Layout, guard: bool = False) -> Arena:
        """Create a zero-filled segment big enough for ``layout`` (mode 0600).

        ``guard``: start the segment's guardian, which unlinks it if this process is
        killed (the runtime's runs); the first guarded arena of a process also
        reclaims the segments of owners that are gone (:func:`reclaim_stale`)."""
        if layout.size <= 0:
            raise ValueError("cannot create an arena for an empty layout")
        global _reclaimed
        if guard and not _reclaimed:
            _reclaimed = True
            gone = reclaim_stale()
            if gone:
                print(
                    f"mqrt: reclaimed {len(gone)} shared-memory segment(s) whose owner is "
                    f"gone: {', '.join(gone)}",
                    file=sys.stderr,
                )
        pid = os.getpid()
        for _ in range(8):
            name = f"{SEGMENT_PREFIX}{pid}-{proc_start_time(pid)}-{secrets.token_hex(4)}"
            try:
                shm = _untracked(name, create=True, size=layout.size)
            except FileExistsError:
                continue
            try:
                guardian = _Guardian(name) if guard else None
            except BaseException:
                shm.close()
                _unlink(name)
                raise
            return cls(shm, layout, owner=True, guardian=guardian)
        raise FileExistsError("could not find a free segment name")

    @classmethod
    def attach(cls, handle: ArenaHandle, layout: Layout) -> Arena:
        """Attach to the owner's segment; the caller only ever closes it."""
        if handle.layout_version != LAYOUT_VERSION:
            raise ValueError(
                f"arena {handle.name} has layout version {handle.layout_version}, "
                f"this mqrt speaks {LAYOUT_VERSION}"
            )
        if layout.size != handle.size:
            raise ValueError(
                f"arena {handle.name} is {handle.size} bytes but the layout needs {layout.size}"
            )
        shm = _untracked(handle.name)
        if shm.size < handle.size:
            shm.close()
            raise ValueError(f"arena {handle.name} is smaller than its handle says")
        return cls(shm, layout, owner=False)

    @classmethod
    def open_readonly(cls, name: str, layout: Layout | None = None) -> Arena:
        """Map run segment ``name`` read-only (``PROT_READ``): an inspector's view of
        a live run, which can neither write to it (the mapping would fault, and
        :attr:`atomic` refuses every write first) nor unlink it.  The segment is
        0600: only its user can open it (PermissionError otherwise).  Once the run
        ends and unlinks the segment, the mapping still reads its last state."""
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise ValueError(f"segment {name} is empty")
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        return cls(None, layout or Layout(), owner=False, readonly=(name, mm))

    @property
    def handle(self) -> ArenaHandle:
        return ArenaHandle(self.name, self.layout.size)

    @property
    def name(self) -> str:
        return self._name

    @property
    def readonly(self) -> bool:
        return self._mmap is not None

    @property
    def is_owner(self) -> bool:
        return self._owner_pid == os.getpid()

    def close(self) -> None:
        """Drop this process's mapping; the owner also unlinks the segment.

        Idempotent.  If numpy views from :meth:`view` are still alive the mapping
        stays until they are collected, but the name is unlinked regardless.
        """
        if self._closed:
            return
        self._closed = True
        self.atomic.release()
        if self._mmap is not None:
            assert self._mem is not None
            with contextlib.suppress(BufferError):  # numpy views still alive: kept
                self._mem.release()
                self._mmap.close()
            self._mem = None
            return
        with contextlib.suppress(BufferError):
            assert self._shm is not None
            self._shm.close()
        if self.is_owner:
            if self._finalizer is not None:
                self._finalizer.detach()
            _unlink(self.name)
            if self._guardian is not None:
                self._guardian.release()

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- access --------------------------------------------------------------------

    @property
    def buf(self) -> memoryview:
        """The raw bytes (for bulk copies such as ring entries); a ValueError once the
        arena is closed."""
        buf = self._mem if self._mmap is not None else self._shm.buf if self._shm else None
        if buf is None or self._closed:
            raise ValueError(f"arena {self.name} is closed")
        return buf

    def view(self, region: Region | str) -> np.ndarray:
        """A numpy structured array over ``region``, for reading and debugging.

        Not for the hot path or for read-modify-write: use :attr:`atomic`.
        """
        r = self.layout[region] if isinstance(region, str) else region
        return np.ndarray((r.count,), dtype=r.dtype, buffer=self.buf, offset=r.offset)


def _unlink_at_exit(name: str, owner_pid: int, guardian: _Guardian | None) -> None:
    """Last-chance unlink when an owner's arena is collected or the interpreter exits
    without closing it; never in a forked copy of the owner."""
    if os.getpid() != owner_pid:
        return
    _unlink(name)
    if guardian is not None:
        guardian.release()


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` inside the block, so ``finally`` clauses
    and ``with`` blocks (and so arena unlinks) run when the owner is terminated."""
    previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _name_fields(name: str) -> tuple[int, int | None] | None:
    """(owner pid, owner start time or None) from a segment name, or None if the name
    is not ours.  Names without a start time (``mqrt-<pid>-<random>``) come from older
    versions."""
    if not name.startswith(SEGMENT_PREFIX):
        return None
    parts = name[len(SEGMENT_PREFIX) :].split("-")
    if not parts[0].isdigit():
        return None
    if len(parts) == 3 and parts[1].isdigit():
        return int(parts[0]), int(parts[1])
    return int(parts[0]), None


def segment_owner(name: str) -> int | None:
    """The owner pid encoded in a segment name, or None if it is not ours."""
    fields = _name_fields(name)
    return fields[0] if fields else None


def owner_alive(name: str) -> bool:
    """Whether the process that created segment ``name`` still runs: its pid exists
    and (when the name records it) started when the owner did, so a reused pid is not
    taken for the owner."""
    fields = _name_fields(name)
    if fields is None:
        return False
    pid, start = fields
    now = proc_start_time(pid)
    return now is not None and (start is None or now == start)


def list_segments() -> list[str]:
    """Names of every mqrt segment in /dev/shm."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if segment_owner(n) is not None)
    except FileNotFoundError:
        return []


def stale_segments() -> list[str]:
    """Segments whose owner process no longer exists: leaks."""
    return [n for n in list_segments() if not owner_alive(n)]


def reclaim_stale() -> list[str]:
    """Unlink every segment whose owner is gone; the names unlinked."""
    gone = []
    for name in stale_segments():
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(SHM_DIR, name))
            gone.append(name)
    return gone


_reclaimed = False  # whether this process has run reclaim_stale() (Arena.create)

"""What a run's segment says about itself, for a process that maps it read-only
(``mqrt inspect``, ``mqrt top``): the *superblock*, the first region of every run's
layout (offset 0), and the *manifest*, the run's declarations (the layout and the
specs of its queues, tag sets, waiters, per-CPU counters) in the last region.

::

    offset 0   superblock: magic, version, phase, manifest offset and length,
               owner pid, CPUs, t0 and the deadline (monotonic ns)
    ...        every region the run declares, in order
    end        manifest: the declarations, pickled

Only the owner writes either, and only plain data an inspector needs to find its
way: the manifest once, before any CPU is forked (nothing in it changes after; what
changes during a run, such as the hctx map, is read from the arena itself); then
``magic`` with a release store, so an inspector that reads ``magic`` (acquire) reads
a whole manifest.  ``phase`` and the times are relaxed stores, read relaxed.

The manifest is a pickle of the owner's own spec objects (frozen dataclasses of
regions and numbers), so an inspector uses the block layer's own readers
(``Tags.show()``, ``Sbitmap.bitmap_show()``, ``Request.show()``) on the read-only
mapping.  What is not a declaration is left out as it is pickled: the driver's ops
and driver data, the request pools' private mappings.  It is unpickled only from a
segment of the inspector's own user (the segment is 0600) and only into mqrt's and
numpy's own classes (:class:`_Unpickler` refuses every other global).
"""

from __future__ import annotations

import enum
import io
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

from mqrt.block.blk_mq_structs import RequestQueue
from mqrt.lib.cpuhp import CpuhpSpec
from mqrt.lib.rcu import RcuSpec
from mqrt.lib.shm import LAYOUT_VERSION, Arena, Layout, Region, cacheline_struct
from mqrt.lib.trace import TraceSpec
from mqrt.lib.wait import WaitersSpec

#: "mqrtrun1", little-endian: a run's segment, its superblock written
MAGIC = int.from_bytes(b"mqrtrun1", "little")

SUPERBLOCK = cacheline_struct(
    [
        ("magic", "<u8"),  # MAGIC once the manifest is whole (release)
        ("version", "<u4"),  # LAYOUT_VERSION of the owner
        ("phase", "<u4"),  # RunPhase
        ("manifest_off", "<u8"),
        ("manifest_len", "<u8"),
        ("owner_pid", "<i8"),
        ("nr_cpus", "<u4"),
        ("_pad", "<u4"),
        ("t0_ns", "<i8"),  # the CPUs' common start (CLOCK_MONOTONIC), 0 before it
        ("end_ns", "<i8"),  # when they stop submitting
    ]
)


class RunPhase(enum.IntEnum):
    """Where a run is, as its owner publishes it."""

    SETUP = 0  #: the arena is being built, the CPUs are starting
    RUNNING = 1  #: the CPUs run their jobs
    DRAINING = 2  #: past the deadline (or stopped): the CPUs drain their I/Os
    EXIT = 3  #: the CPUs were told to exit; the owner collects their results


@dataclass
class Manifest:
    """A run's declarations, as an inspector needs them."""

    mqrt_version: str
    cmdline: list[str]
    nr_cpus: int
    driver: str  #: the driver ops' class name (NullbOps, NvmeOps)
    layout: Layout
    queues: list[RequestQueue]
    waiters: WaitersSpec
    cpu_stats: Region
    rcu: RcuSpec
    cpuhp: CpuhpSpec | None = None
    trace: TraceSpec | None = None
    #: more declarations, by name, for the parts of a run that have their own
    extra: dict[str, Any] = field(default_factory=dict)


def declare(layout: Layout) -> Region:
    """The superblock: the first region of a run's layout (offset 0)."""
    if layout.regions:
        raise ValueError("the superblock must be the layout's first region")
    return layout.add("superblock", SUPERBLOCK)


# -- pickling the declarations ------------------------------------------------------------------

#: Modules whose classes a manifest may name (prefixes); every other global is refused.
_ALLOWED_MODULES = ("mqrt.lib.", "mqrt.block.", "numpy", "collections", "enum")
#: the CPUs' modules whose declarations a manifest carries
_ALLOWED_WORKERS = ("mqrt.workers.live",)
_ALLOWED_BUILTINS = frozenset({"set", "frozenset", "dict", "list", "tuple", "int", "bytearray"})


def _is_declaration(obj: object) -> bool:
    """Whether ``obj`` belongs in a manifest: not the driver's (its ops, its queues'
    driver data), not a process's private mapping or handle."""
    from mqrt.block.blk_mq_structs import RqPool
    from mqrt.block.blk_mq_types import BlkMqOps
    from mqrt.lib._atomic import AtomicView

    if isinstance(obj, (BlkMqOps, RqPool, AtomicView, memoryview)):
        return False
    module = type(obj).__module__
    if module in _ALLOWED_WORKERS:
        return True
    return not module.startswith(("mqrt.device", "device.", "mqrt.workers", "workers."))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> str | None:
        # what is not a declaration is written as a reference that loads as None
        return None if _is_declaration(obj) else "-"


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> None:
        return None

    def find_class(self, module: str, name: str) -> Any:
        if (
            (module == "builtins" and name in _ALLOWED_BUILTINS)
            or module.startswith(_ALLOWED_MODULES)
            or module in ("copyreg", "mqrt.runtime.manifest", *_ALLOWED_WORKERS)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a manifest may not name {module}.{name}")


def dumps(manifest: Manifest) -> bytes:
    f = io.BytesIO()
    _Pickler(f, protocol=pickle.HIGHEST_PROTOCOL).dump(manifest)
    return f.getvalue()


def seal(layout: Layout, manifest: Manifest) -> tuple[Region, bytes]:
    """The manifest, pickled, and the region it goes in: the layout's last (declared
    after every other, which it describes)."""
    blob = dumps(manifest)
    return layout.add("manifest", "u1", len(blob)), blob


def publish(arena: Arena, superblock: Region, region: Region, blob: bytes, nr_cpus: int) -> None:
    """Owner, once the arena exists: the manifest's bytes, the superblock's fields,
    then ``magic`` (release)."""
    arena.buf[region.offset : region.offset + len(blob)] = blob
    a = arena.atomic
    o = superblock.offsets()
    a.set32(o.version, LAYOUT_VERSION)
    a.set32(o.phase, RunPhase.SETUP)
    a.set(o.manifest_off, region.offset)
    a.set(o.manifest_len, len(blob))
    a.set(o.owner_pid, os.getpid())
    a.set32(o.nr_cpus, nr_cpus)
    a.store_release(o.magic, MAGIC)


def set_phase(arena: Arena, phase: RunPhase, t0_ns: int = 0, end_ns: int = 0) -> None:
    """Owner: the run's phase (with RUNNING, its start and deadline)."""
    a = arena.atomic
    o = arena.layout["superblock"].offsets()
    if t0_ns:
        a.set(o.t0_ns, t0_ns)
        a.set(o.end_ns, end_ns)
    a.set32(o.phase, phase)


# -- the reader's side --------------------------------------------------------------------------


class ManifestError(RuntimeError):
    """The segment is not a run mqrt can read (one line, for the user)."""


class NotPublished(ManifestError):
    """The run is still being set up: its manifest is not there yet."""


@dataclass(frozen=True)
class Superblock:
    phase: RunPhase
    owner_pid: int
    nr_cpus: int
    t0_ns: int
    end_ns: int


def read_superblock(arena: Arena) -> Superblock:
    """The superblock of a mapped run (ManifestError if it is not one, or not yet)."""
    a = arena.atomic
    if a.nbytes < SUPERBLOCK.itemsize:
        raise ManifestError(f"{arena.name} is too small to be a run's segment")
    o = Region("superblock", 0, SUPERBLOCK).offsets()
    if a.load_acquire(o.magic) != MAGIC:
        raise NotPublished(f"{arena.name} is still being set up (no manifest yet)")
    version = a.read32(o.version)
    if version != LAYOUT_VERSION:
        raise ManifestError(
            f"{arena.name} was made by an mqrt with layout version {version}; "
            f"this one reads {LAYOUT_VERSION}"
        )
    phase = a.read32(o.phase)
    return Superblock(
        RunPhase(phase) if phase in RunPhase._value2member_map_ else RunPhase.SETUP,
        a.read(o.owner_pid),
        a.read32(o.nr_cpus),
        a.read(o.t0_ns),
        a.read(o.end_ns),
    )


def load(arena: Arena) -> Manifest:
    """The manifest of a mapped run (after :func:`read_superblock` said it is whole)."""
    read_superblock(arena)
    a = arena.atomic
    o = Region("superblock", 0, SUPERBLOCK).offsets()
    off, n = a.read(o.manifest_off), a.read(o.manifest_len)
    if off + n > a.nbytes:
        raise ManifestError(f"{arena.name}: its manifest runs past the segment's end")
    try:
        got = _Unpickler(io.BytesIO(bytes(arena.buf[off : off + n]))).load()
    except (pickle.UnpicklingError, AttributeError, ImportError, EOFError) as exc:
        raise ManifestError(f"{arena.name}: unreadable manifest ({exc})") from None
    if not isinstance(got, Manifest):
        raise ManifestError(f"{arena.name}: its manifest is a {type(got).__name__}")
    return got

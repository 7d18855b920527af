"""CPU to hardware-queue mapping: a port of ``block/blk-mq-cpumap.c`` (Linux 5.10).

This is the algorithm every kernel up to 6.1 uses (6.2 replaced it with
``group_cpus_evenly()`` from ``lib/group_cpus.c``, which is not ported).  It also
carries the pieces of ``include/linux/blk-mq.h`` and ``block/blk-mq.h`` that the
mapping needs: the hctx types, ``struct blk_mq_queue_map``, the map lookup and the
fallback map, plus the cpulist syntax of ``lib/bitmap.c``.

Deviations from the kernel:

- present == possible CPUs: emulated CPUs are always present (CPU hotplug takes a
  CPU offline, never out of the map, as the kernel's map covers possible CPUs), so
  step 1 of :func:`map_queues` maps the first ``nr_queues`` CPUs and step 2 the rest.
- The topology is an explicit :class:`Topology` value passed in, not per-CPU arch
  state (``topology_sibling_cpumask()``, ``sd_llc_id``); it describes the *emulated*
  CPUs, derived from the host where they are pinned (:meth:`Topology.host`).
- ``mq_map`` has one entry per emulated CPU (``nr_cpus``, not ``nr_cpu_ids``), and the
  kernel's "unmapped" marker never escapes :func:`map_queues`.
- :func:`map_queues` rejects ``nr_queues == 0`` (the kernel never maps such a map: it
  aliases ``HCTX_TYPE_DEFAULT``; calling it would divide by zero).
- :func:`map_queues_fallback` maps every CPU to ``queue_offset``; the kernel's
  ``blk_mq_clear_mq_map()`` writes 0, which is the same for the DEFAULT map it serves.
- :func:`map_for` returns an hctx *index*, not an hctx pointer.
- :func:`parse_cpulist` has no ``N`` (last CPU) token and caps CPU numbers at
  ``CPULIST_MAX``; LLCs come from sysfs ``cache/index3`` only.
"""

from __future__ import annotations

import enum
import itertools
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class HctxType(enum.IntEnum):
    """``enum hctx_type``: which map of a tag set a request is looked up in."""

    DEFAULT = 0
    READ = 1
    POLL = 2


HCTX_MAX_TYPES = len(HctxType)

CPULIST_MAX = 65535
"""Largest CPU number :func:`parse_cpulist` accepts (kernel: below ``nr_cpumask_bits``)."""

_SYSFS_CPU = Path("/sys/devices/system/cpu")
_ELEMENT = re.compile(r"([0-9]+)(?:\s*-\s*([0-9]+)(?:\s*:\s*([0-9]+)\s*/\s*([0-9]+))?)?")
_UNMAPPED = -1


def parse_cpulist(text: str) -> list[int]:
    """Parse ``"0-3,6,8-11:2/4"`` into sorted unique CPUs: ``bitmap_parselist()``.

    Elements are ``N``, ``N-M`` and ``N-M:used/group`` (in each group of ``group``
    CPUs from ``N``, the first ``used``).  ``""`` is the empty list.
    """
    cpus: set[int] = set()
    for raw in text.split(",") if text.strip() else []:
        part = raw.strip()

        def bad(reason: str, part: str = part) -> ValueError:
            return ValueError(f"bad cpulist {part or text!r}: {reason}")

        if not part:
            raise bad("empty element")
        m = _ELEMENT.fullmatch(part)
        if m is None:
            raise bad("expected N, N-M or N-M:used/group")
        start = int(m[1])
        end = start if m[2] is None else int(m[2])
        used, group = (1, 1) if m[3] is None else (int(m[3]), int(m[4]))
        if end < start:
            raise bad("range end below start")
        if end > CPULIST_MAX:
            raise bad(f"CPU number above {CPULIST_MAX}")
        if group == 0:
            raise bad("group size must be >= 1")
        if used > group:
            raise bad("used count above group size")
        for first in range(start, end + 1, group):
            cpus.update(range(first, min(first + used, end + 1)))
    return sorted(cpus)


def format_cpulist(cpus: Iterable[int]) -> str:
    """Format CPUs as ``"0-3,6"``: the ``%*pbl`` format (``bitmap_print_to_pagebuf()``)."""
    ordered = sorted(set(cpus))
    if ordered and ordered[0] < 0:
        raise ValueError(f"bad CPU {ordered[0]}: CPU numbers are >= 0")
    runs = []
    for _, pairs in itertools.groupby(enumerate(ordered), lambda pair: pair[1] - pair[0]):
        run = [cpu for _, cpu in pairs]
        runs.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(runs)


@dataclass(frozen=True)
class Topology:
    """CPU topology of the *emulated* CPUs 0..nr_cpus-1.

    ``siblings[cpu]`` is ``topology_sibling_cpumask(cpu)`` and ``llc[cpu]`` the CPUs
    of ``cpu``'s last-level-cache domain, both sorted and containing ``cpu``.  Each
    table must be a partition (every member of a group has that same group).
    """

    siblings: tuple[tuple[int, ...], ...]
    llc: tuple[tuple[int, ...], ...]
    #: each CPU's LLC as the number of its first CPU (share_cache() in O(1))
    _llc_id: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        nr = len(self.siblings)
        if nr < 1:
            raise ValueError("topology: nr_cpus must be >= 1, got 0")
        if len(self.llc) != nr:
            raise ValueError(f"topology: llc has {len(self.llc)} entries, siblings {nr}")
        for name in ("siblings", "llc"):
            # One tuple per distinct group, shared by its members: the checks below
            # then cost the sum of the groups' sizes, not nr_cpus times a group.
            canon: dict[tuple[int, ...], tuple[int, ...]] = {}
            table = tuple(canon.setdefault(g, g) for g in map(tuple, getattr(self, name)))
            object.__setattr__(self, name, table)
            members = 0
            for group in canon.values():
                members += len(group)
                if (
                    not group
                    or list(group) != sorted(set(group))
                    or not 0 <= group[0] <= group[-1] < nr
                    or any(table[cpu] is not group for cpu in group)
                ):
                    raise _bad_group(name, table.index(group), group, nr)
            if members != nr:  # some CPU is in no group of its own
                cpu = next(c for c, group in enumerate(table) if c not in group)
                raise _bad_group(name, cpu, table[cpu], nr)
        object.__setattr__(self, "_llc_id", tuple(group[0] for group in self.llc))

    @property
    def nr_cpus(self) -> int:
        """Number of emulated CPUs (``nr_cpu_ids``)."""
        return len(self.siblings)

    def first_sibling(self, cpu: int) -> int:
        """Smallest CPU of ``cpu``'s core: ``get_first_sibling()``."""
        return self.siblings[cpu][0]

    def share_cache(self, a: int, b: int) -> bool:
        """Whether two CPUs share a last-level cache: ``cpus_share_cache()``."""
        return self._llc_id[a] == self._llc_id[b]

    @classmethod
    def emulated(
        cls, nr_cpus: int, cpus_per_core: int = 1, cores_per_llc: int | None = None
    ) -> Topology:
        """A synthetic machine numbered core-major (the arch topology code's output).

        ``cpus_per_core=2`` gives cores {0,1}, {2,3}, ...; the last core may be partial.
        ``cores_per_llc=None`` puts every CPU in one LLC.
        """
        for name, value in (("nr_cpus", nr_cpus), ("cpus_per_core", cpus_per_core)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if cores_per_llc is not None and cores_per_llc < 1:
            raise ValueError(f"cores_per_llc must be >= 1 or None, got {cores_per_llc}")
        llc_size = nr_cpus if cores_per_llc is None else cores_per_llc * cpus_per_core

        def block(cpu: int, size: int) -> tuple[int, ...]:
            first = cpu - cpu % size
            return tuple(range(first, min(first + size, nr_cpus)))

        return cls(
            siblings=tuple(block(cpu, cpus_per_core) for cpu in range(nr_cpus)),
            llc=tuple(block(cpu, llc_size) for cpu in range(nr_cpus)),
        )

    @classmethod
    def host(cls, nr_cpus: int, host_cpus: Sequence[int]) -> Topology:
        """The emulated CPUs' topology when pinned per :func:`pin_plan` on this host.

        With at most one emulated CPU per host CPU, the host's SMT siblings and LLCs
        (sysfs) carry over; without readable sysfs, no siblings and one LLC.  With more
        emulated CPUs than host CPUs, the ones sharing a host CPU are siblings, one LLC.
        """
        plan = pin_plan(nr_cpus, host_cpus)
        everyone = tuple(range(nr_cpus))
        smt = caches = None
        if nr_cpus <= len(host_cpus):
            smt = _read_host_groups(plan, "topology/thread_siblings_list")
            caches = _read_host_groups(plan, "cache/index3/shared_cpu_list")

        def group(i: int, host_groups: dict[int, frozenset[int]] | None) -> tuple[int, ...]:
            if host_groups is None:  # only CPUs on the very same host CPU
                return tuple(j for j in everyone if plan[j] == plan[i])
            return tuple(j for j in everyone if plan[j] in host_groups[plan[i]])

        llc = (everyone,) * nr_cpus if caches is None else tuple(group(i, caches) for i in everyone)
        return cls(siblings=tuple(group(i, smt) for i in everyone), llc=llc)

    def describe(self) -> str:
        """Short human text, e.g. ``"4 CPUs, 2 cores (2 threads/core), 1 LLC"``."""
        cores = set(self.siblings)
        sizes = sorted({len(core) for core in cores})
        threads = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        nr_llc = len(set(self.llc))

        def count(n: int, noun: str) -> str:
            return f"{n} {noun}{'' if n == 1 else 's'}"

        return (
            f"{count(self.nr_cpus, 'CPU')}, {count(len(cores), 'core')} "
            f"({threads} thread{'' if sizes == [1] else 's'}/core), {count(nr_llc, 'LLC')}"
        )


def _bad_group(name: str, cpu: int, group: tuple[int, ...], nr: int) -> ValueError:
    return ValueError(
        f"topology: {name}[{cpu}] = {group} must be sorted, within "
        f"0..{nr - 1}, contain {cpu} and be the same group for each member"
    )


def _read_host_groups(hosts: Sequence[int], rel: str) -> dict[int, frozenset[int]] | None:
    """Each host CPU's group from ``/sys/devices/system/cpu/cpuN/<rel>``; None if unreadable."""
    groups: dict[int, frozenset[int]] = {}
    for host in set(hosts):
        try:
            members = frozenset(parse_cpulist((_SYSFS_CPU / f"cpu{host}" / rel).read_text()))
        except (OSError, ValueError):
            return None
        if host not in members:
            return None
        groups[host] = members
    return groups


def pin_plan(nr_cpus: int, allowed: Sequence[int]) -> list[int]:
    """Host CPU for each emulated CPU, wrapping around ``allowed`` (no kernel counterpart)."""
    if not allowed:
        raise ValueError("pin_plan: no host CPUs allowed")
    if nr_cpus < 0:
        raise ValueError(f"nr_cpus must be >= 0, got {nr_cpus}")
    return [allowed[i % len(allowed)] for i in range(nr_cpus)]


def host_cpus() -> list[int]:
    """Host CPUs this process may run on, sorted: ``sched_getaffinity(0)``."""
    return sorted(os.sched_getaffinity(0))


@dataclass
class QueueMap:
    """struct blk_mq_queue_map."""

    nr_queues: int
    queue_offset: int = 0
    mq_map: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.nr_queues < 0:
            raise ValueError(f"nr_queues must be >= 0, got {self.nr_queues}")
        if self.queue_offset < 0:
            raise ValueError(f"queue_offset must be >= 0, got {self.queue_offset}")


def _queue_index(qmap: QueueMap, q: int) -> int:
    return qmap.queue_offset + q % qmap.nr_queues


def map_queues(qmap: QueueMap, topo: Topology) -> None:
    """Fill ``qmap.mq_map`` for every CPU of ``topo``: ``blk_mq_map_queues()`` (5.10).

    Step 1 gives the first ``nr_queues`` CPUs one queue each.  Step 2 walks the rest:
    a CPU that is its core's first sibling takes the next queue round robin, any other
    copies its first sibling's queue.  The first sibling is the smallest CPU of the
    core, so it is always mapped before its siblings (in the kernel a first sibling
    numbered after ``cpu`` would copy the unmapped marker; that cannot happen here).
    """
    nr_queues = qmap.nr_queues
    if nr_queues < 1:
        raise ValueError(
            f"map_queues: nr_queues must be >= 1, got {nr_queues} "
            "(a map without queues aliases HCTX_TYPE_DEFAULT and is not mapped)"
        )
    mq_map = [_UNMAPPED] * topo.nr_cpus
    q = 0
    for cpu in range(min(nr_queues, topo.nr_cpus)):  # every CPU is present
        mq_map[cpu] = _queue_index(qmap, q)
        q += 1
    for cpu in range(topo.nr_cpus):
        if mq_map[cpu] != _UNMAPPED:
            continue
        if q < nr_queues or topo.first_sibling(cpu) == cpu:
            mq_map[cpu] = _queue_index(qmap, q)
            q += 1
        else:
            mq_map[cpu] = mq_map[topo.first_sibling(cpu)]
    qmap.mq_map[:] = mq_map


def map_queue_types(qmaps: Sequence[QueueMap], topo: Topology, counts: Sequence[int]) -> None:
    """The drivers' ``->map_queues`` for DEFAULT/READ/POLL: map ``i`` gets ``counts[i]``
    queues after those of the maps before it (the hctx numbering of null_map_queues()
    and nvme_pci_map_queues()); a map with none is left empty (aliases DEFAULT)."""
    offset = 0
    for qmap, nr in zip(qmaps, counts, strict=False):
        qmap.nr_queues = nr
        qmap.queue_offset = offset
        if nr:
            map_queues(qmap, topo)
        else:
            qmap.mq_map[:] = []
        offset += nr


def map_queues_fallback(qmap: QueueMap, topo: Topology) -> None:
    """Map every CPU to ``queue_offset``: ``blk_mq_clear_mq_map()``, the drivers' fallback."""
    qmap.mq_map[:] = [qmap.queue_offset] * topo.nr_cpus


def queue_cpumasks(qmap: QueueMap, nr_hw_queues_total: int) -> list[list[int]]:
    """The sorted CPUs of each hctx in this map: ``hctx->cpumask`` from ``blk_mq_map_swqueue()``."""
    masks: list[list[int]] = [[] for _ in range(nr_hw_queues_total)]
    for cpu, hctx in enumerate(qmap.mq_map):
        if not 0 <= hctx < nr_hw_queues_total:
            raise ValueError(
                f"queue_cpumasks: mq_map[{cpu}] = {hctx} is outside 0..{nr_hw_queues_total - 1}"
            )
        masks[hctx].append(cpu)
    return masks


def map_for(qmaps: Sequence[QueueMap], cpu: int, hctx_type: HctxType) -> int:
    """The hctx index of ``cpu`` for ``hctx_type``: ``blk_mq_map_queue_type()``.

    A map with no queues (or beyond ``len(qmaps)``) aliases ``HCTX_TYPE_DEFAULT``, as
    ``blk_mq_map_swqueue()`` arranges.
    """
    if not qmaps:
        raise ValueError("map_for: no queue maps")
    kind = HctxType(hctx_type)
    if kind >= len(qmaps) or qmaps[kind].nr_queues == 0:
        kind = HctxType.DEFAULT
    mq_map = qmaps[kind].mq_map
    if not 0 <= cpu < len(mq_map):
        raise ValueError(f"map_for: CPU {cpu} is not in the {kind.name} map of {len(mq_map)} CPUs")
    return mq_map[cpu]

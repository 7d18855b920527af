"""mqrt.block.blk_mq_cpumap: cpulists, topologies and blk_mq_map_queues() tables (Linux 5.10)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqrt.block import blk_mq_cpumap as cpumap
from mqrt.block.blk_mq_cpumap import (
    HCTX_MAX_TYPES,
    HctxType,
    QueueMap,
    Topology,
    format_cpulist,
    host_cpus,
    map_for,
    map_queues,
    map_queues_fallback,
    parse_cpulist,
    pin_plan,
    queue_cpumasks,
)

# --- cpulists ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("", []),
        ("  \n", []),
        ("0", [0]),
        ("0-3,6,8-9", [0, 1, 2, 3, 6, 8, 9]),
        (" 0 - 1 , 3\n", [0, 1, 3]),
        ("6,0-2,1", [0, 1, 2, 6]),
        ("0-7:2/4", [0, 1, 4, 5]),
        ("0-9:3/4", [0, 1, 2, 4, 5, 6, 8, 9]),
        ("2-2", [2]),
    ],
)
def test_parse_cpulist(text, cpus):
    assert parse_cpulist(text) == cpus


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3-1", "bad cpulist '3-1': range end below start"),
        ("0,,2", "bad cpulist '0,,2': empty element"),
        ("0,", "bad cpulist '0,': empty element"),
        ("0,x", "bad cpulist 'x': expected N, N-M or N-M:used/group"),
        ("-1", "bad cpulist '-1': expected"),
        ("0-7:2", "bad cpulist '0-7:2': expected"),
        ("0-7:2/0", "bad cpulist '0-7:2/0': group size must be >= 1"),
        ("0-7:5/4", "bad cpulist '0-7:5/4': used count above group size"),
        ("0-70000", "bad cpulist '0-70000': CPU number above 65535"),
        ("0 1", "bad cpulist '0 1': expected"),
    ],
)
def test_parse_cpulist_errors(text, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)) as err:
        parse_cpulist(text)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("cpus", "text"),
    [([], ""), ([0], "0"), ([0, 1], "0-1"), ([0, 1, 2, 3, 6], "0-3,6"), ([9, 3, 3, 4], "3-4,9")],
)
def test_format_cpulist(cpus, text):
    assert format_cpulist(cpus) == text


def test_format_cpulist_rejects_negative():
    with pytest.raises(ValueError, match="bad CPU -1"):
        format_cpulist([-1, 0])


@given(st.sets(st.integers(0, 200)))
def test_cpulist_round_trip(cpus):
    text = format_cpulist(cpus)
    assert parse_cpulist(text) == sorted(cpus)
    assert format_cpulist(parse_cpulist(text)) == text


# --- topology ------------------------------------------------------------------------


def test_emulated_no_smt_one_llc():
    topo = Topology.emulated(4)
    assert topo.nr_cpus == 4
    assert topo.siblings == ((0,), (1,), (2,), (3,))
    assert topo.llc == ((0, 1, 2, 3),) * 4
    assert [topo.first_sibling(c) for c in range(4)] == [0, 1, 2, 3]
    assert topo.share_cache(0, 3)
    assert topo.describe() == "4 CPUs, 4 cores (1 thread/core), 1 LLC"


def test_emulated_smt_partial_core_and_llcs():
    topo = Topology.emulated(7, cpus_per_core=2, cores_per_llc=2)
    assert topo.siblings == ((0, 1),) * 2 + ((2, 3),) * 2 + ((4, 5),) * 2 + ((6,),)
    assert topo.llc == ((0, 1, 2, 3),) * 4 + ((4, 5, 6),) * 3
    assert [topo.first_sibling(c) for c in range(7)] == [0, 0, 2, 2, 4, 4, 6]
    assert topo.share_cache(1, 3)
    assert not topo.share_cache(3, 4)
    assert topo.describe() == "7 CPUs, 4 cores (1-2 threads/core), 2 LLCs"
    assert Topology.emulated(1).describe() == "1 CPU, 1 core (1 thread/core), 1 LLC"
    assert Topology.emulated(4, 2).describe() == "4 CPUs, 2 cores (2 threads/core), 1 LLC"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nr_cpus": 0}, "nr_cpus must be >= 1, got 0"),
        ({"nr_cpus": 2, "cpus_per_core": 0}, "cpus_per_core must be >= 1, got 0"),
        ({"nr_cpus": 2, "cores_per_llc": 0}, "cores_per_llc must be >= 1 or None, got 0"),
    ],
)
def test_emulated_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Topology.emulated(**kwargs)


@pytest.mark.parametrize(
    ("siblings", "llc"),
    [
        ((), ()),
        (((0,), (1,)), ((0, 1),)),
        (((1,), (1,)), ((0, 1),) * 2),  # cpu 0 missing from its own group
        (((0, 1), (1,)), ((0, 1),) * 2),  # not a partition
        (((0, 2), (0, 2)), ((0, 1),) * 2),  # out of range
        (((0,), (1,)), ((1, 0),) * 2),  # unsorted
    ],
)
def test_topology_validation(siblings, llc):
    with pytest.raises(ValueError, match=r"^topology: "):
        Topology(siblings=siblings, llc=llc)


def test_pin_plan_and_host_cpus():
    assert pin_plan(5, [3, 7]) == [3, 7, 3, 7, 3]
    assert pin_plan(2, [0, 1, 2]) == [0, 1]
    with pytest.raises(ValueError, match="no host CPUs"):
        pin_plan(2, [])
    cpus = host_cpus()
    assert cpus == sorted(set(cpus)) and cpus


def test_host_topology_on_this_machine():
    cpus = host_cpus()
    nr = min(2, len(cpus))
    topo = Topology.host(nr, cpus)
    assert topo.nr_cpus == nr
    for cpu in range(nr):
        assert cpu in topo.siblings[cpu] and cpu in topo.llc[cpu]
    map_queues(qmap := QueueMap(nr_queues=nr), topo)
    assert qmap.mq_map == list(range(nr))


def test_host_topology_oversubscribed():
    topo = Topology.host(8, [0, 1])
    assert topo.siblings == ((0, 2, 4, 6), (1, 3, 5, 7)) * 4
    assert topo.llc == (tuple(range(8)),) * 8
    assert [topo.first_sibling(c) for c in range(8)] == [0, 1] * 4
    # 2 queues: step 1 cpu0->0, cpu1->1; step 2 every CPU copies its first sibling
    # (cpu 0 or 1), so each queue's CPUs all run on one host core.
    map_queues(qmap := QueueMap(nr_queues=2), topo)
    assert qmap.mq_map == [0, 1, 0, 1, 0, 1, 0, 1]
    # 4 queues: step 1 cpu0..3 -> 0..3 (q=4); step 2 cpu4 -> map[0]=0, cpu5 -> map[1]=1,
    # cpu6 -> map[0]=0, cpu7 -> map[1]=1.
    map_queues(qmap := QueueMap(nr_queues=4), topo)
    assert qmap.mq_map == [0, 1, 2, 3, 0, 1, 0, 1]


def _fake_sysfs(root, smt, l3):
    for host, (siblings, shared) in enumerate(zip(smt, l3, strict=True)):
        (root / f"cpu{host}" / "topology").mkdir(parents=True)
        (root / f"cpu{host}" / "topology" / "thread_siblings_list").write_text(siblings + "\n")
        if shared is not None:
            (root / f"cpu{host}" / "cache" / "index3").mkdir(parents=True)
            (root / f"cpu{host}" / "cache" / "index3" / "shared_cpu_list").write_text(shared)


def test_host_topology_from_sysfs(tmp_path, monkeypatch):
    # Host: 8 CPUs, SMT pairs {0,4} {1,5} {2,6} {3,7}; L3 {0,1,4,5} and {2,3,6,7}.
    smt = ["0,4", "1,5", "2,6", "3,7"] * 2
    l3 = ["0-1,4-5", "0-1,4-5", "2-3,6-7", "2-3,6-7"] * 2
    _fake_sysfs(tmp_path, smt, l3)
    monkeypatch.setattr(cpumap, "_SYSFS_CPU", tmp_path)
    # Emulated 0..3 pinned on host 0, 4, 2, 3: emulated 0 and 1 are one core.
    topo = Topology.host(4, [0, 4, 2, 3])
    assert topo.siblings == ((0, 1), (0, 1), (2,), (3,))
    assert topo.llc == ((0, 1), (0, 1), (2, 3), (2, 3))
    assert topo.describe() == "4 CPUs, 3 cores (1-2 threads/core), 2 LLCs"


def test_host_topology_sysfs_fallbacks(tmp_path, monkeypatch):
    monkeypatch.setattr(cpumap, "_SYSFS_CPU", tmp_path / "missing")
    topo = Topology.host(3, [0, 1, 2])
    assert topo.siblings == ((0,), (1,), (2,))
    assert topo.llc == ((0, 1, 2),) * 3
    # Siblings readable, no L3 for one CPU: one LLC for all.
    _fake_sysfs(tmp_path, ["0-1", "0-1"], ["0-1", None])
    monkeypatch.setattr(cpumap, "_SYSFS_CPU", tmp_path)
    topo = Topology.host(2, [0, 1])
    assert topo.siblings == ((0, 1), (0, 1))
    assert topo.llc == ((0, 1),) * 2


# --- blk_mq_map_queues() -------------------------------------------------------------


def _mapped(nr_cpus, nr_queues, cpus_per_core=1, queue_offset=0):
    qmap = QueueMap(nr_queues=nr_queues, queue_offset=queue_offset)
    map_queues(qmap, Topology.emulated(nr_cpus, cpus_per_core))
    return qmap.mq_map


@pytest.mark.parametrize(
    ("nr_cpus", "nr_queues", "cpus_per_core", "expected"),
    [
        # Step 1 maps cpu0..3 to queues 0..3; nothing is left for step 2.
        (4, 4, 1, [0, 1, 2, 3]),
        # Step 1: cpu0->0, cpu1->1 (q=2).  Step 2, no siblings so every CPU is its
        # core's first: cpu2->2%2=0, cpu3->1, cpu4->0, cpu5->1, cpu6->0, cpu7->1.
        (8, 2, 1, [0, 1, 0, 1, 0, 1, 0, 1]),
        # Cores {0,1} {2,3} {4,5} {6,7}.  Step 1: cpu0->0, cpu1->1 (q=2).  Step 2:
        # cpu2 first -> 2%2=0 (q=3); cpu3 copies cpu2 -> 0; cpu4 first -> 3%2=1 (q=4);
        # cpu5 -> 1; cpu6 first -> 4%2=0 (q=5); cpu7 -> 0.
        (8, 2, 2, [0, 1, 0, 0, 1, 1, 0, 0]),
        # Cores {0,1} {2,3} {4,5}.  Step 1: cpu0..3 -> 0..3 (q=4).  Step 2: cpu4 first
        # -> 4%4=0 (q=5); cpu5 copies cpu4 -> 0.
        (6, 4, 2, [0, 1, 2, 3, 0, 0]),
        # Cores {0,1} {2,3} {4,5} {6,7}.  Step 1: cpu0..2 -> 0..2 (q=3).  Step 2: cpu3
        # copies cpu2 -> 2; cpu4 first -> 3%3=0 (q=4); cpu5 -> 0; cpu6 first -> 4%3=1
        # (q=5); cpu7 -> 1.
        (8, 3, 2, [0, 1, 2, 2, 0, 0, 1, 1]),
        # Cores {0-3} {4-7} {8-11}.  Step 1: cpu0->0, cpu1->1 (q=2).  Step 2: cpu2, cpu3
        # copy cpu0 -> 0; cpu4 first -> 2%2=0 (q=3); cpu5..7 -> 0; cpu8 first -> 3%2=1
        # (q=4); cpu9..11 -> 1.  (The 5.10 algorithm's known imbalance: 8 vs 4.)
        (12, 2, 4, [0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]),
        # Cores {0,1} {2,3} {4} (partial).  Step 1: cpu0->0, cpu1->1 (q=2).  Step 2:
        # cpu2 first -> 0 (q=3); cpu3 -> 0; cpu4 first -> 3%2=1 (q=4).
        (5, 2, 2, [0, 1, 0, 0, 1]),
        # One queue: step 1 cpu0->0, step 2 everything -> q%1 = 0.
        (5, 1, 1, [0] * 5),
        (6, 1, 2, [0] * 6),
        # More queues than CPUs: step 1 maps every CPU, queues 3 and 4 get none.
        (3, 5, 1, [0, 1, 2]),
    ],
)
def test_map_queues_tables(nr_cpus, nr_queues, cpus_per_core, expected):
    assert _mapped(nr_cpus, nr_queues, cpus_per_core) == expected


def test_map_queues_offset_and_cpumasks():
    # POLL map: 2 queues at offset 2 after 2 DEFAULT queues; 4 CPUs, no siblings.
    # Step 1: cpu0 -> 2+0, cpu1 -> 2+1 (q=2); step 2: cpu2 -> 2+2%2=2, cpu3 -> 3.
    default = QueueMap(nr_queues=2)
    poll = QueueMap(nr_queues=2, queue_offset=2)
    topo = Topology.emulated(4)
    map_queues(default, topo)
    map_queues(poll, topo)
    assert default.mq_map == [0, 1, 0, 1]
    assert poll.mq_map == [2, 3, 2, 3]
    assert queue_cpumasks(poll, 4) == [[], [], [0, 2], [1, 3]]
    assert queue_cpumasks(default, 4) == [[0, 2], [1, 3], [], []]
    with pytest.raises(ValueError, match=r"mq_map\[0\] = 2 is outside 0..1"):
        queue_cpumasks(poll, 2)


def test_more_queues_than_cpus_leaves_empty_cpumasks():
    qmap = QueueMap(nr_queues=5)
    map_queues(qmap, Topology.emulated(3))
    assert queue_cpumasks(qmap, 5) == [[0], [1], [2], [], []]


def test_map_queues_rejects_no_queues_and_remaps_in_place():
    with pytest.raises(ValueError, match="nr_queues must be >= 1, got 0"):
        map_queues(QueueMap(nr_queues=0), Topology.emulated(2))
    with pytest.raises(ValueError, match="nr_queues must be >= 0"):
        QueueMap(nr_queues=-1)
    with pytest.raises(ValueError, match="queue_offset must be >= 0"):
        QueueMap(nr_queues=1, queue_offset=-1)
    qmap = QueueMap(nr_queues=2)
    mq_map = qmap.mq_map
    map_queues(qmap, Topology.emulated(8))
    map_queues(qmap, Topology.emulated(3))
    assert qmap.mq_map is mq_map and mq_map == [0, 1, 0]


def test_map_queues_fallback():
    qmap = QueueMap(nr_queues=1, queue_offset=3)
    map_queues_fallback(qmap, Topology.emulated(4, 2))
    assert qmap.mq_map == [3, 3, 3, 3]


def test_map_for_aliases_empty_maps_to_default():
    # null_blk shape: DEFAULT 2 submit queues at 0, READ none, POLL 1 queue at 2.
    topo = Topology.emulated(4)
    qmaps = [QueueMap(2), QueueMap(0), QueueMap(1, queue_offset=2)]
    assert HCTX_MAX_TYPES == len(qmaps) == 3
    map_queues(qmaps[HctxType.DEFAULT], topo)
    map_queues(qmaps[HctxType.POLL], topo)
    for cpu in range(4):
        assert map_for(qmaps, cpu, HctxType.READ) == map_for(qmaps, cpu, HctxType.DEFAULT)
        assert map_for(qmaps, cpu, HctxType.DEFAULT) == cpu % 2
        assert map_for(qmaps, cpu, HctxType.POLL) == 2
    # Fewer maps than types (nr_maps == 1): everything aliases DEFAULT.
    assert map_for(qmaps[:1], 3, HctxType.POLL) == 1
    with pytest.raises(ValueError, match="CPU 4 is not in the DEFAULT map of 4 CPUs"):
        map_for(qmaps, 4, HctxType.READ)
    with pytest.raises(ValueError, match="no queue maps"):
        map_for([], 0, HctxType.DEFAULT)


@st.composite
def _topologies(draw):
    """Emulated shapes, and arbitrary (non-contiguous) core partitions."""
    nr_cpus = draw(st.integers(1, 40))
    if draw(st.booleans()):
        return Topology.emulated(nr_cpus, draw(st.integers(1, 8)), draw(st.integers(1, 4)))
    core_of = draw(st.lists(st.integers(0, 9), min_size=nr_cpus, max_size=nr_cpus))
    cores = [
        tuple(c for c in range(nr_cpus) if core_of[c] == core_of[cpu]) for cpu in range(nr_cpus)
    ]
    return Topology(siblings=tuple(cores), llc=(tuple(range(nr_cpus)),) * nr_cpus)


@given(_topologies(), st.integers(1, 48), st.integers(0, 16))
def test_map_queues_invariants(topo, nr_queues, queue_offset):
    qmap = QueueMap(nr_queues=nr_queues, queue_offset=queue_offset)
    map_queues(qmap, topo)
    mq_map = qmap.mq_map
    nr_cpus = topo.nr_cpus
    assert len(mq_map) == nr_cpus
    assert all(queue_offset <= hctx < queue_offset + nr_queues for hctx in mq_map)
    if nr_queues >= nr_cpus:
        assert len(set(mq_map)) == nr_cpus
    # Step 1 maps CPUs 0..nr_queues-1 in order; step 2 keeps cores together.
    for cpu in range(min(nr_queues, nr_cpus)):
        assert mq_map[cpu] == queue_offset + cpu
    for cpu in range(nr_queues, nr_cpus):
        first = topo.first_sibling(cpu)
        if first != cpu:
            assert mq_map[cpu] == mq_map[first]
    masks = queue_cpumasks(qmap, queue_offset + nr_queues)
    assert all(masks[queue_offset + q] for q in range(min(nr_queues, nr_cpus)))
    assert sorted(c for mask in masks for c in mask) == list(range(nr_cpus))

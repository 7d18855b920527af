"""A run's manifest: the owner's declarations pickled into the segment, read back by
an inspector into mqrt's own classes only."""

from __future__ import annotations

import io
import pickle

import pytest

from mqrt.lib.shm import Arena, Layout
from mqrt.runtime import manifest
from mqrt.runtime.manifest import ManifestError, RunPhase


class _Foreign:  # a class no manifest may name
    pass


def _published(extra: object) -> tuple:
    from mqrt.lib import rcu
    from mqrt.lib.wait import Waiters

    layout = Layout()
    sb = manifest.declare(layout)
    m = manifest.Manifest(
        "0", ["mqrt"], 2, "NullbOps", layout, [], Waiters.declare(layout, 3),
        layout.add("cpu_stats", "<u8", 2), rcu.declare(layout, 2), extra={"x": extra},
    )  # fmt: skip
    region, blob = manifest.seal(layout, m)
    return layout, m, blob, sb, region


def test_the_superblock_comes_first_and_the_manifest_reads_back():
    layout, m, blob, sb, region = _published(7)
    assert sb.offset == 0 and layout.regions["manifest"] is region
    with Arena.create(layout) as owner:
        ro = Arena.open_readonly(owner.name)
        with pytest.raises(ManifestError, match="still being set up"):
            manifest.read_superblock(ro)
        manifest.publish(owner, sb, region, blob, 2)
        manifest.set_phase(owner, RunPhase.RUNNING, 10, 20)
        got = manifest.read_superblock(ro)
        assert (got.phase, got.nr_cpus, got.t0_ns, got.end_ns) == (RunPhase.RUNNING, 2, 10, 20)
        back = manifest.load(ro)
        # every region but the manifest's own, declared after it was pickled
        assert back.extra == {"x": 7}
        assert back.layout.regions.keys() == layout.regions.keys() - {"manifest"}
        assert back.cpu_stats == m.cpu_stats
        ro.close()


def test_a_manifest_naming_a_foreign_class_is_refused():
    layout, _, _, sb, _ = _published(None)
    evil = pickle.dumps(_Foreign())
    region = layout.add("manifest2", "u1", len(evil))
    with Arena.create(layout) as owner:
        manifest.publish(owner, sb, region, evil, 2)
        with pytest.raises(ManifestError, match="may not name"):
            manifest.load(owner)


def test_what_is_not_a_declaration_is_left_out():
    from mqrt.lib._atomic import AtomicView

    _, _, blob, *_ = _published(AtomicView(bytearray(8)))
    back = manifest._Unpickler(io.BytesIO(blob)).load()
    assert back.extra == {"x": None}

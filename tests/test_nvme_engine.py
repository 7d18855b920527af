"""The compiled device worker (``mqrt.device._nvme_engine.Engine``) driven directly:
real worker threads and real atomics on an anonymous shared mapping, the host played
by the test through ``sq_write_rw``, ``cq_reap`` and the event-index rule -- inputs a
well-behaved driver never sends, and properties that must hold at every instant."""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from mqrt.device._nvme_engine import Engine, cq_reap, sq_write_rw
from mqrt.device.nvme_defs import IoOpcode, Status, nvme_dbbuf_need_event
from mqrt.lib._atomic import AtomicView
from tests.helpers import wait_until

ANSWER_S = 10.0
NS_BLOCKS = 1 << 30


class EngineRig:
    """Queue pairs 1..nq-1 in one mapping: per pair its words, an SQ and a CQ ring;
    CSTS.CFS at 0 and a pending word per vector after it.  One Engine per worker,
    sharing the controller's channels and buckets."""

    def __init__(self, nq: int = 3, depth: int = 64, channels: int = 4, latency_ns: int = 0,
                 workers: int = 1):  # fmt: skip
        self.buf = mmap.mmap(-1, 1 << 20)
        self.mv = memoryview(self.buf)
        self.a = AtomicView(self.mv)
        self.pending = [64 + 64 * v for v in range(nq)]
        self.words: dict[int, dict[str, int]] = {}
        base = 64 + 64 * nq
        for q in range(1, nq):
            w = {"tail_db": base, "evt": base + 4, "head_pub": base + 8, "cq_head_db": base + 12,
                 "tail_pub": base + 16, "phase_pub": base + 20}  # fmt: skip
            base += 64
            w["sq"], w["cq"] = base, base + 64 * depth
            base += 80 * depth
            self.words[q] = w
        self.depth = depth
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(workers)]
        self.pipes = [os.pipe2(os.O_NONBLOCK) for _ in range(nq)]
        self.engines: list[Engine] = []
        for k in range(workers):
            eng = Engine(
                self.mv, self.kick[k], [w for _, w in self.pipes], self.pending, 0, nq,
                [(NS_BLOCKS, 9)], latency_ns, 0, 0.0, channels, 0, 0, 1 + k,
                group=self.engines[0] if self.engines else None,
            )  # fmt: skip
            eng.set_features(0, 0, 1 << 30, False, (8, 4, 1))
            self.engines.append(eng)
        self.worker_of: dict[int, int] = {}
        self.host = {q: {"tail": 0, "last": 0, "head": 0, "phase": 1} for q in self.words}
        self.threads: list[threading.Thread] = []

    def create(self, q: int, worker: int = 0) -> None:
        w, eng = self.words[q], self.engines[worker]
        eng.create_cq(q, self.depth, w["cq"], w["cq_head_db"], w["tail_pub"], w["phase_pub"], q,
                      True)  # fmt: skip
        eng.create_sq(q, q, self.depth, w["sq"], w["tail_db"], w["evt"], w["head_pub"], 2)
        self.worker_of[q] = worker

    def start(self) -> None:
        self.threads = [threading.Thread(target=e.run, daemon=True) for e in self.engines]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        for eng in self.engines:
            eng.stop()
        for t in self.threads:
            t.join(ANSWER_S)
        assert not any(t.is_alive() for t in self.threads)
        # the mapping (anonymous: nothing in /dev/shm) goes with the last engine
        for fd in [*self.kick, *(fd for p in self.pipes for fd in p)]:
            os.close(fd)

    def submit(self, q: int, cids, opcode: int = IoOpcode.READ, nsid: int = 1, slba: int = 0,
               nlb0: int = 0, ring: bool = True) -> None:  # fmt: skip
        h, w = self.host[q], self.words[q]
        for cid in cids:
            sq_write_rw(self.mv, w["sq"] + h["tail"] * 64, opcode, cid, nsid, slba, nlb0)
            h["tail"] = (h["tail"] + 1) % self.depth
        if ring:
            self.ring(q, h["tail"])

    def ring(self, q: int, tail: int) -> None:
        """The host's doorbell: the shadow tail (xchg), then a kick only past the
        event index."""
        h, w = self.host[q], self.words[q]
        self.a.xchg32(w["tail_db"], tail)
        old, h["last"] = h["last"], tail
        if nvme_dbbuf_need_event(self.a.read32(w["evt"]), tail, old):
            os.eventfd_write(self.kick[self.worker_of[q]], 1)

    def reap(self, q: int) -> list[tuple[int, int, int, int, int]]:
        h, w = self.host[q], self.words[q]
        out, head, phase = cq_reap(self.mv, w["cq"], h["head"], h["phase"], self.depth, 1 << 30)
        if out:
            h["head"], h["phase"] = head, phase
            self.a.store_release32(w["cq_head_db"], head)
        return out

    def reap_n(self, q: int, n: int) -> list[tuple[int, int, int, int, int]]:
        got: list[tuple[int, int, int, int, int]] = []
        assert wait_until(lambda: (got.extend(self.reap(q)), len(got) >= n)[1], ANSWER_S), got
        return got


@contextmanager
def engine_rig(**kw) -> Iterator[EngineRig]:
    rig = EngineRig(**kw)
    try:
        yield rig
    finally:
        rig.close()


def test_an_nsid_beyond_the_namespaces_is_invalid_the_broadcast_one_too():
    """NVMe Base 2.0, Namespace Identifier: FFFFFFFFh is the broadcast value; an I/O
    command naming a namespace the controller lacks completes with Invalid Namespace
    or Format (0Bh) -- for every NSID, those whose top bit is set too."""
    with engine_rig() as rig:
        rig.create(1)
        rig.start()
        cases = [(1, 0x2), (2, 0x8000_0000), (3, 0xFFFF_FFFF)]
        for cid, nsid in cases:
            rig.submit(1, [cid], opcode=IoOpcode.FLUSH, nsid=nsid)
        rig.submit(1, [4], nsid=0xFFFF_FFFF)
        status = {c[0]: c[1] for c in rig.reap_n(1, 4)}
        assert status == dict.fromkeys((1, 2, 3, 4), Status.INVALID_NS)


def test_an_lba_range_that_wraps_64_bits_is_out_of_range():
    """NVMe Base 2.0, LBA Out of Range (80h): SLBA + NLB past the namespace's size,
    however large SLBA is (the sum must not wrap)."""
    with engine_rig() as rig:
        rig.create(1)
        rig.start()
        rig.submit(1, [1], slba=(1 << 64) - 1, nlb0=1)
        rig.submit(1, [2], slba=(1 << 64) - 2, nlb0=3)
        rig.submit(1, [3], slba=NS_BLOCKS - 1, nlb0=1)  # one block past the end
        rig.submit(1, [4], slba=NS_BLOCKS - 1, nlb0=0)  # the last block: fine
        status = {c[0]: c[1] for c in rig.reap_n(1, 4)}
        assert status == {1: Status.LBA_RANGE, 2: Status.LBA_RANGE, 3: Status.LBA_RANGE,
                          4: Status.SUCCESS}  # fmt: skip


def test_workers_together_never_hold_more_commands_than_the_channels():
    """The controller's channels are shared by its workers: two workers fetching at
    the same moment from two full SQs never have more commands in service together
    than ``channels``, at any instant sampled, and all of them complete."""
    channels, n = 16, 200
    with engine_rig(nq=3, depth=256, channels=channels, latency_ns=2_000_000, workers=2) as rig:
        rig.create(1, worker=0)
        rig.create(2, worker=1)
        rig.start()
        for q in (1, 2):
            rig.submit(q, range(n), ring=False)
        for q in (1, 2):  # both doorbells, then both kicks, as close together as we can
            rig.a.xchg32(rig.words[q]["tail_db"], rig.host[q]["tail"])
        for fd in rig.kick:
            os.eventfd_write(fd, 1)
        got = {1: 0, 2: 0}
        worst = 0

        def progress() -> bool:
            nonlocal worst
            worst = max(worst, sum(e.counters()["in_service"] for e in rig.engines))
            for q in (1, 2):
                got[q] += len(rig.reap(q))
            return got[1] == got[2] == n

        assert wait_until(progress, 4 * ANSWER_S), got
        assert 0 < worst <= channels


def test_a_tail_doorbell_beyond_the_queue_is_ignored_and_the_worker_sleeps():
    """NVMe Base 2.0, Invalid Doorbell Write Value: a tail beyond the queue is an
    invalid write.  The worker ignores it (fetches nothing) and still goes back to
    sleep rather than looking at that doorbell forever; a valid tail afterwards is
    served."""
    with engine_rig() as rig:
        rig.create(1)
        rig.start()
        eng = rig.engines[0]
        assert wait_until(lambda: eng.counters()["sleeps"] >= 1, ANSWER_S)
        before = eng.counters()
        rig.a.xchg32(rig.words[1]["tail_db"], rig.depth + 36)
        os.eventfd_write(rig.kick[0], 1)
        assert wait_until(lambda: eng.counters()["sleeps"] > before["sleeps"], ANSWER_S)
        assert eng.counters()["commands"] == 0
        rig.host[1]["last"] = 0
        rig.submit(1, [7])
        assert [c[:2] for c in rig.reap_n(1, 1)] == [(7, Status.SUCCESS)]


def test_stop_before_run_makes_run_return_at_once():
    """A worker told to stop before its thread reaches run() does not serve: the stop
    is not forgotten (the coordinator joins its threads on every exit path)."""
    with engine_rig() as rig:
        eng = rig.engines[0]
        eng.stop()
        t = threading.Thread(target=eng.run, daemon=True)
        t.start()
        t.join(ANSWER_S)
        assert not t.is_alive()

"""Type stubs of mqrt.device._nvme_engine (device/_nvme_engine.c)."""

from collections.abc import Sequence

from typing_extensions import Buffer

#: The names of the counters each engine keeps, in order.
COUNTERS: tuple[str, ...]

class Engine:
    """One device worker: the I/O command path of a set of NVMe queue pairs."""

    def __init__(
        self,
        buf: Buffer,
        kick_fd: int,
        irq_fds: Sequence[int],
        irq_pending: Sequence[int],
        cfs_off: int,
        nr_qids: int,
        namespaces: Sequence[tuple[int, int]],
        latency_ns: int,
        latency_dist: int,
        latency_sigma: float,
        channels: int,
        iops_max: int,
        dev_mbps: int,
        seed: int,
        *,
        group: Engine | None = None,
        error_pct: float = 0.0,
        delay_pct: float = 0.0,
        delay_ns: int = 0,
        drop_pct: float = 0.0,
        fatal_pct: float = 0.0,
        lost_irq_pct: float = 0.0,
        stale_event_idx_pct: float = 0.0,
        timer_slack_ns: int = -1,
    ) -> None: ...
    def run(self) -> None: ...
    def stop(self) -> None: ...
    def wake(self) -> None: ...
    def set_features(
        self,
        coalesce_thr: int,
        coalesce_time_ns: int,
        burst: int,
        wrr: bool,
        weights: tuple[int, int, int],
    ) -> None: ...
    def set_vector(self, iv: int, coalescing_disabled: bool, /) -> None: ...
    def create_cq(
        self,
        qid: int,
        depth: int,
        base: int,
        head_db: int,
        tail_pub: int,
        phase_pub: int,
        iv: int,
        ien: bool,
    ) -> None: ...
    def create_sq(
        self,
        qid: int,
        cqid: int,
        depth: int,
        base: int,
        tail_db: int,
        event_idx: int,
        head_pub: int,
        prio: int,
    ) -> None: ...
    def delete_sq(self, qid: int, /) -> int: ...
    def delete_cq(self, qid: int, /) -> None: ...
    def abort(self, sqid: int, cid: int, /) -> int: ...
    def reset(self) -> None: ...
    def counters(self) -> dict[str, int]: ...

def sq_write_rw(
    buf: Buffer, off: int, opcode: int, cid: int, nsid: int, slba: int, nlb0: int, /
) -> None: ...
def cq_reap(
    buf: Buffer, base: int, head: int, phase: int, depth: int, budget: int, /
) -> tuple[list[tuple[int, int, int, int, int]], int, int]: ...
def service_samples(
    latency_ns: int, latency_dist: int, latency_sigma: float, seed: int, n: int
) -> list[int]: ...
def layout() -> dict[str, int]: ...

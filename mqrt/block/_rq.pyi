"""Type declarations for the C extension ``mqrt.block._rq`` (see ``_rq.c``): a
request's hot steps on the shared pool, ``base`` the byte offset of its line."""

from typing_extensions import Buffer

OFF_START: int
OFF_STATUS: int
OFF_FLAGS: int
OFF_IO_START: int
OFF_Q: int
ALLOCATED: int
STATE_MASK: int
IN_FLIGHT: int
GEN_SHIFT: int
RQF_REQUEUED: int
SECTOR_SHIFT: int

#: (info, state, cpu, hctx, q, rq_flags, now); info: (op, nr_bios, bytes, start, issue,
#: status), or None when the caller works the issue out
Ended = tuple[tuple[int, int, int, int, int, int] | None, int, int, int, int, int, int]

class RqLines:
    def __init__(self, buffer: Buffer) -> None: ...
    def setup(
        self,
        base: int,
        start: int,
        sector: int,
        nr_sectors: int,
        nr_segs: int,
        cpu: int,
        hctx: int,
        q: int,
        op: int,
        rq_flags: int,
        /,
    ) -> int | None: ...
    def start(self, base: int, timeout_ns: int, now: int = 0, /) -> int | None: ...
    def end(self, base: int, now: int = 0, status: int | None = None, /) -> Ended | int | None: ...
    def release(self) -> None: ...

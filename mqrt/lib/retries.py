"""Retry accounting: how many times this process went round a retry loop (a lost
cmpxchg, a wake-up that has to look again, an allocation that folds and searches
again), kept in a shared counter the runtime's livelock detector reads.

A retry loop that cannot end spins with the CPU busy and nothing done; the detector
(:mod:`mqrt.runtime.detectors`) tells it from a busy CPU by this count against the
run's I/O counters.  Only the retry branch counts: a loop that succeeds at once costs
nothing more than before, and a process that installed no counter (a test's, the
owner's) pays one module attribute load per retry.

Memory ordering: the counter is this process's own (a CPU's stats line, see
``workers/cpu.py``): written by it only, with plain 64-bit stores of a value it keeps
in a local; the runtime reads it with plain loads and may see it a moment late, which
a decision taken over several looks does not mind.
"""

from __future__ import annotations

from mqrt.lib._atomic import AtomicView

#: Where this process counts: (view, offset of its u64), or None (not counted).
_counter: tuple[AtomicView, int] | None = None
_n = 0


def install(a: AtomicView, off: int) -> None:
    """Count this process's retries in the u64 at ``off`` (from 0)."""
    global _counter, _n
    _n = 0
    a.set(off, 0)
    _counter = (a, off)


def retry() -> None:
    """Called in a retry branch: one more time round."""
    global _n
    c = _counter
    if c is not None:
        _n += 1
        c[0].set(c[1], _n)

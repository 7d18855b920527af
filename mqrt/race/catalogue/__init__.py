"""The catalogue of historical sbitmap, tag and request bugs ``mqrt race`` can switch
back on.

Each entry (:class:`mqrt.race.entry.Bug`) names the kernel commit that fixed the bug,
says what went wrong, and carries the buggy version of *our* function (the port in
:mod:`mqrt.lib.sbitmap` and :mod:`mqrt.block` is the fixed code).  Switching a bug on
replaces that function on its class in the owner process before the CPUs are forked,
so they run the old code; switching it off puts ours back.  A scenario (options of
``mqrt bench``, per-queue jobs, injection points, sysfs writes during the run) is what
provokes it on this kind of host, and the detectors of :mod:`mqrt.runtime.detectors`
say when it happened.  One module per part of the code the bugs lived in.
"""

from __future__ import annotations

from mqrt.race.catalogue import (
    active_queues,
    alloc,
    livelock,
    nr_active,
    requests,
    wake_batch,
    wake_up,
)
from mqrt.race.entry import Bug

CATALOGUE: dict[str, Bug] = {
    b.name: b
    for module in (wake_batch, alloc, wake_up, livelock, active_queues, nr_active, requests)
    for b in module.ENTRIES
}

"""mqrt: the Linux blk-mq block layer rebuilt in user space, on real processes.

Each emulated CPU is a pinned worker process; software and hardware dispatch queues
live in shared memory; tags come from a port of lib/sbitmap.c running on real atomics
(:mod:`mqrt.lib._atomic`).  See README.md and docs/ARCHITECTURE.md.
"""

import os as _os

# numpy's OpenBLAS starts a thread pool when it is loaded.  mqrt never multiplies
# matrices, and a second thread in every process is harmful: a process-directed signal
# (SIGTERM, SIGINT, PDEATHSIG) may be delivered to that thread, and then Python's
# handler only runs once the main thread next executes bytecode -- never, if it is
# blocked in a sleep or a wait.  One thread per process, before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_var, "1")

__version__ = "0.1.0"

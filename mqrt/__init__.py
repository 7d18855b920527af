"""mqrt: the Linux blk-mq block layer rebuilt in user space, on real processes.

Each emulated CPU is a pinned worker process; hardware dispatch queues are lock-free
rings in shared memory; tags come from a port of lib/sbitmap.c running on real atomics
(:mod:`mqrt._atomic`).  See README.md and docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"

"""Word-level machinery with no block-layer knowledge: what the kernel keeps in ``lib/``
and ``kernel/``.

``_atomic`` (atomics and bitops on shared memory, C), ``shm`` (the arena and its
declared layout), ``ring`` (SPSC/MPSC rings), ``wait`` (wait queues whose sleepers are
processes), ``sbitmap`` (``lib/sbitmap.c``), ``trace`` (per-CPU event rings),
``inject`` (seeded delays at named points), ``knobs`` (typed, documented options),
``proc`` (what every child process does first) and ``wire`` (the control messages
between the runtime, the CPUs and the device).  Nothing here imports ``mqrt.block``.
"""

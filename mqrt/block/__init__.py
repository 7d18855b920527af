"""The block layer: what the kernel keeps in ``block/`` and ``include/linux/blk-mq.h``.

Tag sets and queues (``blk_mq_setup``), the data path (``blk_mq``: allocation, plugging, issue,
hw queue runs; ``blk_mq_complete``: start, complete, requeue, end, timeouts), tags and fair
share (``blk_mq_tag``), dispatch (``blk_mq_sched``), CPU -> hctx maps
(``blk_mq_cpumap``), introspection (``blk_mq_debugfs``), latency statistics
(``blk_stat``), the pre-blk-mq request paths (``blk_mq_modes``), and the declared
types and shared-memory layouts (``blk_mq_types``, ``blk_mq_structs``).  Imports only
``mqrt.lib``.
"""

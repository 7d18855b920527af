"""The owner of a run: the arena, the CPU and device processes, their control messages,
the online detectors, the results and the cleanup on every exit path.

Imports the block layer and the CPU worker (``mqrt.workers``), never a driver: the
command that builds the run hands it one as a :class:`~mqrt.block.blk_mq_types.BlkMqOps`
(``RunSpec.setup``).  Imported only by the commands.
"""

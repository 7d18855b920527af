"""The owner of a run: the arena, the CPU and device processes, their control messages,
the online detectors, the results and the cleanup on every exit path.

Imports the block layer, the drivers (``mqrt.device``) and the CPU worker
(``mqrt.workers``); imported only by the commands.
"""

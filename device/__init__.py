"""Emulated devices (installed as ``mqrt.device``).

The null_blk and nvme drivers (each a :class:`~mqrt.block.blk_mq_types.BlkMqOps`)
and the NVMe controller process (:mod:`mqrt.device.controller`, with its admin command
set, service model and wire formats).  This package builds on :mod:`mqrt.lib` and :mod:`mqrt.block`,
which never import it: the commands pick a driver by name, and the runtime reaches it
only through ``BlkMqOps`` (the device process through ``BlkMqOps.start_device``).
"""

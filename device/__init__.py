"""Emulated devices (installed as ``mqrt.device``).

The null_blk and nvme drivers (each a :class:`~mqrt.block.blk_mq_types.BlkMqOps`)
and the NVMe controller process.  This package imports :mod:`mqrt`, never the
reverse: the commands pick a driver by name, and the runtime reaches it only through
``BlkMqOps`` (the device process through ``BlkMqOps.start_device``).
"""

"""Emulated devices (installed as ``mqrt.device``).

The NVMe controller process and the null_blk-style driver ops.  This package imports
:mod:`mqrt`, never the reverse (the runtime starts the device by module path).
"""

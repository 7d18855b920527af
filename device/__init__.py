"""Emulated devices (installed as ``mqrt.device``).

The null_blk driver (:mod:`mqrt.device.null_blk`), the NVMe controller process
(:mod:`mqrt.device.controller`, with its service model and wire formats) and the nvme
driver in front of it (:mod:`mqrt.device.nvme`).  This package builds on
:mod:`mqrt.lib` and :mod:`mqrt.block`, which never import it; the runtime starts the
device.
"""

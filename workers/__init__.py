"""CPU worker processes (installed as ``mqrt.workers``).

One process per emulated CPU, pinned to a host core and owning its software staging
queue (``blk_mq_ctx``): :mod:`mqrt.workers.cpu` is its event loop, and
:mod:`mqrt.workers.ioengine` the fio-like job it runs.  This package builds on
:mod:`mqrt.lib` and :mod:`mqrt.block`, which never import it; the runtime starts the
workers.
"""

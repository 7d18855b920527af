"""CPU worker processes (installed as ``mqrt.workers``).

One process per emulated CPU, pinned to a host core and owning its software staging
queue (``blk_mq_ctx``).  Filled in by the blk-mq core work; this package imports
:mod:`mqrt`, never the reverse (the runtime starts workers by module path).
"""

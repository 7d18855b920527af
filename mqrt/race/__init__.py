"""``mqrt race``: the catalogue of historical sbitmap/blk-mq bugs (``bugs``) and the
command that reproduces them (``main``)."""

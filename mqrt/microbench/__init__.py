"""``mqrt microbench``: the primitives and the hot path measured beside their peers."""

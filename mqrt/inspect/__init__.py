"""``mqrt inspect``: the runs of this user on this host (``main``)."""

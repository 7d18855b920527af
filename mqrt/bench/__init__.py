"""``mqrt bench``: options and sweeps (``main``, ``sweep``), fio job files (``jobfile``),
and the fio-shaped JSON and text output (``report``, ``text``)."""

"""``python -m mqrt``: the same as the ``mqrt`` console script."""

from mqrt.cli import main

raise SystemExit(main())

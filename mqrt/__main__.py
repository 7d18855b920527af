"""``python -m mqrt``: the same as the ``mqrt`` console script."""

from mqrt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

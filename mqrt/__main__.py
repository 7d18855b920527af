"""``python -m mqrt``: the same as the ``mqrt`` console script."""

from mqrt._entry import main

if __name__ == "__main__":
    raise SystemExit(main())

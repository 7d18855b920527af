"""Errors a user sees as one line: the leaf every command imports, importing nothing.

The CLI turns a :class:`UsageError` into ``mqrt: error: ...`` and exit status 2; the
commands raise it, so they never import the CLI (dependencies point one way:
``cli`` -> commands -> ``errors``).
"""


class UsageError(Exception):
    """A user mistake: reported as one line naming the field, exit status 2."""

"""The error every whole-input problem raises, whichever check finds it."""

from __future__ import annotations


class InputError(ValueError):
    """An input that cannot be used as a whole: a broken manifest, a missing shard, wrong
    column types, duplicate or unsafe ids, no rows. The message names the problem (and
    some offending ids or files); the CLI prints it and exits 2, with no traceback."""

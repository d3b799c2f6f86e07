"""The one exception type for problems the user can fix (bad input, bad flags, missing model)."""


class LoratuneError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits with ``exit_code``."""

    exit_code = 2
    """2: bad input or usage. Subclasses for a run that failed for a reason outside the input use 1."""

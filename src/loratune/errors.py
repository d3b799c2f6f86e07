"""The one exception type for problems the user can fix (bad input, bad flags, missing model)."""


class LoratuneError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits with code 2."""

"""The one exception type users see for bad input: the CLI prints its message and exits non-zero."""


class MoguError(Exception):
    """A user-facing error: bad input, a mismatched checkpoint, an unsupported model."""

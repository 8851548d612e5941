"""The one exception type the CLI turns into a single line and a non-zero exit."""


class EamError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""

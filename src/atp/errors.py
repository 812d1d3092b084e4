class ATPError(Exception):
    """A user-facing error: the CLI prints its message and exits non-zero, with no traceback."""

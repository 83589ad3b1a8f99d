"""Errors a user can act on: each names the problem and the fix."""


class KvSurgeonError(Exception):
    """Base class for user-facing errors; the CLI prints the message without a traceback."""


class KvSurgeonWarning(UserWarning):
    """A result the user may not want (it still runs); the CLI prints it as one "warning:" line."""

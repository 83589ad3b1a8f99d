"""Errors a user can act on: each names the problem and the fix."""


class KvSurgeonError(Exception):
    """Base class for user-facing errors; the CLI prints the message without a traceback."""

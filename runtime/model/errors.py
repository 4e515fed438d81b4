"""The one error type users see: a single line that says what is wrong and how to fix it."""


class CoftError(Exception):
    """Raised for bad input; the CLI prints it as one line and exits non-zero."""


class NoRoom(CoftError):
    """Not written for want of disk space (or of space kept for verdicts); worth trying again later."""

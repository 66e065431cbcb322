"""User-facing errors: one exception type that the CLI turns into a one-paragraph message and exit 2.

Every module raises `UsageError` for problems the user can fix (bad input, impossible combination,
missing backend); anything else is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """A problem with the user's input or environment, with a message that names the fix."""

    exit_code = 2


class MethodNotAvailable(UsageError):
    """A method that exists in the command line but cannot run here (e.g. int4 without a backend)."""

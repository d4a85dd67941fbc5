"""The error type the console scripts print without a traceback."""


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 1."""

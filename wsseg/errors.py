"""The two kinds of failure the command line distinguishes.

`UserError` is something the user can fix (a config key, a data file, a command-line
flag): the CLI prints its message as one line and exits with code 2. `RunFailure` is a
failure at run time that is not the input's fault (a NaN loss, a full disk): exit 1.
Messages name the file or key and say what to do.
"""


class UserError(Exception):
    """Bad usage, config or data. Exit code 2."""


class RunFailure(Exception):
    """A run-time failure. Exit code 1."""

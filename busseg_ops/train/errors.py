"""Errors a user causes (a bad path, file, value or combination of flags). The `busseg` command prints
the message on one line and exits with status 2; `--debug` shows the traceback instead."""


class UserError(Exception):
    """A mistake in the user's input; the message names the flag or file and fits on one line."""

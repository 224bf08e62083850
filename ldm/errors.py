"""The project's user-facing errors: a problem with what the user gave (flag, file, config, dataset, device).

Front ends (``main.py``, ``scripts/*.py``) print a `UserError` as one line and exit with status 2; any other
exception is a bug in our code and keeps its traceback. Each subclass keeps the built-in base it always had
(``ValueError``, ``FileNotFoundError``, ``RuntimeError``) so callers that caught those still do.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error caused by the user's input rather than by the code."""


class UsageError(UserError, ValueError):
    """A bad command-line value, path or combination of options."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named (config, checkpoint, image) does not exist."""

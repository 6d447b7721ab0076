"""Errors that are the user's to fix: a missing input, a bad option value, weights that cannot be had.

The ``age`` command prints these in a line or two, with exit status 2 and no traceback; anything else
is a bug and keeps its traceback. Each class also derives from the built-in error a caller would catch
(``ValueError``, ``FileNotFoundError``), so library code can be used without knowing this module.

>>> try:
...     raise MissingInput("--data runs/x: no such file or folder")
... except FileNotFoundError as e:
...     print(type(e).__name__, isinstance(e, UserError))
MissingInput True
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave; its message names the item and the way out."""


class InvalidInput(UserError, ValueError):
    """A value, file or option that exists but cannot be used as given."""


class MissingInput(UserError, FileNotFoundError):
    """A file, folder, checkpoint or URI that is not there."""


class MissingDependency(UserError, ImportError):
    """A package that a feature needs and that is not installed; the message says how to install it."""


class WeightsUnavailable(UserError, RuntimeError):
    """Pretrained weights that neither the hub nor a local file can provide; ``reason`` says why in a phrase."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason

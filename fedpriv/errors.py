"""Exceptions whose message a hospital's data scientist or IT administrator can act on.

The CLI turns any :class:`FedprivError` into one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "DeviceError",
    "FedprivError",
    "RunDirectoryError",
]


class FedprivError(Exception):
    """Base class: the message says what is wrong and what to do about it."""


class ConfigError(FedprivError, ValueError):
    """A run setting is unknown, mistyped or out of range."""


class DataError(FedprivError, ValueError):
    """A dataset cannot be loaded or cannot be split as asked."""


class DeviceError(FedprivError, RuntimeError):
    """The requested compute device is not available."""


class RunDirectoryError(FedprivError, RuntimeError):
    """A run directory is missing, incomplete or cannot be resumed."""

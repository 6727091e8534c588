"""Exceptions that mean "the user asked for something we cannot do" (CLI exit code 2)."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: bad config, missing or unreadable data, a refused file."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value; the message names the field and the allowed values."""


class DataError(UserError, ValueError):
    """Data that cannot be used as given (wrong layout, corrupt index file, empty folder)."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A data path that does not exist."""

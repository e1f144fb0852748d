"""The one exception type of the data package."""

from __future__ import annotations

from kha_train.config import ConfigError


class DataError(ConfigError):
    """Bad data input (a dataset, shard, index, tokenizer or source), with a message that names
    the file and the fix. A :class:`ConfigError` so the CLI prints it as one ``error:`` line."""

"""The one exception every config problem raises."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem, with a message that names the key and how to fix it."""

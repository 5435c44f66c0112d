"""Errors a user can cause. The CLI turns them into one sentence and a non-zero exit."""


class MinimoeError(Exception):
    """A mistake in the user's input: a bad argument, file, config or checkpoint."""


class ConfigError(MinimoeError):
    """An invalid or unknown configuration value; the message names the field."""

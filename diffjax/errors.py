"""The errors a user can fix, each raised with a one-line message that says how.

``diffjax.main`` prints them as ``diffjax: error: ...`` and exits with status 2. Each layer
raises its own: ConfigError (a config value), plus ``checkpoint.CheckpointError``,
``data.DataError`` and ``evaluation.metrics.MetricError`` beside the code they guard.
"""


class ConfigError(ValueError):
    """A config value is invalid; the message says which and how to fix it."""

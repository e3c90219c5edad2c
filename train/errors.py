"""The error a training run's bad input raises, importable without torch (the command line and the experiment
runner catch it before anything heavy is imported)."""


class ConfigError(ValueError):
    """Bad input found before any work starts."""

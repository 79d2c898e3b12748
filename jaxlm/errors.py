"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class ConfigError(ValueError):
  """Bad input from the user: a config value, an override, a path, a mesh that does not fit."""

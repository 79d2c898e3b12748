"""User-facing errors: the CLI prints them as one line and exits with code 2 (bad input) or 1
(a run that cannot go on)."""


class ConfigError(ValueError):
  """Bad input from the user: a config value, an override, a path, a mesh that does not fit."""


class TrainingError(RuntimeError):
  """A run that cannot go on, through no fault of its inputs (e.g. a non-finite loss with
  `train.nonfinite="stop"`): one line naming the step, exit code 1."""

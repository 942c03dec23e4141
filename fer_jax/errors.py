"""The errors that are the user's to fix: main.py reports them in one line,
without a traceback (a bug still shows its traceback)."""


class UsageError(ValueError):
  """A mistake in the command line, the config or the workdir."""


class DataError(ValueError):
  """Bad input data: the message names the file, row or value."""

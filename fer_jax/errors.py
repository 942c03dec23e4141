"""The errors that are the user's to fix: main.py reports them in one line,
without a traceback (a bug still shows its traceback)."""


class UsageError(ValueError):
  """A mistake in the command line, the config or the workdir."""


class DataError(ValueError):
  """Bad input data: the message names the file, row or value."""


def describe(error: BaseException, limit: int = 300) -> str:
  """The error's type and the start of its message, for a log line."""
  return f'{type(error).__name__}: {str(error)[:limit]}'

"""The error a user can act on: a file or setting that cannot be used, reported by the entry
point as one `dwa_jax: error:` line with exit status 2."""


class InputError(ValueError):
  """A file or setting the user gave (or a file an earlier run left) cannot be used: reported as
  one `dwa_jax: error:` line, exit status 2. Subclasses: data.DataError, teacher_store.TeacherError,
  convert.StateDictError."""


def describe_error(error: BaseException) -> str:
  """An exception as a short phrase: its type and the first line of its message."""
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__

"""Command-line plumbing of the entry point (dwa_jax/main.py): the work directory (created,
checked writable, locked against a second run), bad flags and config files as one
`dwa_jax: error:` line with exit status 2, and Ctrl-C as one line saying how to resume."""

import _thread
import contextlib
import fcntl
import os
import pathlib
import re
import secrets
import sys
import threading

from absl import flags
import ml_collections
from tqdm import auto as tqdm

from dwa_jax import errors, files

FLAGS = flags.FLAGS


def prepare_workdir(workdir: str):
  """Creates the work directory (local, or gs:// and the other stores of etils.epath) and checks
  it is writable before any work starts."""
  path = files.as_path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    # One probe file per process, under a random name: the processes of a multi-process run
    # share the workdir, and processes on different hosts may share a pid.
    probe = path / f".write_check.{secrets.token_hex(8)}"
    files.write_bytes(probe, b"ok")
    probe.unlink()
  except OSError as e:
    raise PermissionError(f"workdir {workdir!r} is not writable: "
                          f"{e.strerror or errors.describe_error(e)}") from None
  except ImportError as e:  # gs:// and the like without their file-system library
    raise errors.InputError(f"workdir {workdir!r} cannot be opened here: {e}") from None
  return path


class WorkdirInUse(OSError):
  """Another run holds the work directory."""


@contextlib.contextmanager
def workdir_lock(path):
  """Holds the kernel's exclusive lock (flock) on the work directory for the run, so a second run
  on it refuses; a killed run's lock goes with it. Without flock (gs://, some network file
  systems) the run goes unguarded."""
  if files.is_remote(path):
    yield
    return
  fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirInUse(f"workdir {os.fspath(path)!r} is in use by another dwa_jax run; wait for "
                         "it to finish, or stop it, then rerun this command") from None
    except OSError:
      pass  # no flock here (some network file systems)
    yield
  finally:
    os.close(fd)  # releases the lock


def report(message: str) -> None:
  """One `dwa_jax: ...` line on stderr, after a line break and with open progress bars closed
  (they end their line with a carriage return)."""
  for bar in list(getattr(tqdm.tqdm, "_instances", ())):
    bar.close()
  print(f"\ndwa_jax: {message}", file=sys.stderr, flush=True)


def interrupted_message(workdir) -> str:
  return (f"interrupted; rerun the same command to resume from the progress saved in "
          f"{os.fspath(workdir)!r}")


INTERRUPT_GRACE_S = 10.0


def _in_finalizer(frame) -> bool:
  while frame is not None:
    if frame.f_code.co_name == "__del__" or frame.f_code.co_name.endswith("gc_callback"):
      return True
    frame = frame.f_back
  return False


def on_sigint(workdir: str):
  """Ctrl-C raises KeyboardInterrupt in the main thread (`execute` reports it); a watchdog
  ends the process anyway if unwinding blocks in a native wait for more than INTERRUPT_GRACE_S."""
  def leave():
    print(f"\ndwa_jax: {interrupted_message(workdir)}", file=sys.stderr, flush=True)
    os._exit(130)  # pylint: disable=protected-access

  def handler(signum, frame):
    del signum
    if _in_finalizer(frame):
      # An exception raised in a garbage-collector callback or a __del__ is swallowed (Python
      # prints "Exception ignored ..."): deliver the interrupt again a moment later.
      threading.Timer(0.05, _thread.interrupt_main).start()
      return
    watchdog = threading.Timer(INTERRUPT_GRACE_S, leave)
    watchdog.daemon = True
    watchdog.start()
    raise KeyboardInterrupt
  return handler


def quiet_closed_loop(default_hook):
  """An unraisable-exception hook that drops 'Event loop is closed' errors (tensorstore reads of
  a failed Orbax restore finishing after Orbax closed their loop) and passes on the rest."""
  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    default_hook(unraisable)
  return hook


def _flag_error(message: str):
  print(f"dwa_jax: error: {message}", file=sys.stderr)
  sys.exit(2)


def _unknown_field(argv, error: Exception) -> str | None:
  """ml_collections' "no such field" error as one line naming the flag and the nearest field;
  None when no --config.<field> flag caused it."""
  while isinstance(error, BaseException) and error.args:  # AttributeError(KeyError(text))
    error = error.args[0]
  text = str(error)
  key = re.match(r"""['"]*([^'"\n]+)""", text)
  key = key.group(1) if key else text
  flag = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")
               and key in a.split("=", 1)[0][len("--config."):].split(".")), None)
  if flag is None:
    return None
  message = f"{flag}: the config has no field {key!r}"
  nearest = re.search(r'Did you mean "([^"]+)"', text)
  if nearest:
    parts = flag.split(".")
    parts[parts.index(key)] = nearest.group(1)
    message += f"; did you mean {'.'.join(parts)}?"
  return message


def _config_file(argv) -> str:
  return next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "")


def _bad_config_file(argv, error: BaseException):
  """A config file that cannot be loaded (syntax error, no get_config, get_config raising)."""
  lines = [line.strip() for line in str(error).splitlines()]
  errno = next((line for line in lines if "Errno" in line), None)  # a file that is not there
  detail = errno or errors.describe_error(error)
  _flag_error(f"--config={_config_file(argv)}: cannot load the config file: {detail}")


def packaged_config(path: str) -> str:
  """`configs/<name>.py` that does not exist from here: the copy installed with the package
  (dwa_jax.configs), so README and notebook commands work from any directory; else `path`."""
  spec, colon, rest = path.partition(":")  # config_flags' 'file.py:argument' form
  given = pathlib.Path(spec)
  if given.exists() or given.parent.name != "configs":
    return path
  import importlib.resources  # pylint: disable=g-import-not-at-top
  packaged = importlib.resources.files("dwa_jax.configs") / given.name
  return f"{packaged}{colon}{rest}" if packaged.is_file() else path


def parse_flags(argv):
  """absl's flag parsing, with a bad flag, config field or config file reported as one line,
  exit status 2. config_flags loads the config file (runs its get_config) while parsing."""
  argv = [f"--config={packaged_config(a.split('=', 1)[1])}" if a.startswith("--config=") else a
          for a in argv]
  try:
    remaining = FLAGS(argv)
  except flags.Error as e:  # a value of the wrong type, a missing required flag, ...
    if "--config must have a value other than None" in str(e) and _config_file(argv):
      _flag_error(f"--config={_config_file(argv)}: get_config() returned None (a missing "
                  "return statement?)")
    if "Traceback" in str(e):  # get_config raised: config_flags quotes the whole traceback
      last = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
      _flag_error(f"--config={_config_file(argv)}: cannot load the config file: {last}")
    _flag_error(str(e))
  except (AttributeError, KeyError) as e:  # ml_collections: a config field that does not exist
    _flag_error(_unknown_field(argv, e) or _bad_config_file(argv, e))
  except Exception as e:  # pylint: disable=broad-except  (whatever the config file raises)
    _bad_config_file(argv, e)
  try:
    FLAGS.config.keys()  # in case the config file is loaded lazily: report a bad one here
  except Exception as e:  # pylint: disable=broad-except
    _bad_config_file(argv, e)
  if not isinstance(FLAGS.config, ml_collections.ConfigDict):
    _flag_error(f"--config={_config_file(argv)}: get_config() returned a "
                f"{type(FLAGS.config).__name__}, not an ml_collections.ConfigDict (start from "
                "dwa_jax.presets.base_config())")
  return remaining

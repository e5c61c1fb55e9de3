"""What a benchmark's results JSON records about how it was made (`provenance`): the code (git
commit, and the files that differed from it), the command, the date, the versions and the host,
so a figure can be traced to its code, and is recognisably stale once that code changes."""

import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30,
                         check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.rstrip()


def command(argv=None) -> str:
  """The command line as typed from the repository root: `python <script relative path> args`."""
  argv = list(sys.argv if argv is None else argv)
  if argv:
    script = pathlib.Path(argv[0])
    try:
      argv[0] = os.fspath(script.resolve().relative_to(REPO))
    except ValueError:
      argv[0] = script.name
  return shlex.join(["python", *argv])


def _code_state() -> dict:
  changed = _git("status", "--porcelain", "--untracked-files=no")
  return {"commit": (_git("rev-parse", "HEAD") or "").strip() or None,
          "uncommitted": sorted(line[3:] for line in changed.splitlines()) if changed else []}


# The code a run measures is the code its process imported: the checkout's state when this module
# is first imported (a benchmark imports it as it starts), not when its results are written,
# which commits made during a long run would change.
AT_START = _code_state()


def record(argv=None) -> dict:
  """`provenance` for a results JSON: `commit` (HEAD when the run started; None outside a git
  checkout), `uncommitted` (tracked files that differed from it then: the measured code is the
  commit plus these changes, committed with the results), `command`, `date`, versions and
  host."""
  import jax  # pylint: disable=g-import-not-at-top
  return {
      **AT_START,
      "command": command(argv),
      "date": time.strftime("%Y-%m-%d"),
      "jax": jax.__version__, "jaxlib": _version("jaxlib"),
      "backend": jax.default_backend(),
      "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
               "python": platform.python_version()},
  }


def _version(package: str) -> str | None:
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None

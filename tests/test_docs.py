"""The command blocks of README.md and docs/*.md run as written.

A `bash` block runs, command by command and document by document, in one shared directory, with
SHRINK appended to every `dwa_jax.main` command (it only makes the run smaller). A block whose
first line is a `# needs ...` comment asks for data or hardware this machine lacks: each of its
commands is parsed instead (the config file loads, every `--config.X` exists, takes the value
and passes validation; every other flag is one the program defines). Install steps are checked
against pyproject.toml, and the test command against .ci/run. `python` blocks run as scripts.
"""

import dataclasses
import pathlib
import re
import shlex
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from dwa_jax import cli
from dwa_jax import main as main_lib
from dwa_jax import presets

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHRINK = ["--config.teacher.epochs=1", "--config.recover.iterations=2",
          "--config.recover.adjust_steps=1", "--config.relabel.epochs=1",
          "--config.relabel.seeds=(0,)", "--config.ipc=1"]
PYTHON_NAMES = ("python", "python3", ".venv/bin/python")


@dataclasses.dataclass
class Block:
  document: str
  line: int
  language: str
  text: str

  @property
  def needs(self) -> str | None:
    first = self.text.lstrip().splitlines()[0] if self.text.strip() else ""
    return first[len("# needs"):].strip() if first.startswith("# needs") else None

  def commands(self) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", self.text)
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def blocks(path: pathlib.Path) -> list[Block]:
  found = []
  for match in re.finditer(r"^( *)```(\w+)[^\n]*\n(.*?)^\1```", path.read_text(), re.M | re.S):
    indent, language, body = match.groups()
    text = "\n".join(line[len(indent):] for line in body.splitlines())
    line = path.read_text()[:match.start()].count("\n") + 1
    found.append(Block(path.relative_to(REPO).as_posix(), line, language, text))
  return found


ALL_BLOCKS = [b for doc in DOCUMENTS for b in blocks(doc) if b.language in ("bash", "python")]


def program(argv: list[str]) -> str:
  """'main', 'convert', 'pytest', 'benchmarks/<name>.py' or 'pip'/'venv' for one command."""
  if argv[0].endswith("pip") or argv[:3] == [argv[0], "-m", "pip"]:
    return "pip"
  if argv[0] not in PYTHON_NAMES:
    raise AssertionError(f"unknown program {argv[0]!r} (a block runs python commands only)")
  if argv[1:3] == ["-m", "venv"]:
    return "venv"
  if argv[1] == "-m":
    return {"dwa_jax.main": "main", "dwa_jax.convert": "convert", "pytest": "pytest"}[argv[2]]
  return argv[1]


def check_main_flags(args: list[str]) -> None:
  """Parses `dwa_jax.main`'s flags as the program does, without running: the config file loads,
  every --config.X exists and takes its value, the config validates, the other flags exist."""
  known = set(main_lib.FLAGS) - {"config"}
  for arg in args:
    name = arg.split("=", 1)[0].lstrip("-")
    if not name.startswith("config") and name not in known:
      raise AssertionError(f"--{name} is not a flag of dwa_jax.main")
  config_args = [a for a in args if a.startswith("--config")]
  config_args = ["prog", *(f"--config={cli.packaged_config(a.split('=', 1)[1])}"
                           if a.startswith("--config=") else a for a in config_args)]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=config_args)
  values(config_args)
  presets.resolve(values.config)


def check_script_flags(argv: list[str], cwd) -> None:
  """A script's flags (other than --config.X, checked by check_main_flags) appear in its --help."""
  head = argv[1:3] if argv[1] == "-m" else argv[1:2]
  out = subprocess.run([sys.executable, *head, "--help"], cwd=cwd, capture_output=True,
                       text=True, timeout=300)
  assert "--" in out.stdout, out.stderr[-2000:]  # (absl's --help exits with status 1)
  args = argv[1 + len(head):]
  for arg in args:
    name = arg.split("=", 1)[0]
    if name.startswith("--") and not name.startswith("--config"):
      assert re.search(rf"{re.escape(name)}\b", out.stdout), f"{name} is not a flag of {head}"
  config_args = [a for a in args if a.startswith("--config")]
  if config_args and not any(a.startswith("--config=") for a in config_args):
    default = re.search(r"--config:.*?\(default: '([^']+)'\)", out.stdout, re.S)
    assert default, f"{head}: --config.X given, but no --config and no default config"
    config_args.insert(0, f"--config={default.group(1)}")
  if config_args:
    check_main_flags(config_args)


def check_install(argv: list[str]) -> None:
  text = (REPO / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; we support 3.10)
  section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
  extras = set(re.findall(r"^(\w+) = \[", section, re.M))
  for arg in argv:
    match = re.fullmatch(r"\.\[([\w,]+)\]", arg)
    if match:
      for extra in match.group(1).split(","):
        assert extra in extras, f"pyproject.toml has no extra {extra!r}"


def check_test_command(argv: list[str]) -> None:
  """The README's test command is the one CI runs."""
  ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert shlex.split(ci)[1:] == argv[1:], f"README runs {shlex.join(argv)}, .ci/run {ci}"


def run_command(command: str, needs: str | None, cwd: pathlib.Path) -> None:
  for part in command.split(" && "):
    argv = shlex.split(part)
    kind = program(argv)
    if kind == "venv":
      continue
    if kind == "pip":
      check_install(argv)
      continue
    if kind == "pytest":
      check_test_command(argv)  # the suite itself: not run again from inside it
      continue
    args = argv[3:] if kind in ("main", "convert") else argv[2:]
    if kind == "main":
      check_main_flags(args)
    elif needs is not None or kind != "convert":
      assert needs is not None, f"{part}: a benchmark block must say what it needs"
      check_script_flags(argv, REPO)
    if needs is not None:
      continue
    extra = SHRINK if kind == "main" else []
    proc = subprocess.run([sys.executable, *argv[1:], *extra], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{part}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  return tmp_path_factory.mktemp("docs")


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: f"{b.document}:{b.line}")
def test_block_runs_as_written(block, shared):
  if block.language == "python":
    proc = subprocess.run([sys.executable, "-c", block.text], cwd=shared, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return
  for command in block.commands():
    run_command(command, block.needs, shared)


def test_every_document_is_covered():
  documents = {b.document for b in ALL_BLOCKS}
  assert "README.md" in documents and len(ALL_BLOCKS) >= 8
  assert sum(b.needs is None for b in ALL_BLOCKS) >= 4  # blocks that really run


@pytest.mark.parametrize("broken", [
    "--config.recover.iteratons=3", "--config=configs/demo_digitz.py", "--config.ipc=two",
    "--config.relabel.seeds=()",
])
def test_a_broken_flag_in_a_readme_block_fails(broken):
  demo = next(c for b in ALL_BLOCKS if b.document == "README.md" for c in b.commands()
              if "configs/demo_digits.py" in c and "pip install" in c)
  argv = shlex.split(demo.split(" && ")[-1])
  name = broken.split("=")[0]
  args = [a for a in argv[3:] if a.split("=")[0] != name] + [broken]
  with pytest.raises((AssertionError, flags.Error, AttributeError, KeyError, ValueError,
                      FileNotFoundError, OSError)):
    check_main_flags(args)


def test_release_files_agree():
  """LICENSE is the Apache-2.0 text that pyproject.toml names; one version in pyproject.toml,
  `dwa_jax.__version__`, CITATION.cff and the CHANGELOG's first entry."""
  import dwa_jax  # pylint: disable=g-import-not-at-top
  project = (REPO / "pyproject.toml").read_text()
  version = re.search(r'^version = "([^"]+)"', project, re.M).group(1)
  assert 'license = {text = "Apache-2.0"}' in project
  licence = (REPO / "LICENSE").read_text()
  assert "Apache License" in licence and "Version 2.0, January 2004" in licence
  assert "END OF TERMS AND CONDITIONS" in licence
  assert dwa_jax.__version__ == version
  citation = (REPO / "CITATION.cff").read_text()
  assert re.search(rf"^version: {re.escape(version)}$", citation, re.M)
  assert re.search(r"^license: Apache-2.0$", citation, re.M)
  assert re.search(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(), re.M).group(1) == version

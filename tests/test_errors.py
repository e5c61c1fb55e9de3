"""Bad input: one clear error line, a non-zero exit, and existing outputs left untouched."""

import hashlib
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import one_dwa_jax_line
from dwa_jax import main as main_lib
from dwa_jax import presets, teacher_store
from dwa_jax.testing import tiny_config as tiny

REPO = pathlib.Path(__file__).resolve().parents[1]




def snapshot(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def npz_data(path, num_classes, size):
  rng = np.random.default_rng(0)
  np.savez(path, images=rng.integers(0, 256, (4 * num_classes, size, size, 1), dtype=np.uint8),
           labels=np.repeat(np.arange(num_classes), 4))
  return f"npz:{path}"


def corrupt_teacher(workdir):
  for f in (workdir / "teacher" / "variables").rglob("*"):
    if f.is_file() and f.stat().st_size > 100:
      f.write_bytes(b"\x00" * 64)


def nan_teacher(workdir):
  model, variables, meta = teacher_store.load_teacher(workdir)
  import jax
  variables = jax.tree.map(lambda v: v * np.nan, variables)
  teacher_store.save_teacher(workdir, variables, meta)


# (name, config overrides, preparation of a COPY of the finished workdir, expected message).
# Missing data, no teacher yet and a corrupt teacher run in the slow suite: tests/test_bad_files.py
# covers each with damaged files of every kind in the default one.
CASES = [
    ("ipc zero", {"ipc": 0}, None, "ipc must be >= 1"),
    ("unknown model", {"teacher.model": "resnet19"}, None, "unknown model 'resnet19'"),
    ("unknown student", {"relabel.student": "vit"}, None, "unknown model 'vit' in relabel.student"),
    ("unknown data set", {"dataset": "mnist2"}, None, "Unknown data set 'mnist2'"),
    pytest.param("missing data", {"dataset": "npz:/nonexistent/d.npz"}, None,
                 "npz data file not found", marks=pytest.mark.slow),
    ("negative coefficient", {"recover.r_bn": -0.01}, None, "recover.r_bn must be >= 0"),
    ("NaN hyper-parameter", {"recover.lr": float("nan")}, None,
     "recover.lr must be a finite number"),
    ("unknown method", {"methods": ("dwa2",)}, None, "unknown method 'dwa2'"),
    ("unknown stage", {"stage": "distill"}, None, "stage must be one of"),
    ("bad augmentation", {"recover.augment": "mixup"}, None, "recover.augment must be one of"),
    ("zero temperature", {"relabel.temperature": 0.0}, None, "relabel.temperature must be > 0"),
    ("ipc above class size", {"ipc": 1000, "stage": "recover"}, None,
     "fewer than the 1000 requested"),
    ("missing teacher checkpoint file", {"teacher.checkpoint": "/nonexistent/resnet.npz",
                                         "stage": "squeeze"}, None, "State dict file not found"),
    ("class count mismatch", {"stage": "recover"}, lambda w: npz_data(w.parent / "c3.npz", 3, 8),
     "has 10 classes but data set"),
    ("image size mismatch", {"stage": "recover"}, lambda w: npz_data(w.parent / "s16.npz", 10, 16),
     "trained on images of shape [8, 8, 1]"),
    ("one class", {"stage": "squeeze"}, lambda w: npz_data(w.parent / "c1.npz", 1, 8),
     "1 class(es); distillation needs at least 2 classes"),
    pytest.param("no teacher yet", {"stage": "recover"}, lambda w: shutil.rmtree(w / "teacher"),
                 "No complete teacher checkpoint", marks=pytest.mark.slow),
    pytest.param("corrupt teacher", {"stage": "recover"}, corrupt_teacher,
                 "Cannot restore the teacher", marks=pytest.mark.slow),
    ("NaN loss during synthesis", {"stage": "recover"}, nan_teacher,
     "non-finite"),
    ("relabel before recover", {"stage": "relabel", "methods": ("random",)}, None,
     "No synthetic set"),
    ("classes per batch", {"stage": "recover", "recover.classes_per_batch": 3}, None,
     "must divide the 10 classes"),
]


def case_id(case) -> str:
  return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("name,overrides,prepare,message", CASES, ids=[case_id(c) for c in CASES])
def test_bad_input(finished, tmp_path, capfd, name, overrides, prepare, message):
  workdir = tmp_path / "w"
  shutil.copytree(finished, workdir)
  config = tiny()
  if prepare is not None:
    dataset = prepare(workdir)
    if isinstance(dataset, str):
      config.dataset = dataset
  before = snapshot(workdir)
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
  capfd.readouterr()
  assert main_lib.execute(config, workdir) == 2, name
  line = one_dwa_jax_line(capfd.readouterr().err)
  assert line.startswith("dwa_jax: error:") and message in line, line
  after = snapshot(workdir)
  assert {k: v for k, v in after.items() if k in before} == before  # nothing overwritten
  assert set(before) <= set(after)                                    # nothing deleted


def test_unwritable_workdir(tmp_path, capfd):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  capfd.readouterr()
  assert main_lib.execute(tiny(), blocker / "workdir") == 2
  assert "is not writable" in one_dwa_jax_line(capfd.readouterr().err)


def test_processes_sharing_a_workdir_can_all_check_it(tmp_path):
  """Multi-process runs check the same workdir at once: their probe files must not collide."""
  code = ("import sys; from dwa_jax.cli import prepare_workdir\n"
          "for _ in range(300): prepare_workdir(sys.argv[1])")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "shared")],
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  for proc in procs:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
  assert not list((tmp_path / "shared").iterdir())


def test_command_line_exit_status_and_single_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "dwa_jax.main", "--config=configs/demo_digits.py",
                         f"--workdir={tmp_path}", "--config.dataset=npz:/nonexistent.npz"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert one_dwa_jax_line(proc.stderr).startswith("dwa_jax: error: npz data file not found")


def test_same_config_and_seed_give_identical_bytes(finished, tmp_path):
  again = tmp_path / "again"
  assert main_lib.execute(tiny(), again) == 0
  # metrics.jsonl and the TensorBoard events hold wall-clock times and Orbax's checkpoint
  # metadata holds timestamps: the teacher is compared by value, every other output by bytes.
  keep = lambda snap: {k: v for k, v in snap.items()
                       if k != "metrics.jsonl" and not k.startswith("teacher/variables/")
                       and not k.startswith("tensorboard/")}
  a, b = keep(snapshot(finished)), keep(snapshot(again))
  assert a == b
  import jax
  leaves = [jax.tree.leaves(teacher_store.load_teacher(w)[1]) for w in (finished, again)]
  for x, y in zip(*leaves):
    np.testing.assert_array_equal(x, y)
  assert any(k.startswith("synthetic/dwa/png/") for k in a) and "results.json" in a


def test_the_relabel_bar_shows_a_loss_that_moves(finished, tmp_path, capsys):
  """KL at a high temperature without the T² factor is around 1e-4: the bar's loss keeps
  significant digits instead of reading 0.000, so the values it shows change."""
  workdir = tmp_path / "again"
  shutil.copytree(finished, workdir)
  c = tiny()
  c.stage, c.relabel.temperature, c.relabel.epochs = "relabel", 30.0, 2
  capsys.readouterr()
  assert main_lib.execute(c, workdir) == 0
  shown = re.findall(r"relabel: [^\r\n]*?loss=([^,\]\s]+)", capsys.readouterr().err)
  assert shown and all(0 < float(v) < 1e-2 for v in shown), shown
  assert len(set(shown)) > 1, shown
  # The demo's caption says what its table shows, under the table and in results.md.
  assert presets.DEMO_CAPTION in (workdir / "results.md").read_text()


@pytest.mark.parametrize("flag,message", [
    ("--config.teacher.epochz=3",
     "--config.teacher.epochz: the config has no field 'epochz'; did you mean --config.teacher.epochs?"),
    ("--config.teachr.lr=0.1",
     "--config.teachr.lr: the config has no field 'teachr'; did you mean --config.teacher.lr?"),
    ("--config.teacher.epochs=abc", "flag --config.teacher.epochs=abc: invalid literal for int()"),
    ("--config.relabel.seeds=(0,x)", "Invalid config: relabel.seeds must be integers >= 0, got ('(0,x)',)"),
    ("--config=configs/nope.py", "--config=configs/nope.py: cannot load the config file: [Errno 2]"),
], ids=["mistyped field", "mistyped section", "wrong type", "seeds not integers", "no config file"])
def test_bad_flags_are_one_line_with_exit_status_2(tmp_path, flag, message):
  args = [flag] if flag.startswith("--config=") else ["--config=configs/demo_digits.py", flag]
  proc = subprocess.run([sys.executable, "-m", "dwa_jax.main", f"--workdir={tmp_path}", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"dwa_jax: error: {message}"), lines[-5:]

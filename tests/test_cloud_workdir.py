"""A gs:// work directory: every file the pipeline writes under the workdir goes through
etils.epath. Here epath's own test double (`epath.testing.mock_epath`) serves gs://bucket/... from a
local folder, so any write that bypassed epath (open(), os.replace, pathlib) would land in a
relative folder named 'gs:' under the current directory instead, and the tests check that none
does. The object-store branches of dwa_jax.files (upload instead of rename, rewrite instead of
append, a local copy for row-by-row reading) run for real; Orbax's own gs:// support (tensorstore)
is not exercised here."""

import importlib.util
import json
import os

import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing

from dwa_jax import files, metrics_log, progress, store
from dwa_jax import main as main_lib
from dwa_jax.synthesis import BatchState  # noqa: F401  (progress's types import cleanly)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs://bucket/... served from tmp_path/store/bucket/...; the test runs in tmp_path/cwd."""
  store = tmp_path / "store"
  store.mkdir()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setattr(files.tempfile, "tempdir", os.fspath(tmp_path / "local_tmp"))
  (tmp_path / "local_tmp").mkdir()

  def local(p):
    text = os.fspath(p) if isinstance(p, (str, os.PathLike)) else p
    if isinstance(text, str) and text.startswith("gs://"):
      return os.fspath(store / text[len("gs://"):])
    return p

  def mapped(original, path, *args, **kwargs):
    return original(local(path), *[local(a) for a in args], **kwargs)

  names = ("copy", "exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open", "remove",
           "rename", "replace", "rmtree", "stat", "walk")
  with epath_testing.mock_epath(**{name: mapped for name in names}):
    yield store
  assert not any(cwd.iterdir()), f"a write bypassed epath: {list(cwd.rglob('*'))}"


def test_files_layer_on_an_object_store(bucket):
  root = "gs://bucket/run"
  assert files.is_remote(root) and not files.is_remote("/tmp/x")
  files.write_json(f"{root}/a.json", {"x": 1})
  assert files.read_json(f"{root}/a.json") == {"x": 1}
  assert json.loads((bucket / "bucket/run/a.json").read_text()) == {"x": 1}

  x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
  files.save_npz(f"{root}/b.npz", x=x)
  with files.open_npz(f"{root}/b.npz") as f:
    np.testing.assert_array_equal(f["x"], x)
  with files.NpzWriter(f"{root}/rows.npz") as npz:
    with npz.rows("images", (4, 2), np.float32) as write:
      write(np.ones((2, 2)))
      write(np.zeros((2, 2)))
    npz.add("labels", np.arange(4))
  with np.load(bucket / "bucket/run/rows.npz") as f:
    assert f["images"].sum() == 4 and list(f["labels"]) == [0, 1, 2, 3]
  # Uploads are whole objects: no temporary files beside them, none left locally.
  assert sorted(p.name for p in (bucket / "bucket/run").iterdir()) == ["a.json", "b.npz",
                                                                        "rows.npz"]
  assert not list((bucket.parent / "local_tmp").glob(".*.tmp"))

  digest = files.sha256(f"{root}/rows.npz")
  copy = files.local_copy(f"{root}/rows.npz", digest)
  assert copy.is_file() and files.sha256(copy) == digest
  assert files.local_copy(copy, digest) == copy  # local paths are used in place

  log = metrics_log.MetricsLog(f"{root}/metrics.jsonl", tensorboard=False)
  log.write("s", 1, a=1.0)
  log.write("s", 2, a=2.0)
  lines = (bucket / "bucket/run/metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_staged_dir_replaces_a_folder_on_an_object_store(bucket):
  target = "gs://bucket/run/synthetic/dwa"
  files.write_json(f"{target}/old.json", {})
  with files.staged_dir(target) as staging:
    assert files.is_remote(staging)
    files.write_json(staging / "new.json", {"v": 2})
  assert sorted(p.name for p in (bucket / "bucket/run/synthetic").iterdir()) == ["dwa"]
  assert [p.name for p in (bucket / "bucket/run/synthetic/dwa").iterdir()] == ["new.json"]
  with pytest.raises(RuntimeError):  # a failure leaves the folder as it was
    with files.staged_dir(target) as staging:
      files.write_json(staging / "half.json", {})
      raise RuntimeError
  assert [p.name for p in (bucket / "bucket/run/synthetic/dwa").iterdir()] == ["new.json"]
  files.remove_tree(target)
  assert not epath.Path(target).exists()


def test_recover_progress_files_on_an_object_store(bucket, monkeypatch):
  """Finished batches and the fingerprint stamp of recover's progress (not its Orbax in-flight
  checkpoint: Orbax asks the real storage API about the bucket, so its manager is stubbed)."""
  monkeypatch.setattr(store.ocp, "CheckpointManager", lambda *a, **k: None)
  root = "gs://bucket/run/progress/dwa"
  stamp = {"seed": 0}
  p = progress.Progress(root, stamp)
  x = np.full((3, 2, 2, 1), 0.5, np.float32)
  p.save_done(0, 0, x, {"ce": 1.5})
  assert p.is_done(0, 0) and not p.is_done(1, 0)
  p.check_done(0, 0)
  pixels, summary = p.load_done(0, 0, x.shape)
  np.testing.assert_array_equal(pixels, x)
  assert summary == {"ce": 1.5}
  assert (bucket / "bucket/run/progress/dwa/done/batch_00000_000.npz").is_file()
  progress.Progress(root, {"seed": 1})  # other settings: the old progress is removed
  assert not (bucket / "bucket/run/progress/dwa/done").exists()


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None,
                    reason="gcsfs is installed: a gs:// workdir would go to the network")
def test_a_gs_workdir_without_gcsfs_is_one_error_line(tmp_path, monkeypatch, capsys):
  from dwa_jax.testing import tiny_config as tiny  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  assert main_lib.execute(tiny(), "gs://bucket/run") == 2
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("dwa_jax: error:")]
  assert len(lines) == 1 and "gs://bucket/run" in lines[0] and "gcsfs" in lines[0], err
  assert "Traceback" not in err and not any(tmp_path.iterdir())

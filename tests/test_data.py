"""Data sources on small local data and under tfds.testing.mock_data (no download)."""

import io
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dwa_jax import data

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_digits_is_deterministic_stratified_and_disjoint():
  train, test = data.load_digits("train"), data.load_digits("test")
  assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
  assert len(train.labels) + len(test.labels) == 1797 and train.num_classes == 10
  assert train.images.max() == 255
  # ~20% of every class is test.
  for c in range(10):
    frac = np.sum(test.labels == c) / (np.sum(test.labels == c) + np.sum(train.labels == c))
    assert 0.17 < frac < 0.23
  assert train.mean == test.mean
  np.testing.assert_array_equal(data.load_digits("train").images, train.images)
  train_rows = {r.tobytes() for r in train.images}
  assert sum(r.tobytes() in train_rows for r in test.images) < 10  # digits has a few duplicates


def test_sample_per_class_rows_hold_one_image_per_class():
  train = data.load_digits("train")
  idx = data.sample_per_class(train, 5, seed=3)
  assert idx.shape == (5, 10)
  np.testing.assert_array_equal(train.labels[idx], np.tile(np.arange(10), (5, 1)))
  assert len(np.unique(idx)) == 50
  np.testing.assert_array_equal(idx, data.sample_per_class(train, 5, seed=3))
  assert not np.array_equal(idx, data.sample_per_class(train, 5, seed=4))
  # Asking for more ipc keeps the earlier rows (prefix property of the rule).
  np.testing.assert_array_equal(data.sample_per_class(train, 7, seed=3)[:5], idx)
  with pytest.raises(data.DataError, match="fewer than the 1000 requested"):
    data.sample_per_class(train, 1000, seed=0)


def test_npz_and_image_folder_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
  labels = np.array([0, 1, 2, 0, 1, 2])
  np.savez(tmp_path / "d.npz", images=images, labels=labels)
  ds = data.load_dataset(f"npz:{tmp_path / 'd.npz'}", "train")
  assert isinstance(ds.images, data.NpyRows)  # np.savez is uncompressed: read row by row
  np.testing.assert_array_equal(ds.images[:], images)
  np.testing.assert_array_equal(ds.images[4], images[4])
  assert ds.num_classes == 3
  np.savez_compressed(tmp_path / "c.npz", images=images, labels=labels)
  np.testing.assert_array_equal(data.load_npz(tmp_path / "c.npz").images, images)
  for k, (image, label) in enumerate(zip(images, labels)):
    folder = tmp_path / "folder" / ("train" if k < 4 else "test") / f"class{label:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{k}.png")
  ds = data.load_dataset(f"folder:{tmp_path / 'folder'}", "train")
  assert ds.class_names == ("class000", "class001", "class002")
  np.testing.assert_array_equal(np.sort(ds.images[:].reshape(4, -1), 0),
                                np.sort(images[:4].reshape(4, -1), 0))
  test = data.load_dataset(f"folder:{tmp_path / 'folder'}", "test")
  np.testing.assert_array_equal(np.sort(test.images[:].reshape(2, -1), 0),
                                np.sort(images[4:].reshape(2, -1), 0))


def test_a_folder_without_train_and_test_is_one_line_exit_2(tmp_path):
  """A flat `folder:PATH` (PATH/<class>/...) would be read for both splits, testing students on
  their training images: the command refuses it with one line naming the layout it needs."""
  for k in range(4):
    (tmp_path / "flat" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(tmp_path / "flat" / f"c{k % 2}" /
                                                               f"{k}.png")
  proc = subprocess.run([sys.executable, "-m", "dwa_jax.main", "--config=configs/demo_digits.py",
                         f"--workdir={tmp_path / 'w'}", f"--config.dataset=folder:{tmp_path / 'flat'}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("dwa_jax: error: folder:"), lines[-5:]
  assert "has no train/ sub-folder" in lines[0] and f"{tmp_path / 'flat'}/test/<class>" in lines[0]
  (tmp_path / "flat" / "train").mkdir()  # a train/ folder alone: the test split is refused
  with pytest.raises(data.DataError, match="has no test/ sub-folder"):
    data.load_dataset(f"folder:{tmp_path / 'flat'}", "test")


def test_a_folder_test_split_takes_the_training_classes(tmp_path):
  """Labels follow train/'s sorted class folders, also where test/ lacks a class."""
  for split, classes in (("train", "abc"), ("test", "ac")):
    for c in classes:
      (tmp_path / split / c).mkdir(parents=True)
      Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / split / c / "0.png")
  test = data.load_dataset(f"folder:{tmp_path}", "test")
  assert test.class_names == ("a", "b", "c") and list(test.labels) == [0, 2]
  (tmp_path / "test" / "d").mkdir()
  data.load_dataset.cache_clear()
  with pytest.raises(data.DataError, match="has class folders that .* lacks: d"):
    data.load_dataset(f"folder:{tmp_path}", "test")


def _fake_jpeg_file(path, n=5):
  rng = np.random.default_rng(1)
  out = {}
  for split in ("train", "test"):
    blobs = []
    for _ in range(n):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
      blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    out[f"{split}_jpeg"] = np.concatenate(blobs)
    out[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])])
    out[f"{split}_labels"] = np.arange(n) % 10
  np.savez(path, class_names=np.array([f"c{i}" for i in range(10)]), **out)


def test_cifar10_jpeg_decodes_and_caches(tmp_path):
  _fake_jpeg_file(tmp_path / "c.npz")
  ds = data.load_cifar10_jpeg(tmp_path / "c.npz", "train", tmp_path / "cache")
  assert ds.images.shape == (5, 32, 32, 3) and ds.num_classes == 10
  cached = list((tmp_path / "cache").glob("*.npz"))
  assert len(cached) == 1
  mtime = cached[0].stat().st_mtime_ns
  again = data.load_cifar10_jpeg(tmp_path / "c.npz", "train", tmp_path / "cache")
  np.testing.assert_array_equal(again.images, ds.images)
  assert cached[0].stat().st_mtime_ns == mtime


@pytest.mark.parametrize("name,match", [
    ("mnist2", "Unknown data set 'mnist2'"),
    ("npz:/nonexistent/x.npz", "npz data file not found"),
    ("folder:/nonexistent", "Image folder not found"),
    ("tiny_imagenet", "Tiny-ImageNet not found"),
    ("cifar10_jpeg:/nonexistent.npz", "CIFAR-10 JPEG file not found"),
])
def test_bad_sources_are_one_clear_error(name, match):
  with pytest.raises(data.DataError, match=match):
    data.load_dataset(name, "train")


def test_npz_with_wrong_content(tmp_path):
  np.savez(tmp_path / "bad.npz", pictures=np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(data.DataError, match="needs arrays 'images' and 'labels'"):
    data.load_npz(tmp_path / "bad.npz")
  np.savez(tmp_path / "bad2.npz", images=np.zeros((2, 4, 4, 3)), labels=np.arange(2))
  with pytest.raises(data.DataError, match="must be uint8"):
    data.load_npz(tmp_path / "bad2.npz")
  assert data.load_npz(tmp_path / "bad2.npz", allow_float=True).images.dtype == np.float64


def _npz(path, labels, class_names=None):
  labels = np.asarray(labels)
  extra = {} if class_names is None else {"class_names": np.asarray(class_names)}
  np.savez(path, images=np.zeros((len(labels), 4, 4, 1), np.uint8), labels=labels, **extra)
  return f"npz:{path}"


@pytest.mark.parametrize("labels,class_names,match", [
    ([0, 0, 0, 0], None, r"1 class\(es\); distillation needs at least 2 classes"),
    ([0, 1, -1, 1], None, r"1 negative labels \(e.g. -1\)"),
    ([0.0, 1.0, 1.0, 0.0], None, "labels must be integer class indices, one per image; got float64"),
    ([0, 2, 2, 0], None, r"1 of 3 classes have no training images \(classes 1\); images per class range 0-2"),
    ([0, 1, 1, 0], ["a", "b", "c", "d"], r"2 of 4 classes have no training images \(classes 2, 3\)"),
    ([0, 1, 5, 0], ["a", "b", "c"], r"1 labels >= the 3 classes \(e.g. 5\)"),
    ([[0], [1], [1], [0]], None, "one per image; got int64 of shape"),
], ids=["one class", "negative", "float", "non-contiguous", "empty named classes",
        "label past the names", "2-D labels"])
def test_labels_and_classes_are_checked_up_front(tmp_path, labels, class_names, match):
  spec = _npz(tmp_path / "d.npz", labels, class_names)
  with pytest.raises(data.DataError, match=match):
    data.load_dataset(spec, "train")


def test_a_test_split_may_lack_classes(tmp_path):
  spec = _npz(tmp_path / "d.npz", [0, 1, 1, 0], ["a", "b", "c"])
  assert data.load_dataset(spec, "test").num_classes == 3


def test_staged_dir_replaces_whole_or_not_at_all(tmp_path):
  from dwa_jax import files
  target = tmp_path / "set"
  target.mkdir()
  (target / "old.txt").write_text("old")
  with pytest.raises(RuntimeError):
    with files.staged_dir(target) as staging:
      (staging / "new.txt").write_text("half")
      raise RuntimeError("failed while writing")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no staging folder left
  assert [p.name for p in target.iterdir()] == ["old.txt"]
  with files.staged_dir(target) as staging:
    (staging / "new.txt").write_text("whole")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
  assert [p.name for p in target.iterdir()] == ["new.txt"]

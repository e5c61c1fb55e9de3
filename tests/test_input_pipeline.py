"""The grain input pipeline and the sources it reads: locally built tfds ArrayRecord sets (the
real loading code, no mock), ImageFolder, npz, determinism, per-process shards, workers,
checkpointed iterator state, the TFRecord and no-network errors, Tiny-ImageNet's class order."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dwa_jax import data, testing, files, input_pipeline, train_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A fake CIFAR-10 (10 classes x 3, 32x32 PNG) and a fake ImageNet (1,000 classes x 1, JPEGs
  of varied sizes) in tfds's ArrayRecord layout."""
  root = tmp_path_factory.mktemp("tfds")
  testing.build(root, "cifar10", per_class=3)
  testing.build(root, "imagenet2012", per_class=1, test_per_class=1, image_size=64)
  return root


def _tfds_records(root, name, split):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.data_source(name, split=split, data_dir=os.fspath(root), download=False)


def test_tfds_cifar_is_read_into_memory_with_tfds_labels_and_pixels(tfds_dir):
  ds = data.load_tfds("cifar10", "train", os.fspath(tfds_dir))
  assert isinstance(ds.images, np.ndarray) and ds.images.shape == (30, 32, 32, 3)
  assert ds.num_classes == 10 and ds.mean == data.NORMALISATION["cifar10"][0]
  records = _tfds_records(tfds_dir, "cifar10", "train")
  np.testing.assert_array_equal(ds.labels, [records[i]["label"] for i in range(30)])
  np.testing.assert_array_equal(ds.images[7], records[7]["image"])


def test_tfds_imagenet_reads_labels_without_decoding_and_images_lazily(tfds_dir, monkeypatch):
  calls = []
  real_decode = data.decode_image
  monkeypatch.setattr(data, "decode_image", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
  labels = data.TfdsImages(tfds_dir / "imagenet2012" / _version(tfds_dir), "validation",
                           size=224, resize=256, image_shape=(224, 224, 3)).labels()
  assert not calls  # every label read, no image decoded
  ds = data.load_tfds("imagenet2012", "test", os.fspath(tfds_dir))
  assert isinstance(ds.images, data.TfdsImages) and ds.images.shape == (1000, 224, 224, 3)
  records = _tfds_records(tfds_dir, "imagenet2012", "validation")
  np.testing.assert_array_equal(ds.labels, labels)
  np.testing.assert_array_equal(ds.labels[:50], [records[i]["label"] for i in range(50)])
  # The evaluation transform: shorter side to 256, centre 224 crop, from the JPEG tfds stores.
  image = Image.fromarray(np.asarray(records[5]["image"]))
  scale = 256 / min(image.size)
  image = image.resize((max(256, round(image.width * scale)), max(256, round(image.height * scale))),
                       Image.BILINEAR)
  left, top = (image.width - 224) // 2, (image.height - 224) // 2
  np.testing.assert_array_equal(ds.images[5], np.asarray(image.crop((left, top, left + 224,
                                                                     top + 224))))


def _version(root):
  return next(p.name for p in (pathlib.Path(root) / "imagenet2012").iterdir() if p.is_dir())


def test_tfrecord_data_is_one_clear_error_naming_the_conversion(tfds_dir, tmp_path):
  # TensorFlow (not installed) writes TFRecord; a prepared TFRecord directory differs from an
  # ArrayRecord one only in its file names and dataset_info.json's fileFormat.
  src = tfds_dir / "cifar10"
  dst = tmp_path / "cifar10"
  for path in src.rglob("*"):
    if path.is_file():
      target = dst / path.relative_to(src)
      target.parent.mkdir(parents=True, exist_ok=True)
      target = target.with_name(target.name.replace(".array_record-", ".tfrecord-"))
      text = path.read_bytes()
      if path.name == "dataset_info.json":
        text = text.replace(b'"fileFormat": "array_record"', b'"fileFormat": "tfrecord"')
      target.write_bytes(text)
  with pytest.raises(data.DataError, match=r"tfrecord format; tfds.data_source reads ArrayRecord "
                     r"only; convert it once .*tfds convert_format --dataset_version_dir=.*"
                     r"--out_file_format=array_record"):
    data.load_tfds("cifar10", "train", os.fspath(tmp_path))


def test_first_run_without_network_is_one_clear_error(tmp_path, monkeypatch):
  import requests  # pylint: disable=g-import-not-at-top

  def offline(*args, **kwargs):
    raise requests.exceptions.ConnectionError("Failed to resolve host (simulated: no network)")

  monkeypatch.setattr(requests.Session, "get", offline)  # never reaches the network
  with pytest.raises(data.DataError, match=r"tfds could not download 'cifar100' .*no network.*"
                     r"tfds build cifar100 --data_dir=DIR --file_format=array_record"):
    data.load_tfds("cifar100", "train", os.fspath(tmp_path / "empty"))


def test_with_an_accelerator_tfds_prepares_in_a_child_that_sees_none(tmp_path, monkeypatch):
  """Preparing imports TensorFlow, which would take GPU memory from this process's JAX."""
  import subprocess  # pylint: disable=g-import-not-at-top
  from dwa_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  calls = []

  def child(command, env, **kwargs):
    calls.append((command, env))
    return subprocess.CompletedProcess(command, 2, "", "noise\n" + data.CHILD_ERROR
                                       + "tfds could not download 'cifar100' (simulated)\n")
  monkeypatch.setattr(xla_cpu, "accelerator_expected", lambda environ: True)
  monkeypatch.setattr(data.subprocess, "run", child)
  with pytest.raises(data.DataError, match=r"^tfds could not download 'cifar100' \(simulated\)$"):
    data.load_tfds("cifar100", "train", os.fspath(tmp_path / "empty"))
  (command, env), = calls
  assert env["CUDA_VISIBLE_DEVICES"] == "" and env["JAX_PLATFORMS"] == "cpu"
  assert command[-2:] == ["cifar100", os.fspath(tmp_path / "empty")]


def test_imagenet_not_prepared_names_the_manual_steps(tmp_path):
  with pytest.raises(data.DataError, match="downloads/manual.*tfds build imagenet2012"):
    data.load_tfds("imagenet2012", "train", os.fspath(tmp_path))


def test_order_is_a_pure_function_of_the_seed_and_covers_every_epoch():
  images = np.arange(23, dtype=np.uint8).reshape(23, 1, 1, 1)
  labels = np.arange(23)
  read = lambda seed: [b["index"] for b in input_pipeline.train_batches(
      images, labels, batch_size=5, seed=seed, epochs=2, process_index=0, process_count=1)]
  first, again, other = read(3), read(3), read(4)
  assert len(first) == 10 and [len(b) for b in first[:5]] == [5, 5, 5, 5, 3]
  assert all(np.array_equal(a, b) for a, b in zip(first, again))
  assert not all(np.array_equal(a, b) for a, b in zip(first, other))
  for epoch in range(2):
    np.testing.assert_array_equal(np.concatenate(first[5 * epoch:5 * epoch + 5]),
                                  input_pipeline.epoch_order(3, epoch, 23))


def _folder_set(root, n=12, size=6):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  for k, image in enumerate(images):
    path = root / f"c{k % 3}" / f"{k:03d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
  return data.load_image_folder(root)


def test_workers_give_the_same_batches_and_state_resumes(tmp_path):
  ds = _folder_set(tmp_path)
  assert isinstance(ds.images, data.FileImages)
  batches = lambda workers: list(input_pipeline.train_batches(
      ds.images, ds.labels, batch_size=4, seed=0, epochs=2, process_index=0, process_count=1,
      pipeline=input_pipeline.PipelineConfig(workers=workers)))
  in_process, with_workers = batches(0), batches(2)
  assert len(in_process) == len(with_workers) == 6
  for a, b in zip(in_process, with_workers):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["image"], ds.images[a["index"]])
  it = input_pipeline.train_batches(ds.images, ds.labels, batch_size=4, seed=0, epochs=2,
                                    process_index=0, process_count=1)
  for _ in range(4):
    next(it)
  state = it.get_state()
  resumed = input_pipeline.train_batches(ds.images, ds.labels, batch_size=4, seed=0, epochs=2,
                                         process_index=0, process_count=1)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["index"], in_process[4]["index"])


def test_eval_batches_cover_the_set_once_in_fixed_shapes():
  images = np.arange(11, dtype=np.uint8).reshape(11, 1, 1, 1)
  got = list(input_pipeline.eval_batches(images, np.arange(11), batch_size=4, process_index=0,
                                         process_count=1))
  assert [b["image"].shape[0] for b in got] == [4, 4, 4]
  assert [int(b["mask"].sum()) for b in got] == [4, 4, 3]
  np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in got]),
                                np.arange(11))
  # Sizes are rounded up to a multiple of the local device count.
  got = list(input_pipeline.eval_batches(images, np.arange(11), batch_size=5, process_index=0,
                                         process_count=1, multiple=4))
  assert [b["image"].shape[0] for b in got] == [8, 8]
  assert [int(b["mask"].sum()) for b in got] == [8, 3]


SHARD_CHILD = """
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import numpy as np
from dwa_jax import input_pipeline
labels = np.arange(37)
images = labels.astype(np.uint8).reshape(37, 1, 1, 1)
train = [b["index"].tolist() for b in input_pipeline.train_batches(images, labels, batch_size=8,
                                                                    seed=1, epochs=1)]
evaluation = [b["label"][b["mask"]].tolist() for b in input_pipeline.eval_batches(
    images, labels, batch_size=8)]
sizes = [len(b["label"]) for b in input_pipeline.eval_batches(images, labels, batch_size=8)]
print(json.dumps({"process": jax.process_index(), "train": train, "eval": evaluation,
                  "eval_sizes": sizes}))
"""


def test_two_processes_read_disjoint_shards_that_cover_the_set():
  import portpicker  # pylint: disable=g-import-not-at-top  (installed with grain)
  address = f"localhost:{portpicker.pick_unused_port()}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, "-c", SHARD_CHILD, address, str(p)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for p in range(2)]
  outs = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
  assert sorted(o["process"] for o in outs) == [0, 1]
  train = [o["train"] for o in outs]
  assert len(train[0]) == len(train[1]) == 5  # the same steps on both, each its part of a batch
  order = input_pipeline.epoch_order(1, 0, 37)
  for mine, theirs, step in zip(train[0][:4], train[1][:4], range(4)):
    assert len(mine) == len(theirs) == 4 and not set(mine) & set(theirs)
    assert sorted(mine + theirs) == sorted(order[8 * step:8 * step + 8])
  # The last batch (5 rows) does not split in two: both processes read all of it.
  assert train[0][4] == train[1][4] == order[32:].tolist()
  assert sorted(sum(train[0][:4] + train[1][:4], [])) == sorted(order[:32])
  # Both processes evaluate the same number of equal batches (19 and 18 rows: 3 of 8).
  assert outs[0]["eval_sizes"] == outs[1]["eval_sizes"] == [8, 8, 8]
  evaluation = [sum(o["eval"], []) for o in outs]
  assert not set(evaluation[0]) & set(evaluation[1])
  assert sorted(evaluation[0] + evaluation[1]) == list(range(37))


def test_npz_writer_streams_rows_atomically_and_reads_back_row_by_row(tmp_path):
  rows = np.random.default_rng(0).random((7, 3, 3, 2)).astype(np.float32)
  with files.NpzWriter(tmp_path / "s.npz") as npz:
    with npz.rows("images", rows.shape, np.float32) as write:
      write(rows[:3])
      write(rows[3:])
    npz.add("labels", np.arange(7))
  with np.load(tmp_path / "s.npz") as f:
    np.testing.assert_array_equal(f["images"], rows)
  lazy = data.NpyRows(tmp_path / "s.npz", "images")
  np.testing.assert_array_equal(lazy[[6, 0]], rows[[6, 0]])
  with pytest.raises(ValueError, match="6 rows written, 7 declared"):
    with files.NpzWriter(tmp_path / "t.npz") as npz:
      with npz.rows("images", rows.shape, np.float32) as write:
        write(rows[:6])
  assert not (tmp_path / "t.npz").exists() and not list(tmp_path.glob(".t.npz*"))


def test_tiny_imagenet_classes_are_sorted_wnids(tmp_path):
  wnids = ["n09", "n01", "n05"]  # wnids.txt is not sorted
  (tmp_path / "wnids.txt").write_text("\n".join(wnids) + "\n")
  rows = []
  for k, w in enumerate(wnids):
    img = np.full((64, 64, 3), 40 * k, np.uint8)
    path = tmp_path / "train" / w / "images" / f"{w}_0.JPEG"
    path.parent.mkdir(parents=True)
    Image.fromarray(img).save(path, format="JPEG")
    (tmp_path / "val" / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(tmp_path / "val" / "images" / f"val_{k}.JPEG", format="JPEG")
    rows.append(f"val_{k}.JPEG\t{w}\t0\t0\t64\t64")
  (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
  train = data.load_tiny_imagenet(tmp_path, "train")
  test = data.load_tiny_imagenet(tmp_path, "test")
  assert train.class_names == test.class_names == ("n01", "n05", "n09")
  np.testing.assert_array_equal(test.labels, [2, 0, 1])  # val_k is of wnids[k]
  assert abs(int(train.images[train.labels.tolist().index(2)].mean()) - 0) <= 2  # n09: black


def test_warmup_is_linear_from_a_hundredth_then_cosine_over_the_rest():
  lr = lambda e: float(train_lib.warmup_cosine(0.2, 20, 5, e))
  assert lr(0) == pytest.approx(0.002)
  assert lr(4) == pytest.approx(0.2 * (0.01 + 0.99 * 4 / 5))
  assert lr(5) == pytest.approx(0.2)
  assert lr(5 + 15 / 2) == pytest.approx(0.1)
  assert float(train_lib.warmup_cosine(0.2, 20, 0, 0)) == pytest.approx(0.2)


def test_label_lists_are_cached_per_split_files(tfds_dir, monkeypatch):
  images = data.TfdsImages(tfds_dir / "imagenet2012" / _version(tfds_dir), "train", size=224,
                           resize=256, image_shape=(224, 224, 3))
  first = images.labels()
  monkeypatch.setattr(data.TfdsImages, "_read_labels", lambda *a: pytest.fail("not cached"))
  np.testing.assert_array_equal(images.labels(), first)

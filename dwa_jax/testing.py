"""Small things to run the code on without real data or long runs: the tests' tiny config, and
tfds data sets built locally, no download (tfds's `imagenet2012` or `cifar10` layout, features
and file format, filled with random images), read through the real loading code.

    python -m dwa_jax.testing --data_dir=DIR --name=imagenet2012 --per_class=4
"""

import argparse
import io
import os

import ml_collections
import numpy as np
from PIL import Image

from dwa_jax import presets


def tiny_config() -> ml_collections.ConfigDict:
  """The digits demo cut to seconds: DWA only, ipc 1, one teacher epoch, two synthesis
  iterations, one student epoch and seed, no random real baseline."""
  c = presets.demo_digits()
  c.methods, c.ipc = ("dwa",), 1
  c.teacher.epochs = 1
  c.recover.iterations, c.recover.adjust_steps = 2, 1
  c.relabel.epochs, c.relabel.seeds, c.relabel.random_real_baseline = 1, (0,), False
  return c


def _encoded(rng: np.random.Generator, height: int, width: int, jpeg: bool) -> bytes:
  """A random PNG, or a smooth random JPEG (upsampled noise: its size is like a photograph's)."""
  buf = io.BytesIO()
  if jpeg:
    small = rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(buf, "JPEG", quality=90)
  else:
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def build(data_dir, name: str = "imagenet2012", num_classes: int | None = None,
          per_class: int = 2, test_per_class: int = 1, file_format: str = "array_record",
          image_size: int | None = None, vary_size: bool = True, seed: int = 0) -> str:
  """Writes a fake `name` ('imagenet2012' or 'cifar10') into `data_dir` in `file_format`;
  returns the dataset's directory. ImageNet: 1,000 classes of JPEGs, `image_size` (default 256)
  square, or of varied sizes around it with `vary_size`; CIFAR-10: 10 classes of 32x32 PNGs."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  imagenet = name == "imagenet2012"
  if name not in ("imagenet2012", "cifar10"):
    raise ValueError(f"name must be 'imagenet2012' or 'cifar10', got {name!r}")
  num_classes = num_classes or (1000 if imagenet else 10)
  size = image_size or (256 if imagenet else 32)
  version = tfds.builder_cls(name).VERSION
  eval_split = "validation" if imagenet else "test"

  with tfds.core.registered.skip_registration():

    class Fake(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
      VERSION = version

      def _info(self):
        image = (tfds.features.Image(encoding_format="jpeg") if imagenet
                 else tfds.features.Image(shape=(size, size, 3)))
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": image,
            "label": tfds.features.ClassLabel(names=[f"n{c:08d}" for c in range(num_classes)]),
            ("file_name" if imagenet else "id"): tfds.features.Text()}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train", per_class),
                eval_split: self._generate_examples(eval_split, test_per_class)}

      def _generate_examples(self, split, count):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        for k in range(count * num_classes):
          h, w = size, size
          if imagenet and vary_size:  # photographs vary in size and aspect ratio
            h, w = (int(size * f) for f in rng.uniform(0.9, 1.4, 2))
          yield f"{split}_{k:08d}", {"image": _encoded(rng, h, w, jpeg=imagenet),
                                      "label": k % num_classes,
                                      ("file_name" if imagenet else "id"): f"{split}_{k:08d}"}

    Fake.name = name
    builder = Fake(data_dir=os.fspath(data_dir), file_format=file_format)
    builder.download_and_prepare()
  return os.fspath(builder.data_dir)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--name", default="imagenet2012", choices=("imagenet2012", "cifar10"))
  parser.add_argument("--per_class", type=int, default=2)
  parser.add_argument("--file_format", default="array_record")
  args = parser.parse_args()
  print(build(args.data_dir, args.name, per_class=args.per_class, file_format=args.file_format))


if __name__ == "__main__":
  main()

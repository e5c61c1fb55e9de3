"""ImageNet-1K at scale on a CPU: memory of each stage at ipc 1 and ipc 4, label reading, decoding.

Builds an ImageNet-shaped tfds data set locally (dwa_jax.testing: 1,000 classes, 224 x 224
JPEGs, `--per_class` train and 1 validation image per class, ArrayRecord; no download) and runs
the real stages on it through the command line, each stage in its own process:
squeeze (a small BN teacher, convnet_w16_d5, 1 epoch), then recover and relabel at ipc 1 and
ipc 4 with the ImageNet preset (10 class-chunks of 100 per ipc index) cut to a few iterations and
one student epoch. It measures

  peak_rss_gb.<stage>.ipc<k>  the stage process's peak resident memory (wait4's ru_maxrss),
                              input pipeline in-process (workers 0), so the figure is one process
  label_read_seconds          every training label through data.TfdsImages.labels, cold (every
                              record read, no image decoded); per million records, from the
                              cache, and against decoding every record
  images_per_second           the evaluation transform (JPEG decode, resize 256, centre 224) through
                              the input pipeline with 0, 1 and 2 worker processes

and writes benchmarks/results/imagenet_scale.json. Target: peak RSS grows by less than 10 % from
ipc 1 to ipc 4 and stays under 4 GB; labels read in seconds, not by decoding.

    python benchmarks/imagenet_scale.py [--per_class 5] [--iterations 2]
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "imagenet_scale.json"


def stage_overrides(args, data_dir) -> list[str]:
  return [
      "--config=configs/imagenet_dwa.py", f"--config.data_dir={data_dir}",
      "--config.teacher.model=convnet_w16_d5", "--config.teacher.checkpoint=",
      "--config.teacher.epochs=1", "--config.teacher.augment=rrc_flip",
      "--config.relabel.student=convnet_w16_d5", "--config.pipeline.workers=0",
      f"--config.recover.iterations={args.iterations}", "--config.recover.adjust_steps=1",
      "--config.recover.checkpoint_every=0", "--config.relabel.epochs=1",
      "--config.relabel.eval_every=1", "--config.relabel.seeds=(0,)",
      "--config.relabel.random_real_baseline=False",
  ]


def run_stage(workdir, stage: str, overrides: list[str], extra=()) -> dict:
  """Runs one stage in a fresh process; returns its wall time and peak RSS (GB)."""
  cmd = [sys.executable, "-m", "dwa_jax.main", overrides[0], f"--workdir={workdir}",
         f"--config.stage={stage}", *overrides[1:], *extra]
  started = time.time()
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  output = proc.stdout.read().decode(errors="replace")
  _, status, usage = os.wait4(proc.pid, 0)
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(f"{stage} failed:\n{output[-4000:]}")
  return {"seconds": round(time.time() - started, 1),
          "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3)}  # ru_maxrss is in KiB on Linux


def label_read(data_dir) -> dict:
  from dwa_jax import data  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  source = data.TfdsImages(builder.data_dir, "train", size=224, resize=256,
                           image_shape=(224, 224, 3))
  started = time.time()
  labels = source.labels(cache=False)  # cold: every record read
  seconds = time.time() - started
  source.labels()  # fills the cache
  started = time.time()
  source.labels()
  cached_seconds = time.time() - started
  # The old way: decode each record (image included) to get its label, on a sample.
  decoded = tfds.data_source("imagenet2012", split="train", data_dir=data_dir, download=False)
  sample = min(500, len(source))
  started = time.time()
  for i in range(sample):
    np.asarray(decoded[i]["image"])
  decode_per_record = (time.time() - started) / sample
  return {"records": len(labels), "seconds": round(seconds, 3),
          "cached_seconds": round(cached_seconds, 4),
          "seconds_per_million": round(seconds / len(labels) * 1e6, 1),
          "by_decoding_seconds_per_million": round(decode_per_record * 1e6, 1)}


def decode_throughput(data_dir, workers_list=(0, 1, 2), batch_size=128) -> dict:
  from dwa_jax import data, input_pipeline  # pylint: disable=g-import-not-at-top
  train = data.load_dataset("imagenet2012", "train", data_dir)
  out = {}
  for workers in workers_list:
    pipeline = input_pipeline.PipelineConfig(workers=workers, threads=1)  # one decoder each
    started, count = time.time(), 0
    for batch in input_pipeline.eval_batches(train.images, train.labels, batch_size=batch_size,
                                             pipeline=pipeline, process_index=0, process_count=1):
      count += int(batch["mask"].sum())
    out[f"workers{workers}"] = round(count / (time.time() - started), 1)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--per_class", type=int, default=5)
  parser.add_argument("--iterations", type=int, default=2)
  parser.add_argument("--keep", default="", help="keep the data and work directories here")
  args = parser.parse_args()
  from dwa_jax import provenance, testing  # pylint: disable=g-import-not-at-top

  root = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="imagenet_scale_"))
  data_dir = root / "tfds"
  try:
    started = time.time()
    if not (data_dir / "imagenet2012").exists():
      testing.build(data_dir, "imagenet2012", per_class=args.per_class, test_per_class=1,
                      image_size=224, vary_size=False)
    build_seconds = time.time() - started
    labels = label_read(str(data_dir))
    throughput = decode_throughput(str(data_dir))
    overrides = stage_overrides(args, data_dir)
    teacher_dir = root / "teacher_run"
    stages = {"squeeze": {"ipc1": run_stage(teacher_dir, "squeeze", overrides)}}
    stages["recover"], stages["relabel"] = {}, {}
    for ipc in (1, 4):
      workdir = root / f"ipc{ipc}"
      shutil.rmtree(workdir, ignore_errors=True)
      shutil.copytree(teacher_dir / "teacher", workdir / "teacher")
      extra = [f"--config.ipc={ipc}"]
      stages["recover"][f"ipc{ipc}"] = run_stage(workdir, "recover", overrides, extra)
      stages["relabel"][f"ipc{ipc}"] = run_stage(workdir, "relabel", overrides, extra)
      if ipc == 1:
        accuracy = json.loads((workdir / "results.json").read_text())["sets"]["dwa"]["final_mean"]
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)

  peak = {stage: {k: v["peak_rss_gb"] for k, v in runs.items()} for stage, runs in stages.items()
          if stage != "squeeze"}
  growth = {stage: round(v["ipc4"] / v["ipc1"] - 1, 4) for stage, v in peak.items()}
  result = {
      "benchmark": "imagenet_scale",
      "provenance": provenance.record(),
      "data": {"classes": 1000, "train_per_class": args.per_class, "validation_per_class": 1,
               "image": "224x224 JPEG (quality 90)", "format": "tfds ArrayRecord",
               "build_seconds": round(build_seconds, 1)},
      "settings": {"teacher": "convnet_w16_d5, 1 epoch", "recover_iterations": args.iterations,
                   "classes_per_batch": 100, "adjust_steps": 1, "relabel_epochs": 1,
                   "pipeline_workers_in_stages": 0},
      "peak_rss_gb": peak,
      "peak_rss_growth_ipc1_to_ipc4": growth,
      "squeeze_peak_rss_gb": stages["squeeze"]["ipc1"]["peak_rss_gb"],
      "stage_seconds": {stage: {k: v["seconds"] for k, v in runs.items()}
                        for stage, runs in stages.items()},
      "label_read_seconds": labels["seconds"],
      "label_read": labels,
      "images_per_second": throughput,
      "student_top1_ipc1_percent": accuracy,
      "targets": {"rss_growth_below_10_percent": all(g < 0.10 for g in growth.values()),
                  "rss_below_4_gb": all(v < 4 for runs in peak.values() for v in runs.values())},
  }
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps(result, indent=1) + "\n")
  print("| stage | peak RSS ipc 1 (GB) | peak RSS ipc 4 (GB) | growth | seconds ipc 1 / 4 |")
  print("|---|---|---|---|---|")
  for stage in ("recover", "relabel"):
    s = result["stage_seconds"][stage]
    print(f"| {stage} | {peak[stage]['ipc1']:.3f} | {peak[stage]['ipc4']:.3f} | "
          f"{100 * growth[stage]:+.1f}% | {s['ipc1']} / {s['ipc4']} |")
  print(f"\nsqueeze peak RSS {result['squeeze_peak_rss_gb']:.3f} GB")
  print(f"labels: {labels['records']} records in {labels['seconds']} s cold, "
        f"{labels['cached_seconds']} s cached ({labels['seconds_per_million']} s per million "
        f"cold; by decoding: {labels['by_decoding_seconds_per_million']} s per million)")
  print("decode + resize 256 + centre 224, images/s: " +
        ", ".join(f"{k} {v}" for k, v in throughput.items()))
  print(f"targets: {result['targets']}\nwrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
  main()

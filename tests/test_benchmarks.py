"""The benchmarks run (tiny modes) and write their JSON; timings are not asserted. Every
committed result names the code and the command that produced it."""

import contextlib
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from dwa_jax import errors

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def committed_results():
  """Every results JSON under benchmarks/results, but the stage outputs kept inside saved
  synthetic sets (sets/<name>/<method>/: byte-checked against their manifests)."""
  return [p for p in sorted(RESULTS.rglob("*.json"))
          if not (p.parent.parent.parent.name == "sets" and p.parent.parent.parent.parent == RESULTS)]


@pytest.mark.parametrize("path", committed_results(), ids=lambda p: str(p.relative_to(RESULTS)))
def test_committed_results_name_their_commit_and_command(path):
  provenance = json.loads(path.read_text())["provenance"]
  assert len(provenance["commit"]) == 40 and int(provenance["commit"], 16) >= 0
  assert provenance["command"].startswith("python ")


def test_provenance_records_this_checkout(monkeypatch):
  from dwa_jax import provenance  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(provenance, "_git", lambda *args: "M  a/file/changed/since\n")
  record = provenance.record(["benchmarks/imagenet_scale.py", "--per_class", "2"])
  assert record["command"] == "python benchmarks/imagenet_scale.py --per_class 2"
  if (REPO / ".git").exists():
    assert len(record["commit"]) == 40 and isinstance(record["uncommitted"], list)
  assert str(REPO) not in json.dumps(record)
  # The checkout's state when the run started, whatever changes while it runs.
  assert {k: record[k] for k in ("commit", "uncommitted")} == provenance.AT_START


@pytest.mark.slow
def test_recover_speed_quick(tmp_path):
  out = tmp_path / "speed.json"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "DWA_JAX_XLA_DEFAULTS")}
  proc = subprocess.run([sys.executable, "benchmarks/recover_speed.py", "--quick",
                         "--compare-stock", f"--out={out}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  row = result["by_batch"]["10"]
  for method in ("sre2l", "dwa"):
    seconds = row["seconds_per_iteration"][method]
    assert seconds["min"] <= seconds["median"] <= seconds["max"] and len(seconds["rounds"]) == 2
    assert row["engine"][method]["gflop_per_iteration"] > 10  # ResNet-18 fwd + input grad, batch 10
  assert row["engine"]["dwa"]["adjust_seconds"] > 0
  assert row["matmul_peak_gflops"]["median"] > 0
  assert {"dwa_vs_sre2l"} <= set(row["ratios"])
  if "authors_loop" in row["seconds_per_iteration"]:  # torch installed
    assert {"dwa_vs_authors_loop", "dwa_vs_torch_loop"} <= set(row["ratios"])
  assert row["parts"]["backward"]["seconds"] > 0
  for method in ("sre2l", "dwa"):
    assert result["engine_stock_xla"]["10"][method]["median"] > 0
  from dwa_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  if xla_cpu.jaxlib_is_measured():
    assert set(xla_cpu.TUNED_FLAGS) <= set(result["xla_flags"].split())
  assert "dwa_vs_sre2l" in proc.stdout
  packing = result["packing"]
  assert [r["batches_per_device"] for r in packing] == [1, 2]
  for row in packing:  # (same images: tests/test_recover.py and test_scale.py check that)
    assert isinstance(row["same_images"], bool) and np.isfinite(row["max_abs_difference"])
    assert row["images_per_second"] > 0
    assert row["compilations"] == 2  # the adjustment and the iteration block, once each
    assert row["cost_analysis"]["flops"] > 0
  assert packing[1]["cost_analysis"]["flops"] > 1.9 * packing[0]["cost_analysis"]["flops"]
  scaling = result["scaling"]  # the device-count table, 1 and 2 forced devices here
  assert [r["devices"] for r in scaling] == [1, 2]
  assert scaling[1]["bit_identical_to_2_devices"]
  assert scaling[0]["max_abs_difference_to_1_device"] == 0.0
  # 1 vs 2 devices: float32 rounding, which Adam's sign-like first steps can amplify (docs/scale-out.md):
  # reported, not bounded here (tests/test_scale.py bounds it where it stays rounding-sized).
  assert np.isfinite(scaling[1]["max_abs_difference_to_1_device"])


@pytest.mark.slow
def test_reproduce_cifar10_runs_end_to_end_on_digits(tmp_path):
  """The reproduction script's pipeline, caching, D_fea, pictures and saved sets (--save_sets,
  --sets_from), on tiny digits settings."""
  command = [sys.executable, "benchmarks/reproduce_cifar10.py", "--config=configs/demo_digits.py",
             f"--workdir={tmp_path / 'work'}", f"--results_dir={tmp_path / 'results'}",
             "--config.teacher.epochs=2", "--config.recover.iterations=8", "--config.ipc=3",
             "--config.relabel.epochs=4", "--config.relabel.eval_every=2",
             "--config.relabel.seeds=(0,1)"]
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "results" / "reproduce_cifar10_convnet.json").read_text())
  assert set(report["results"]["sets"]) == {"sre2l", "dwa", "random_real"}
  assert set(report["stage_seconds"]) == {"squeeze", "recover/sre2l", "recover/dwa", "relabel"}
  for name, d in report["diversity"].items():
    assert len(d["per_class"]) == 10 and all(v > 0 for v in d["per_class"]), name
  assert report["diversity"]["random_real"]["relative_to_real"] == 1.0
  for png in ("pca", "dwa_grid", "sre2l_grid"):
    assert (tmp_path / "results" / f"reproduce_cifar10_convnet_{png}.png").stat().st_size > 0
  # A second run reuses every stage (and saves its sets).
  saved = tmp_path / "saved"
  proc = subprocess.run(command + [f"--save_sets={saved}"], cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "results" / "reproduce_cifar10_convnet.json").read_text())
  assert report["stage_seconds"] == {}
  # A run in a fresh workdir from the saved sets synthesises nothing.
  fresh = [a.replace(str(tmp_path / "work"), str(tmp_path / "fresh")) for a in command]
  proc = subprocess.run(fresh + [f"--sets_from={saved}"], cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "results" / "reproduce_cifar10_convnet.json").read_text())
  assert set(report["stage_seconds"]) == {"squeeze", "relabel"}
  for method in ("dwa", "sre2l"):
    assert (json.loads((saved / "sets.json").read_text())["methods"][method]["images_sha256"]
            == json.loads((tmp_path / "fresh" / "synthetic" / method / "manifest.json")
                          .read_text())["files"]["images.npz"])


def test_diversity_per_class_matches_the_double_sum():
  import common  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  features, labels = rng.normal(size=(12, 5)), np.repeat(np.arange(3), 4)
  expected = [sum(np.sum((features[i] - features[j])**2)
                  for i in np.flatnonzero(labels == c) for j in np.flatnonzero(labels == c))
              for c in range(3)]
  np.testing.assert_allclose(common.diversity_per_class(features, labels, 3), expected)


@pytest.mark.slow
def test_synthesis_curve_runs_on_digits(tmp_path):
  """The curve's rows on tiny digits settings: the starting images (t0) are the real images
  synthesis starts from, DWA moves away from them with T, and a random real subset row."""
  command = [sys.executable, "benchmarks/synthesis_curve.py", "--config=configs/demo_digits.py",
             f"--workdir={tmp_path / 'work'}", f"--results_dir={tmp_path / 'results'}",
             "--config.teacher.epochs=1", "--config.ipc=2", "--config.relabel.epochs=2",
             "--config.relabel.eval_every=1", "--config.relabel.seeds=(0,1)",
             "--rows=t0,t3,t10,real_s1"]
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / "results" / "synthesis_curve.json").read_text())["rows"]
  assert set(rows) == {"t0", "t3", "t10", "real_s1"}
  assert 0 < rows["t3"]["rmse_from_start"] < rows["t10"]["rmse_from_start"]
  assert rows["t0"]["iterations"] == 0 and rows["t0"]["d_fea_relative_to_start"] == 1.0
  assert all(len(r["runs"]) == 2 and r["command"].endswith(f"--rows={name}")
             for name, r in rows.items())
  assert (tmp_path / "results" / "synthesis_curve.png").stat().st_size > 1000
  # A variant under its own name: teacher-scored starting images, so no t0 and no distance
  # from sample_per_class's images; the main file is left alone.
  scored = [a for a in command[:-1] if not a.startswith("--config.relabel.seeds")] + [
      "--config.recover.init=scored", "--results_name=curve_scored", "--config.relabel.seeds=(0,)"]
  refused = subprocess.run(scored + ["--rows=t0"], cwd=REPO, capture_output=True, text=True,
                           timeout=900)
  assert refused.returncode != 0 and "t0" in refused.stderr
  proc = subprocess.run(scored + ["--rows=t3"], cwd=REPO, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = json.loads((tmp_path / "results" / "curve_scored.json").read_text())["rows"].values()
  assert "rmse_from_start" not in row and row["final_bn_loss"] > 0 and len(row["runs"]) == 1
  assert set(json.loads((tmp_path / "results" / "synthesis_curve.json").read_text())["rows"]) == {
      "t0", "t3", "t10", "real_s1"}


def test_arithmetic_accuracy_runs_on_digits(tmp_path):
  """Two rows on tiny digits settings: the exact synthesis and the emulated TF32 split one
  differ (the emulation moves the pixels elsewhere), each row keeps its command, and the
  accelerator cost of the split form is about twice the direct one's (SRe2L's)."""
  command = [sys.executable, "benchmarks/arithmetic_accuracy.py", "--config=configs/demo_digits.py",
             f"--workdir={tmp_path / 'work'}", f"--results_dir={tmp_path / 'results'}",
             "--config.teacher.epochs=1", "--config.ipc=1", "--config.recover.iterations=4",
             "--config.recover.adjust_steps=2", "--config.relabel.epochs=1",
             "--config.relabel.seeds=(0,)", "--rows=exact,tf32_split"]
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "results" / "arithmetic_accuracy.json").read_text())
  rows = report["rows"]
  assert set(rows) == {"exact", "tf32_split"}
  assert (rows["tf32_split"]["emulate"], rows["tf32_split"]["delta_form"]) == ("tf32", "split")
  assert rows["exact"]["images_sha256"] != rows["tf32_split"]["images_sha256"]
  assert all(r["command"].endswith(f"--rows={name}") and len(r["runs"]) == 1
             for name, r in rows.items())
  flops = report["accelerator_gflop_per_iteration"]
  assert flops["dwa_direct"] == flops["sre2l"]
  assert 1.5 < flops["dwa_split"] / flops["dwa_direct"] < 2.5


@pytest.mark.slow
def test_data_parallel_benchmark_quick(tmp_path):
  out = tmp_path / "dp.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "benchmarks/data_parallel.py", "--quick",
                         "--cpu_devices=2", f"--out={out}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  rows = {(r["stage"], r["devices"], r["sync_batch_norm"]): r for r in result["rows"]}
  assert set(rows) == {(s, n, False) for s in ("squeeze", "relabel") for n in (1, 2)} | {
      ("squeeze", 2, True), ("relabel", 2, True)}
  assert all(r["steps_per_second"] > 0 and r["step_compilations"] == 1 for r in rows.values())
  # 2 sets x 3 seeds: one step program per input dtype, one evaluation program.
  assert result["relabel_run"]["train_step"] == 2 and result["relabel_run"]["evaluation"] == 1
  assert "| relabel | 2 | sync |" in proc.stdout


TINY_DIGITS = ["--config=configs/demo_digits.py", "--config.teacher.epochs=2",
               "--config.recover.iterations=8", "--config.ipc=2", "--config.relabel.epochs=2",
               "--config.relabel.eval_every=1", "--config.relabel.seeds=(0,1)"]


@pytest.mark.slow
def test_protocol_benchmark_rows_reuse_and_merge(tmp_path):
  """benchmarks/protocol_cifar10.py on tiny digits: a base run, then rows that change one
  protocol control or one synthesis option; the official row reuses the base run's students,
  rows are merged across invocations, and a bad row is refused before anything runs."""
  base = tmp_path / "base"
  proc = subprocess.run([sys.executable, "-m", "dwa_jax.main", *TINY_DIGITS,
                         f"--workdir={base}"], cwd=REPO, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  command = [sys.executable, "benchmarks/protocol_cifar10.py", *TINY_DIGITS,
             f"--base_workdir={base}", f"--workdir={tmp_path / 'w'}",
             f"--results_dir={tmp_path / 'r'}"]
  proc = subprocess.run(command + ["--rows=official/base,hard/base,official/dwa_scored,"
                                   "custom.lr_ema/base",
                                   "--custom=lr_ema:relabel.lr_floor=0.5;relabel.ema_decay=0.5"],
                        cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "r" / "protocol_cifar10.json").read_text())
  rows = report["rows"]
  base_results = json.loads((base / "results.json").read_text())
  official = rows["official/base"]
  assert set(official["sets"]) == {"sre2l", "dwa", "random_real"}
  for name, r in official["sets"].items():  # the base run's students, reused as they were
    assert [x["final"] for x in r["runs"]] == [x["final"] for x in base_results["sets"][name]["runs"]]
  log = (tmp_path / "w" / "runs" / "official" / "base" / "metrics.jsonl").read_text()
  assert log.count('"finished_seed": true') == 6
  assert rows["hard/base"]["card"]["labels"] == "hard labels (no teacher)"
  assert set(rows["official/dwa_scored"]["sets"]) == {"dwa_scored"}
  assert rows["official/dwa_scored"]["sets"]["dwa_scored"]["init"]["kind"] == "scored"
  assert rows["custom.lr_ema/base"]["overrides"] == {"relabel.lr_floor": 0.5,
                                                     "relabel.ema_decay": 0.5}
  assert rows["custom.lr_ema/base"]["card"]["ema_decay"] == 0.5
  assert "| official | base | dwa |" in proc.stdout
  # A bad row is refused up front; a later invocation keeps the earlier rows.
  proc = subprocess.run(command + ["--rows=lr_floor/base,official/nope"], cwd=REPO,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode != 0 and "unknown images 'nope'" in proc.stderr
  proc = subprocess.run(command + ["--rows=lr_floor/base"], cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / "r" / "protocol_cifar10.json").read_text())["rows"]
  assert set(rows) == {"official/base", "hard/base", "official/dwa_scored",
                       "custom.lr_ema/base", "lr_floor/base"}
  assert rows["lr_floor/base"]["card"]["lr_floor"] == 0.5
  assert rows["official/base"]["students_trained"] == 0  # all the base run's
  assert rows["hard/base"]["students_trained"] == 6  # 3 sets x 2 seeds
  # Each row names the invocation that trained it, not the latest one.
  assert "hard/base" in rows["hard/base"]["command"]
  assert rows["lr_floor/base"]["command"].endswith("--rows=lr_floor/base")


def test_protocol_benchmark_names_its_custom_combinations():
  """--custom given once per combination: unnamed is protocol `custom`, `NAME:...` is
  `custom.NAME`; a value may hold ':' and '='; a repeated or badly named one is refused."""
  import protocol_cifar10  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  customs = protocol_cifar10.custom_protocols([
      "ema_small: relabel.ema_decay=0.9;relabel.lr_floor=0.5",
      "relabel.loss=a:b"])  # unnamed: '=' before the ':'
  assert customs == {"custom": {"relabel.loss": "a:b"},
                     "custom.ema_small": {"relabel.ema_decay": 0.9, "relabel.lr_floor": 0.5}}
  with pytest.raises(app.UsageError, match="given twice"):
    protocol_cifar10.custom_protocols(["x:relabel.epochs=2", "x:relabel.epochs=3"])
  with pytest.raises(app.UsageError, match="must be a word"):
    protocol_cifar10.custom_protocols(["two words:relabel.epochs=2"])


def test_protocol_benchmark_merges_rows_written_meanwhile(tmp_path):
  """A row is merged into the JSON as it is now on disk (another invocation's rows kept), and a
  rerun that trained no student keeps the seconds and command of the one that did."""
  import protocol_cifar10  # pylint: disable=g-import-not-at-top
  from dwa_jax import files  # pylint: disable=g-import-not-at-top
  out = tmp_path / "protocol_cifar10.json"
  trained = {"seconds": {"relabel": 900.0}, "students_trained": 9, "command": "old"}
  files.write_json(out, {"command": "old", "rows": {"a/base": {**trained, "sets": 1},
                                                    "b/base": trained}})
  report = {"command": "new", "rows": {}}  # read before b/base was written, say
  merged = protocol_cifar10.merge_row(out, report, "a/base", {
      "seconds": {"relabel": 0.1}, "students_trained": 0, "sets": 2, "command": "new"})
  assert set(merged["rows"]) == {"a/base", "b/base"} and merged["command"] == "new"
  assert merged["rows"]["a/base"] == {**trained, "sets": 2}
  merged = protocol_cifar10.merge_row(out, report, "b/base", {
      "seconds": {"relabel": 300.0}, "students_trained": 3, "command": "new"})
  assert merged["rows"]["b/base"] == {"seconds": {"relabel": 300.0}, "students_trained": 3,
                                      "command": "new"}


def test_compat_ablation_jpeg_variant_keeps_its_manifest_true(tmp_path):
  """The `jpeg` variant rewrites a recovered set as the authors' JPEGs; relabel must still
  accept it (its manifest names the new digests) and train on the decoded JPEGs."""
  import compat_ablation_cifar10  # pylint: disable=g-import-not-at-top
  from dwa_jax import main as main_lib, relabel  # pylint: disable=g-import-not-at-top
  from dwa_jax.testing import tiny_config as tiny  # pylint: disable=g-import-not-at-top
  c = tiny()
  workdir = tmp_path / "w"
  assert main_lib.execute(c, workdir) == 0
  out = workdir / "synthetic" / "dwa"
  lossless = np.load(out / "images.npz")["images"]
  compat_ablation_cifar10.to_jpeg(out)
  images, _ = relabel.synthetic_set(workdir, "dwa")  # raises if the manifest disagrees
  images = np.asarray(images[np.arange(len(lossless))])
  assert not np.array_equal(images, lossless)  # the decoded JPEGs, not the last iterate
  np.testing.assert_array_equal(np.load(out / "images_lossless.npz")["images"], lossless)


def test_saved_sets_restore_the_same_images_and_refuse_other_settings(tmp_path):
  """reproduce_cifar10 --save_sets / --sets_from: a later run uses the saved images (relabel
  accepts them against their manifest; recover is marked done) and refuses sets saved from
  other synthesis settings."""
  import common  # pylint: disable=g-import-not-at-top
  import reproduce_cifar10  # pylint: disable=g-import-not-at-top
  from dwa_jax import files, main as main_lib, relabel  # pylint: disable=g-import-not-at-top
  from dwa_jax.testing import tiny_config as tiny  # pylint: disable=g-import-not-at-top
  c = tiny()
  first, saved, second = tmp_path / "first", tmp_path / "saved", tmp_path / "second"
  assert main_lib.execute(c, first) == 0
  reproduce_cifar10.save_sets(c, first, saved)
  assert sorted(p.name for p in (saved / "dwa").iterdir()) == [
      "grid.png", "images.npz", "manifest.json", "recover.json"]
  common.copy_teacher(first, second)
  cache = common.StageCache(second)
  reproduce_cifar10.restore_sets(c, second, saved, cache, "teacher-key")
  images, _ = relabel.synthetic_set(second, "dwa")  # raises if the manifest disagrees
  original, _ = relabel.synthetic_set(first, "dwa")
  np.testing.assert_array_equal(np.asarray(images[np.arange(len(original))]),
                                np.asarray(original[np.arange(len(original))]))
  assert cache.fresh("recover/dwa", reproduce_cifar10.recover_key(c, "teacher-key", "dwa"),
                     second / "synthetic" / "dwa" / "manifest.json")
  assert files.read_json(saved / "sets.json")["methods"]["dwa"]["images_sha256"] == \
      relabel.set_identity(first, "dwa")
  c.recover.lr *= 2
  with pytest.raises(errors.InputError, match="another teacher, data or synthesis settings"):
    reproduce_cifar10.restore_sets(c, second, saved, cache, "teacher-key")


def test_protocol_benchmark_keeps_one_json_to_one_base_sets(tmp_path):
  """Rows of one protocol JSON share their base sets: rows over other images are refused."""
  import protocol_cifar10  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  out = tmp_path / "protocol_cifar10.json"
  sets = {"dwa": "a" * 64, "sre2l": "b" * 64}
  protocol_cifar10.check_base_sets(out, {"rows": {}}, sets)  # a new JSON takes any sets
  protocol_cifar10.check_base_sets(out, {"rows": {"x/base": {}}, "base_sets": sets}, dict(sets))
  for recorded in (None, {**sets, "dwa": "c" * 64}):
    with pytest.raises(app.UsageError, match="other base sets"):
      protocol_cifar10.check_base_sets(out, {"rows": {"x/base": {}}, "base_sets": recorded}, sets)



# benchmarks/accelerator_check.py on the CPU (--quick, tiny sizes): every section lands in the
# JSON, which a kill at any point leaves holding every section and row the log said finished;
# the budget skips and stops; the CPU without --quick is refused.
ACCELERATOR_CHECK = [sys.executable, "benchmarks/accelerator_check.py"]
# The suite's compilation cache (tests/conftest.py) is kept: the later runs reuse the first's.
ACCELERATOR_ENV = {k: v for k, v in os.environ.items()
                   if k not in ("XLA_FLAGS", "DWA_JAX_XLA_DEFAULTS")}
LOGGED_ROW = re.compile(r"^  (\w+)\.(\S+): (.*)$", re.M)
LOGGED_SECTION = re.compile(r"^section (\w+): (.+) \([\d.]+ s\)$", re.M)


@pytest.fixture(scope="module")
def accelerator_quick_run(tmp_path_factory):
  """One full --quick run: (JSON, stdout). A budget no run here reaches: a busy machine must
  not turn sections into skips."""
  out = tmp_path_factory.mktemp("accelerator") / "accelerator.json"
  proc = subprocess.run([*ACCELERATOR_CHECK, "--quick", "--budget_s=100000", f"--out={out}"],
                        cwd=REPO, env=ACCELERATOR_ENV, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


def test_accelerator_check_quick_fills_every_section(accelerator_quick_run):
  result, stdout = accelerator_quick_run
  assert result["backend"] == "cpu" and result["provenance"]["command"].startswith("python ")
  sections = ["engine", "memory", "demo", "precision", "consistency", "training", "engine_more"]
  assert result["sections_done"] == sections and list(result["sections"]) == sections
  assert result["total_seconds"] >= sum(s["seconds"] for s in result["sections"].values())
  rows = {**result["engine"], **result["engine_more"]}
  assert len(rows) == 3
  for key, row in rows.items():
    assert row["compilations"] == {"start": 1, "advance": 1}, (key, row)
    assert row["seconds_per_iteration"] > 0 and np.isfinite(row["final_ce"])
    assert row["timed_seconds"] >= 0.2 and row["timed_iterations"] >= 8
  assert result["engine"]["convnet.b10.P1.dwa.split.bfloat16"]["delta_form"] == "split"
  memory = result["memory"]
  for form in ("split", "direct"):
    for name in (f"iteration.{form}", f"ascent.scan.{form}.K2", f"ascent.unrolled.{form}.K2"):
      assert memory[name]["temp_bytes"] > 0 and memory[name]["compile_seconds"] >= 0
    assert memory["scan_ascent_temp_over_iteration"][form] > 0
  demo = result["demo"]
  assert list(demo["stage_seconds"]) == ["squeeze", "recover/sre2l", "recover/dwa", "relabel"]
  assert all(s >= 0 for s in demo["stage_seconds"].values())
  assert sum(demo["stage_seconds"].values()) == pytest.approx(demo["seconds"], abs=0.5)
  assert set(demo["sets"]) == {"sre2l", "dwa", "random_real"}
  assert 0 <= demo["sets"]["dwa"]["final_mean"] <= 100 and demo["teacher_test_accuracy"] > 0
  precision = result["precision"]
  assert precision["float32"]["delta_form"] == "direct"
  assert precision["bfloat16"]["delta_form"] == "direct"  # auto, on every platform
  assert precision["logit_effect"]["float32_direct"]["cosine"] > 0.999  # the CPU is exact
  consistency = result["consistency"]
  assert consistency["scan_vs_unrolled"]["max_abs_pixel_difference"] < 1e-3
  assert consistency["repeat"]["bytes_equal"] is True  # one CPU, one program: the same bytes
  assert consistency["checkpoint"]["seconds_per_save"] > 0
  for key in ("squeeze.workers0", "relabel.workers1", "evaluation.workers0"):
    assert result["training"][key]["images_per_second"] > 0
  assert "| engine |" in stdout and "| program |" in stdout


def test_accelerator_check_killed_keeps_what_its_log_said_finished(tmp_path,
                                                                   accelerator_quick_run):
  """SIGKILL at a random point after the first section finished: the JSON on disk parses and
  holds every section and row the (per-row flushed) log printed before the kill."""
  del accelerator_quick_run  # run first: its compiled programs are in the cache
  out, log = tmp_path / "accelerator.json", tmp_path / "log"
  with log.open("w") as f:
    proc = subprocess.Popen([*ACCELERATOR_CHECK, "--quick", "--budget_s=100000", f"--out={out}"],
                            cwd=REPO, env=ACCELERATOR_ENV, stdout=f, stderr=subprocess.DEVNULL,
                            start_new_session=True)
  try:
    deadline = time.monotonic() + 600
    while not (out.exists() and json.loads(out.read_text())["sections_done"]):
      assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
      time.sleep(0.1)
    delay = random.uniform(0, 15)
    time.sleep(delay)
  finally:  # the script and its children: one process group
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  text = log.read_text()
  text = text[:text.rfind("\n") + 1]  # whole lines
  result = json.loads(out.read_text())
  sections = dict(LOGGED_SECTION.findall(text))
  assert "engine" in sections, text
  for name, status in sections.items():
    assert result["sections"][name]["status"] == status, (delay, name)
    assert (name in result["sections_done"]) == (status == "done")
  for name, key, value in LOGGED_ROW.findall(text):
    assert result[name][key] == json.loads(value), (delay, name, key)


def test_accelerator_check_budget_skips_and_stops(tmp_path):
  """A 6 s budget: the sections not started by then are skipped, a child running then is
  killed; either is recorded, and the JSON is complete."""
  out = tmp_path / "accelerator.json"
  proc = subprocess.run([*ACCELERATOR_CHECK, "--quick", "--budget_s=6",
                         "--sections=engine,memory,demo", f"--out={out}"], cwd=REPO,
                        env=ACCELERATOR_ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["demo"] == {"skipped": "time budget spent"}
  assert result["sections"]["demo"]["status"] == "skipped"
  for row in result["engine"].values():
    assert "compilations" in row or row == {"skipped": "time budget spent"} or (
        row["timed_out"].startswith("killed after"))
  assert result["total_seconds"] < 60


def test_accelerator_check_in_process_as_on_a_tpu_host(tmp_path):
  """--in_process (what a TPU host runs): the sections in the parent, streamed the same way."""
  out = tmp_path / "accelerator.json"
  proc = subprocess.run([*ACCELERATOR_CHECK, "--quick", "--in_process", "--budget_s=100000",
                         "--sections=memory,engine_more", f"--out={out}"], cwd=REPO,
                        env=ACCELERATOR_ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["processes"] == "one" and result["sections_done"] == ["memory", "engine_more"]
  assert result["memory"]["ascent.unrolled.direct.K2"]["temp_bytes"] > 0
  assert result["engine_more"]["convnet.b10.P2.sre2l"]["compilations"] == {"start": 1,
                                                                           "advance": 1}


def test_accelerator_check_refuses_the_cpu_without_quick(tmp_path):
  out = tmp_path / "accelerator.json"
  proc = subprocess.run([*ACCELERATOR_CHECK, f"--out={out}"], cwd=REPO,
                        env={**ACCELERATOR_ENV, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert "--quick" in proc.stderr and not out.exists()

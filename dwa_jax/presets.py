"""Config-as-code: the official recipes of SPEC.md as ml_collections ConfigDicts.

`configs/*.py` call `get_config(dataset, methods)` and override what differs; every field can be
overridden again on the command line (`--config.ipc=50`, `--config.recover.iterations=500`).
"""

import difflib
import math

import ml_collections

from dwa_jax import arithmetic, compat, synthesis

STAGES = ("squeeze", "recover", "relabel", "all")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "all"            # squeeze | recover | relabel | all
  c.dataset = "digits"       # see dwa_jax.data.load_dataset
  c.data_dir = ""            # tfds data_dir or the folder of a folder-based data set
  c.seed = 0
  c.ipc = 10                 # synthetic images per class
  c.methods = ("dwa",)       # recovered and validated in turn: dwa | sre2l | random

  # The input pipeline (dwa_jax/input_pipeline.py, grain): how images are read and decoded.
  c.pipeline = p = ml_collections.ConfigDict()
  p.workers = 0              # decoding worker processes (0: in the main process); ImageNet: 8+
  p.threads = 4              # reader threads per process
  p.prefetch = 2             # batches read ahead (per worker)

  # Squeeze and relabel on every device (dwa_jax/data_parallel.py): BatchNorm statistics per
  # device, as torch DDP's; True: over the whole global batch.
  c.sync_batch_norm = False

  # Several processes (dwa_jax/multihost.py) wait for each other through files in the workdir.
  c.multihost = h = ml_collections.ConfigDict()
  h.barrier_timeout_s = 86400.0  # longest barrier wait (ImageNet ipc 50: process 0 writes 30 GB)
  h.stale_after_s = 300.0    # a silent heartbeat this long: the process died or hangs

  # Squeeze: the teacher (official CIFAR recipe).
  c.teacher = t = ml_collections.ConfigDict()
  t.model = "resnet18_cifar"
  t.checkpoint = ""          # a torchvision-layout state dict (.npz) to import instead of training
  t.epochs = 200
  t.batch_size = 128
  t.optimizer = "sgd"
  t.lr = 0.1
  t.momentum = 0.9
  t.weight_decay = 5e-4
  t.warmup_epochs = 0
  t.augment = "crop_flip"
  t.eval_every = 10
  t.save_every_epochs = 10   # resume checkpoint (<workdir>/squeeze/checkpoints) every N epochs; 0: none

  # Recover: synthesis (official CIFAR DWA settings).
  c.recover = r = ml_collections.ConfigDict()
  r.iterations = 1000
  r.lr = 0.25
  r.r_bn = 0.01
  r.r_var = 11.0             # DWA's variance weight; SRe2L uses sre2l_r_var
  r.sre2l_r_var = synthesis.SRE2L_R_VAR
  r.first_bn_weight = 10.0
  r.adjust_steps = 12        # K
  r.rho = 0.015
  r.jitter = 4
  r.augment = "roll"         # roll | crop_flip_roll
  r.init = "auto"            # auto (real for DWA, noise for SRe2L) | real | noise | scored
                             # (teacher-scored real crops, RDED's selector: dwa_jax/real_init.py)
  r.init_candidates = 5      # scored: real images per synthetic image
  r.init_crops = 5           # scored: random resized crops per candidate
  r.init_min_scale = 0.5     # scored: smallest crop area, as a fraction of the image (<= 1)
  r.init_quantile = 0.0      # scored: which crop by the teacher's CE, 0 easiest .. 1 hardest
  r.committee = ()           # more teachers of the same architecture (squeeze workdirs): the
                             # committee's mean loss drives the pixels, Δθ per teacher
  r.classes_per_batch = 0    # 0: all classes in one batch (ImageNet: 100)
  r.scalars_every = 10       # TensorBoard: CE and BN loss of every N-th iteration (0: none)
  r.checkpoint_every = 100   # iterations between chances to save the in-flight state (0: none)
  r.checkpoint_every_s = 300.0  # ...taken once this many seconds passed since the last save
  r.batches_per_device = 1   # P: independent synthetic batches per device in one program (vmap)
  r.delta_form = "auto"      # how Δθ enters Conv/Dense: direct (θ + Δθ) | split (layer(x; θ) +
                             # layer(x; Δθ), Δθ kept where weights are rounded, 2x the FLOPs) |
                             # auto: direct on every platform (recover.AUTO_DELTA_FORM)
  r.emulate = "none"         # none | tf32 | bfloat16: every convolution and matmul of the teacher
                             # reads its operands as that matrix unit does (on any backend)
  r.precision = "float32"    # float32 | bfloat16 (convolutions/matmuls only)
  r.wait_timeout_s = 86400.0  # multi-process: how long process 0 waits for the others' batches

  # Relabel + validate: online-KD students (official CIFAR recipe).
  c.relabel = v = ml_collections.ConfigDict()
  v.student = "resnet18_cifar"
  v.epochs = 400
  v.batch_size = 128
  v.optimizer = "adamw"
  v.lr = 1e-3
  v.momentum = 0.9
  v.weight_decay = 0.01
  v.decay_bn_and_bias = True
  v.warmup_epochs = 0
  v.augment = "crop_flip"
  v.mixing = "mixup"         # mixup | cutmix | none
  v.mix_alpha = 0.8
  v.temperature = 30.0
  v.t2_factor = False
  # The evaluation protocol (docs/evaluation.md); defaults: the official CIFAR relabel's.
  v.labels = "teacher"       # teacher: online soft labels from the teacher(s) | hard: no teacher
  v.loss = "kl"              # kl: KL at `temperature` | mse_ce: EDC's MSE on logits + γ·CE
  v.ce_weight = 0.025        # γ of loss=mse_ce (EDC)
  v.teacher_ensemble = ()    # more teachers (squeeze workdirs): logits averaged (EDC)
  v.ema_decay = 0.0          # student EMA of weights and BN statistics, evaluated (0: none)
  v.lr_floor = 0.0           # cosine down to lr_floor x lr (0: to zero; RDED: 0.5)
  v.headline = "best"        # the reported number: best over the evaluations | final
  v.eval_every = 10
  v.save_every_epochs = 10   # per-student resume checkpoint (<workdir>/relabel/...) every N epochs
  v.seeds = (0, 1, 2)
  v.random_real_baseline = True
  v.synthetic_set = ""       # '' (the recovered sets of `methods`) | folder:PATH | npz:PATH
  v.caption = ""             # printed under the results table and written to results.md

  # The authors' quirks: `compat` ('clean' | 'official') and one switch per quirk, unset (None)
  # switches following `compat` (dwa_jax/compat.py, compat.SWITCHES).
  compat.add_fields(c)
  return c


def cifar(dataset: str, methods=("dwa",), model: str = "resnet18_cifar") -> ml_collections.ConfigDict:
  c = base_config()
  c.dataset, c.methods = dataset, tuple(methods)
  c.teacher.model = c.relabel.student = model
  return c


def tiny_imagenet(methods=("dwa",)) -> ml_collections.ConfigDict:
  c = base_config()
  c.dataset, c.methods, c.ipc = "tiny_imagenet", tuple(methods), 50
  t = c.teacher
  t.epochs, t.batch_size, t.lr, t.weight_decay, t.warmup_epochs = 100, 256, 0.2, 1e-4, 5
  t.augment = "rrc_flip"
  r = c.recover
  r.iterations, r.lr, r.augment = 2000, 0.1, "crop_flip_roll"
  v = c.relabel
  v.epochs, v.batch_size, v.optimizer, v.lr, v.weight_decay, v.warmup_epochs = 200, 64, "sgd", 0.2, 1e-4, 5
  v.augment, v.mixing, v.mix_alpha, v.temperature, v.t2_factor = "rrc_flip", "cutmix", 1.0, 20.0, True
  return c


def imagenet(methods=("dwa",)) -> ml_collections.ConfigDict:
  c = base_config()
  c.dataset, c.methods = "imagenet2012", tuple(methods)
  c.teacher.model = c.relabel.student = "resnet18"
  c.teacher.checkpoint = "resnet18_imagenet1k_v1.npz"  # torchvision IMAGENET1K_V1, converted
  r = c.recover
  r.iterations, r.lr, r.r_var, r.adjust_steps, r.jitter = 2000, 0.25, 2.0, 15, 32
  r.augment, r.classes_per_batch = "crop_flip_roll", 100
  v = c.relabel
  v.epochs, v.batch_size, v.decay_bn_and_bias = 300, 128, False
  v.augment, v.mixing, v.mix_alpha, v.temperature = "rrc_flip", "cutmix", 1.0, 20.0
  return c


CHOICES = {
    ("teacher", "optimizer"): ("sgd", "adamw"),
    ("teacher", "augment"): ("crop_flip", "rrc_flip", "none"),
    ("recover", "augment"): synthesis.AUGMENTS,
    ("recover", "init"): ("auto", "real", "noise", "scored"),
    ("recover", "precision"): ("float32", "bfloat16"),
    ("recover", "delta_form"): ("auto", *synthesis.DELTA_FORMS),
    ("recover", "emulate"): tuple(arithmetic.EMULATIONS),
    ("relabel", "optimizer"): ("sgd", "adamw"),
    ("relabel", "augment"): ("crop_flip", "rrc_flip", "none"),
    ("relabel", "mixing"): ("mixup", "cutmix", "none"),
    ("relabel", "labels"): ("teacher", "hard"),
    ("relabel", "loss"): ("kl", "mse_ce"),
    ("relabel", "headline"): ("best", "final"),
}
# Numeric fields must be finite and >= 0; these must be >= 1.
POSITIVE_INTS = {"": ("ipc",),
                 "teacher": ("epochs", "batch_size", "eval_every"),
                 "recover": ("iterations", "batches_per_device", "init_candidates", "init_crops"),
                 "relabel": ("epochs", "batch_size", "eval_every")}
# Numeric fields with an upper bound (inclusive).
AT_MOST = {("teacher", "momentum"): 1.0, ("relabel", "momentum"): 1.0,
           ("relabel", "lr_floor"): 1.0, ("relabel", "ema_decay"): 1.0,
           ("recover", "init_min_scale"): 1.0, ("recover", "init_quantile"): 1.0}


def _leaves(tree, prefix: str = ""):
  """(dotted name, value) of every field of a (nested) dict or ConfigDict."""
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      yield from _leaves(value, name + ".")
    else:
      yield name, value


def _schema() -> dict:
  """Dotted field name -> its default (which gives its type): the fields a config may have."""
  return dict(_leaves(base_config().to_dict()))


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _type_error(name: str, value, default) -> str | None:
  """Why `value` cannot stand in `name` whose default is `default`; None if it can."""
  if default is None:  # the quirk switches: None (follow compat) or a bool
    ok, kind = value is None or isinstance(value, bool), "true, false or None"
  elif isinstance(default, bool):
    ok, kind = isinstance(value, bool), "true or false"
  elif isinstance(default, int):
    ok, kind = _is_int(value), "an integer"
  elif isinstance(default, float):
    ok, kind = (_is_int(value) or isinstance(value, float)), "a number"
  elif isinstance(default, str):
    ok, kind = isinstance(value, str), "a string"
  elif isinstance(default, (tuple, list)):
    ok, kind = isinstance(value, (tuple, list)), "a tuple"
  else:
    return None
  return None if ok else f"{name} must be {kind}, got {value!r} ({type(value).__name__})"


def _range_error(name: str, value) -> str | None:
  """Numbers: finite, >= 0 (>= 1 for POSITIVE_INTS), at most AT_MOST's bound."""
  if not (_is_int(value) or isinstance(value, float)):
    return None
  section, _, field = name.rpartition(".")
  low = 1 if field in POSITIVE_INTS.get(section, ()) else 0
  high = AT_MOST.get((section, field), math.inf)
  if isinstance(value, float) and not math.isfinite(value):
    return f"{name} must be a finite number, got {value}"
  if not low <= value <= high:
    bound = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
    return f"{name} must be {bound}, got {value}"
  return None


def resolve(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config every stage takes, made once at the entry (main.run_stages): checked, then
  with every quirk switch set from `compat` (compat.resolve). Rejects a config that cannot run
  with one message naming every problem: unknown or missing fields, values of the wrong type,
  numbers that are not finite or out of range, unknown choices. Idempotent."""
  from dwa_jax.models import MODELS  # pylint: disable=g-import-not-at-top
  if not isinstance(c, ml_collections.ConfigDict):
    raise ValueError(f"Invalid config: expected an ml_collections.ConfigDict (get_config() must "
                     f"return one, e.g. presets.base_config()), got {type(c).__name__}")
  schema = _schema()
  given = dict(_leaves(c))
  errors = []
  for name in given:
    if name not in schema:  # a mistyped name in a config file: named, with the nearest
      nearest = difflib.get_close_matches(name, list(schema), n=1)
      errors.append(f"unknown config field {name}"
                    + (f" (did you mean {nearest[0]}?)" if nearest else ""))
  missing = sorted(set(schema) - set(given))
  if missing:
    errors.append(f"missing config fields {', '.join(missing[:8])}"
                  + (" ..." if len(missing) > 8 else "") + " (start from presets.base_config())")
  for name, value in given.items():
    if name in schema:
      problem = _type_error(name, value, schema[name]) or _range_error(name, value)
      if problem:
        errors.append(problem)
  if errors:  # the checks below assume the types are right
    raise ValueError("Invalid config: " + "; ".join(errors))
  if c.compat not in compat.MODES:
    raise ValueError(f"Invalid config: compat must be one of {compat.MODES}, got {c.compat!r}")
  c = compat.resolve(c)
  if c.stage not in STAGES:
    errors.append(f"stage must be one of {STAGES}, got {c.stage!r}")
  for m in c.methods:
    if m not in synthesis.METHODS:
      errors.append(f"unknown method {m!r} in methods (use {', '.join(synthesis.METHODS)})")
  if not c.methods and c.stage != "squeeze":
    errors.append("methods is empty")
  for field, name in (("teacher.model", c.teacher.model), ("relabel.student", c.relabel.student)):
    if name not in MODELS:
      errors.append(f"unknown model {name!r} in {field} (choose from {', '.join(sorted(MODELS))})")
  for (section, name), allowed in CHOICES.items():
    if c[section][name] not in allowed:
      errors.append(f"{section}.{name} must be one of {allowed}, got {c[section][name]!r}")
  if c.relabel.temperature == 0:
    errors.append("relabel.temperature must be > 0")
  if c.relabel.mixing != "none" and c.relabel.mix_alpha == 0:
    errors.append(f"relabel.mix_alpha must be > 0 for relabel.mixing={c.relabel.mixing!r} "
                  "(or set relabel.mixing='none')")
  if "dwa" in c.methods and c.recover.adjust_steps < 1:
    errors.append("recover.adjust_steps (K) must be >= 1 for DWA")
  if c.recover.emulate != "none" and c.recover.precision == "bfloat16":
    errors.append(f"recover.emulate={c.recover.emulate!r} emulates a matrix unit in float32: "
                  "use it with recover.precision='float32'")
  spec = c.relabel.synthetic_set
  if spec and not (spec.partition(":")[0] in ("folder", "npz") and spec.partition(":")[2]):
    errors.append(f"relabel.synthetic_set must be '', 'folder:PATH' or 'npz:PATH', got {spec!r}")
  if c.recover.init_min_scale == 0:
    errors.append("recover.init_min_scale must be > 0 (a crop's area fraction)")
  if c.relabel.ema_decay == 1:
    errors.append("relabel.ema_decay must be < 1 (an EMA with decay 1 never moves; 0: no EMA)")
  if not all(isinstance(t, str) and t for t in c.relabel.teacher_ensemble):
    errors.append("relabel.teacher_ensemble must be squeeze workdirs (non-empty strings), got "
                  f"{tuple(c.relabel.teacher_ensemble)!r}")
  if not all(isinstance(t, str) and t for t in c.recover.committee):
    errors.append("recover.committee must be squeeze workdirs (non-empty strings), got "
                  f"{tuple(c.recover.committee)!r}")
  elif c.recover.committee:
    quirks = [f"recover.{q}" for q in ("compat_q1", "compat_q2") if c.recover[q]]
    if quirks and "dwa" in c.methods:
      errors.append(f"recover.committee: {' and '.join(quirks)} (on under compat="
                    f"{c.compat!r}) act on a single teacher's Δθ; set them False for a committee")
  if not c.relabel.seeds:
    errors.append("relabel.seeds is empty")
  elif not all(_is_int(s) and s >= 0 for s in c.relabel.seeds):
    errors.append(f"relabel.seeds must be integers >= 0, got {tuple(c.relabel.seeds)!r}")
  if errors:
    raise ValueError("Invalid config: " + "; ".join(errors))
  return c


def demo_digits() -> ml_collections.ConfigDict:
  """The fast demo on scikit-learn's embedded digits (8x8 grayscale, 10 classes): the CIFAR
  recipe scaled down to the data, SRe2L and DWA side by side, ConvNet teacher and students."""
  c = cifar("digits", ("sre2l", "dwa"), model="convnet")
  c.teacher.epochs, c.teacher.batch_size, c.teacher.lr, c.teacher.eval_every = 30, 64, 0.05, 5
  c.recover.iterations = 300
  c.recover.jitter = 1       # 4 px on 32 px images is 1 px on 8 px images
  c.relabel.epochs, c.relabel.batch_size, c.relabel.temperature = 150, 64, 4.0
  c.relabel.caption = DEMO_CAPTION
  return c


# What the demo's results table can and cannot say, measured by benchmarks/demo_spread.py.
DEMO_CAPTION = (
    "What this demo shows: the pipeline runs end to end. What it does not: DWA against SRe2L. "
    "On 8x8 digits their difference is within seed noise (DWA - SRe2L over 5 seeds: -0.9 +- 0.7 "
    "points, benchmarks/demo_spread.py), and a random real subset beat both in every seed. For "
    "DWA against SRe2L see the CIFAR-10 results in RESULTS.md.")


def reproduce_cifar10(data_file: str, model: str, teacher_epochs: int) -> ml_collections.ConfigDict:
  """CIFAR-10 ipc 10 on a CPU (benchmarks/reproduce_cifar10.py): DWA and SRe2L with the paper's
  synthesis and relabel settings; only the teacher is trained shorter than the official 200
  epochs, to fit the CPU budget."""
  c = cifar(f"cifar10_jpeg:{data_file}", ("dwa", "sre2l"), model=model)
  c.teacher.epochs = teacher_epochs
  c.teacher.eval_every = max(1, teacher_epochs // 6)
  return c

"""Teacher-scored real initialisation (recover.init='scored', dwa_jax/real_init.py)."""

import json

import jax
import numpy as np
import pytest

from dwa_jax import data, presets, real_init, recover
from dwa_jax import main as main_lib
from dwa_jax.models import build_model

from dwa_jax.testing import tiny_config as tiny

MEAN, STD = (0.5,), (0.25,)


@pytest.fixture(scope="module")
def digits():
  return data.load_dataset("digits", "train")


@pytest.fixture(scope="module")
def teacher():
  model = build_model("convnet", 10)
  return model, model.init(jax.random.key(3), np.zeros((1, 8, 8, 1), np.float32))


def starts(digits, teacher, cfg, ipc=2, seed=0):
  model, variables = teacher
  rows = recover.initial_rows(digits, ipc, seed, "scored", cfg.candidates)
  scorer = real_init.make_scorer(model, variables, MEAN, STD, cfg)
  every = np.arange(10)
  return np.stack([recover.initial_batch(digits, rows, i, every, seed, MEAN, STD, np.float32,
                                         scorer) for i in range(ipc)])


def test_one_candidate_one_whole_crop_is_the_plain_real_start(digits, teacher):
  """With one candidate and one crop of the whole image the rule picks that image: the plain
  real initialisation (which the candidates extend: rows i·n ... of the same draw)."""
  whole = real_init.ScoredInit(candidates=1, crops=1, min_scale=1.0)
  np.testing.assert_allclose(starts(digits, teacher, whole),
                             recover.initial_batches(digits, 2, 0, "real", MEAN, STD),
                             atol=1e-5)


@pytest.mark.parametrize("quantile", [0.0, 0.5, 1.0])
def test_the_pick_is_the_crop_at_the_quantile_of_the_teachers_ce(digits, teacher, quantile):
  model, variables = teacher
  cfg = real_init.ScoredInit(candidates=3, crops=4, min_scale=0.3, quantile=quantile)
  rows = real_init.candidate_rows(digits, 2, cfg.candidates, 0)
  images = digits.images[rows[1, :, 7]]
  crop, ce, chosen = real_init.make_scorer(model, variables, MEAN, STD, cfg)(
      images, 7, real_init.crop_key(0, 1, 7))
  ce = np.asarray(ce)
  assert ce.shape == (12,) and len(np.unique(ce)) > 1  # the crops differ
  assert ce[int(chosen)] == np.sort(ce)[round(quantile * 11)]
  logits = model.apply(variables, np.asarray(crop)[None], train=False)
  np.testing.assert_allclose(-jax.nn.log_softmax(logits)[0, 7], ce[int(chosen)], rtol=1e-4)


def test_candidates_are_disjoint_and_draws_are_seeded(digits, teacher):
  rows = real_init.candidate_rows(digits, 3, 4, 0)
  assert rows.shape == (3, 4, 10)
  for c in range(10):
    assert len(set(rows[:, :, c].ravel())) == 12 and np.all(digits.labels[rows[:, :, c]] == c)
  cfg = real_init.ScoredInit(candidates=2, crops=3)
  a, b = starts(digits, teacher, cfg), starts(digits, teacher, cfg)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, starts(digits, teacher, cfg, seed=1))


def test_scored_start_validated_run_and_recorded(tmp_path):
  c = tiny()
  c.recover.init, c.recover.init_min_scale = "scored", 0.0
  with pytest.raises(ValueError, match="init_min_scale must be > 0"):
    presets.resolve(c)
  c.recover.init_min_scale, c.recover.init_candidates, c.recover.init_crops = 0.5, 2, 2
  assert main_lib.execute(c, tmp_path) == 0
  summary = json.loads((tmp_path / "synthetic" / "dwa" / "recover.json").read_text())
  assert summary["init"] == {"kind": "scored", "candidates": 2, "crops": 2, "min_scale": 0.5,
                             "quantile": 0.0}

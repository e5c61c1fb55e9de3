"""Device dispatch of recover: a group of synthetic batches runs as ONE program over the local
devices, `batches_per_device` batches on each (docs/scale-out.md).

The pure per-batch maths (synthesis.start_batch, synthesis.run_iterations) is `vmap`ped over a
leading batch axis sharded over a one-axis mesh of the local devices; nothing is reduced across
batches. The device assignment is the mesh's, so it compiles once per host whatever the device
count. On the CPU iterations run unrolled, in blocks of ITERATION_BLOCK. A short last group is
padded with copies of its last batch, whose results are dropped.
"""

import dataclasses
import functools
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dwa_jax.synthesis import (AugmentDraws, BatchState, ChainCarry, SynthesisConfig, as_draws,
                               bn_layer_paths, empty_chain, first_teacher, run_iterations,
                               start_batch)

BATCH_AXIS = "batches"
ITERATION_BLOCK = 4  # iterations per compiled program: fast on CPU, compiles in seconds


def iteration_blocks(num_steps: int, block: int = ITERATION_BLOCK) -> list[int]:
  """num_steps split into blocks of `block` (the last one shorter)."""
  return [min(block, num_steps - s) for s in range(0, num_steps, block)]


@dataclasses.dataclass
class Group:
  """Batches in flight: `state` and `inputs` (labels, keys, draws) stacked on a leading axis of
  the runner's `size` (the first `count` are real), sharded over the devices."""
  state: BatchState
  inputs: tuple
  count: int

  @property
  def t(self) -> int:
    """The index of the next iteration (the same for every batch of a group)."""
    return int(np.asarray(self.state.t)[0])

  def x(self, k: int) -> np.ndarray:
    """Batch k's current normalised pixels, on the host."""
    return np.asarray(self.state.x[k])

  def chain(self, k: int):
    """compat_q2: batch k's carry into the next class-chunk, on the host."""
    return jax.tree.map(lambda a: np.asarray(a[k]), self.state.chain())


def _stack(items):
  """A list of per-batch pytrees (or one already stacked) -> one stacked pytree of numpy."""
  if isinstance(items, (list, tuple)):
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *items)
  return jax.tree.map(np.asarray, items)


def _key_data(key):
  return jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def _pad(tree, size: int):
  """Repeats the last entry of every leaf up to `size` entries (a full leaf is not copied)."""
  return jax.tree.map(lambda a: a if len(a) == size else np.concatenate(
      [a, np.repeat(a[-1:], size - len(a), axis=0)]), tree)


class GroupRunner:
  """Runs up to `size` = len(devices) × batches_per_device batches at once, as one program: the
  recover stage's executor, and the library's (`synthesize`, one batch; devices default to
  the first local one)."""

  def __init__(self, model, variables, image_shape, mean, std, cfg: SynthesisConfig,
               devices=None, batches_per_device: int = 1, unroll: bool | None = None):
    if devices is None:
      devices = jax.devices()[:1]
    if batches_per_device < 1:
      raise ValueError(f"batches_per_device must be >= 1, got {batches_per_device}")
    self.cfg = cfg
    self.devices = list(devices)
    self.per_device = batches_per_device
    self.size = len(self.devices) * batches_per_device
    # Unrolled blocks only where XLA:CPU needs them; a scan elsewhere (compiles once).
    self.unroll = self.devices[0].platform == "cpu" if unroll is None else unroll
    mesh = Mesh(np.asarray(self.devices), (BATCH_AXIS,))
    self._stacked = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    self._variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    self._traces = {"start": 0, "advance": 0}
    bn_paths = bn_layer_paths(model, first_teacher(variables, cfg), image_shape)

    def start(variables, x, labels, key_data, draws, chain):
      self._traces["start"] += 1  # runs once per compilation (at trace time)
      return start_batch(model, variables, x, labels, jax.random.wrap_key_data(key_data), draws,
                         bn_paths=bn_paths, cfg=cfg, chain=chain, unroll=self.unroll)

    def advance(n, variables, state, labels, key, draws):
      self._traces["advance"] += 1
      return run_iterations(model, variables, state, labels, key, draws, n, bn_paths=bn_paths,
                            pixel_mean=mean, pixel_std=std, cfg=cfg, unroll=self.unroll)

    batched = (None, 0, 0, 0, 0, 0)
    self._start = jax.jit(jax.vmap(start, in_axes=batched))
    self._advance = functools.lru_cache()(lambda n: jax.jit(
        jax.vmap(functools.partial(advance, n), in_axes=batched[:5]), donate_argnums=1))

  def compilations(self) -> dict:
    """How many programs were compiled: the weight adjustment, and the iteration blocks (one
    per distinct block length), whatever the number of devices."""
    return dict(self._traces)

  def cost_analysis(self, group: Group, num_steps: int) -> dict:
    """XLA's cost analysis of the iteration program for a block of `num_steps` iterations, as
    compiled for this host (all its devices): flops, bytes accessed, transcendentals."""
    traces = dict(self._traces)  # lowering again is not a compilation of the run
    compiled = self._advance(num_steps).lower(self._variables, group.state,
                                              *group.inputs).compile()
    self._traces.update(traces)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {key: float(cost[key]) for key in ("flops", "bytes accessed", "transcendentals")
            if key in cost}

  def compile_stats(self, num_classes: int, image_shape, num_steps: int | None = None,
                    dtype=np.float32) -> dict:
    """Compiles, on abstract inputs, the weight adjustment (`num_steps` None) or a block of
    `num_steps` iterations for a full group; returns XLA's memory analysis (bytes: temp,
    arguments, outputs) and the compile seconds. Nothing runs; the counts of compilations the
    run reports are left as they were."""
    traces = dict(self._traces)
    # A group's inputs, as `start` places them: (x, labels, key data, draws).
    spec = lambda shape, dt: jax.ShapeDtypeStruct((self.size, *shape), dt, sharding=self._stacked)
    t = self.cfg.iterations
    draws = [spec((t, 2), np.int32)]
    if self.cfg.augment == "crop_flip_roll":
      draws += [spec((t, 4), np.int32), spec((t,), np.bool_)]
    inputs = (spec((num_classes, *image_shape), dtype), spec((num_classes,), np.int32),
              spec((2,), np.uint32), AugmentDraws(*draws))
    params = self._variables["params"]
    chain = (jax.tree.map(lambda p: spec(p.shape, p.dtype), ChainCarry(params, params))
             if self.cfg.chained else None)
    started = time.perf_counter()
    if num_steps is None:
      lowered = self._start.lower(self._variables, *inputs, chain)
    else:
      state, _ = jax.eval_shape(self._start, self._variables, *inputs, chain)
      state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                          sharding=self._stacked), state)
      lowered = self._advance(num_steps).lower(self._variables, state, *inputs[1:])
    compiled = lowered.compile()
    seconds = time.perf_counter() - started
    self._traces.update(traces)
    memory = compiled.memory_analysis()
    return {"temp_bytes": int(memory.temp_size_in_bytes),
            "argument_bytes": int(memory.argument_size_in_bytes),
            "output_bytes": int(memory.output_size_in_bytes),
            "compile_seconds": round(seconds, 2)}

  def _put(self, tree):
    return jax.device_put(_pad(_stack(tree), self.size), self._stacked)

  def start(self, x, labels, keys, draws, chains=None):
    """The weight adjustment (and fresh Adam state) of up to `size` batches: index k of each
    argument is batch k (arrays stacked on a leading axis, or lists). Returns the Group and
    each real batch's start metrics (numpy)."""
    count = len(x)
    if not 1 <= count <= self.size:
      raise ValueError(f"a group holds 1 to {self.size} batches, got {count}")
    draws = [as_draws(d) for d in draws] if isinstance(draws, (list, tuple)) else as_draws(draws)
    # PRNG keys travel as their raw data (numpy cannot hold typed keys).
    key_data = [_key_data(k) for k in keys] if isinstance(keys, (list, tuple)) else _key_data(keys)
    inputs = tuple(self._put(a) for a in (labels, key_data, draws))
    chain = None
    if self.cfg.chained:
      chain = self._put([empty_chain(self._variables["params"]) if c is None else c
                         for c in (chains or [None] * count)])
    state, metrics = self._start(self._variables, self._put(x), *inputs, chain)
    return Group(state, inputs, count), self._per_batch(metrics, count)

  def advance(self, group: Group, num_steps: int) -> list:
    """num_steps iterations of every batch of `group` (its state is replaced); returns each
    real batch's per-iteration metrics (numpy)."""
    blocks = iteration_blocks(num_steps) if self.unroll else [num_steps]
    per_block = []
    for n in blocks:
      group.state, m = self._advance(n)(self._variables, group.state, *group.inputs)
      per_block.append(m)
    metrics = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs], axis=1),
                           *per_block)
    return self._per_batch(metrics, group.count)

  def synthesize(self, x, labels, key, draws, chain=None):
    """One batch from start to end: (final normalised images, metrics) with the start metrics
    and, under compat_q2, metrics['chain'], the carry into the next class-chunk."""
    group, (start_metrics,) = self.start([x], [labels], [key], [draws], [chain])
    (metrics,) = self.advance(group, self.cfg.iterations)
    if self.cfg.chained:
      metrics["chain"] = group.chain(0)
    return group.x(0), {**metrics, **start_metrics}

  @staticmethod
  def _per_batch(metrics, count: int) -> list:
    host = jax.tree.map(np.asarray, metrics)
    return [jax.tree.map(lambda a, k=k: a[k], host) for k in range(count)]


def batch_groups(todo: list, size: int, chained: bool) -> list[list]:
  """The batches run together, up to `size` at a time. Chained (compat_q2): chunk j of an ipc
  index needs chunk j − 1's carry, so a group holds the same step of up to `size` different ipc
  indices' chains."""
  if not chained:
    return [todo[g:g + size] for g in range(0, len(todo), size)]
  chains = {}
  for i, j in todo:
    chains.setdefault(i, []).append((i, j))
  ipcs, groups = list(chains), []
  for g in range(0, len(ipcs), size):
    block = [chains[i] for i in ipcs[g:g + size]]
    for step in range(max(len(c) for c in block)):
      groups.append([c[step] for c in block if step < len(c)])
  return groups

"""Device dispatch of recover: synthetic batches run concurrently, one per local device, each with
the same single-device program."""

import functools

import jax
import numpy as np

from dwa_jax.synthesis import (SynthesisConfig, bn_layer_paths, empty_chain, iteration_blocks,
                               run_iterations, start_batch)

class GroupRunner:
  """Runs up to G batches at once, batch k on devices[k], all with ONE single-device program.

  Inputs are committed to their device with `jax.device_put` and the jitted calls dispatch
  asynchronously, so the devices work concurrently. Each batch computes its own Δθ (nothing is
  reduced across devices), and because every batch runs the same compiled program the results
  do not depend on how many devices or processes share the work. (A `shard_map` over a mesh
  compiles a mesh of one device differently from larger meshes, so its results would change in
  the last bits with the device count.)
  """

  def __init__(self, model, variables, image_shape, mean, std, cfg: SynthesisConfig, devices):
    self.cfg = cfg
    self.devices = list(devices)
    self.size = len(self.devices)
    bn_paths = bn_layer_paths(model, variables, image_shape)
    self._variables = [jax.device_put(variables, d) for d in self.devices]
    self._start = jax.jit(functools.partial(start_batch, model, bn_paths=bn_paths, cfg=cfg))
    self._advance = functools.lru_cache()(lambda n: jax.jit(
        functools.partial(run_iterations, model, num_steps=n, bn_paths=bn_paths, pixel_mean=mean,
                          pixel_std=std, cfg=cfg, unroll=True), donate_argnums=1))

  def _on_device(self, k, *arrays):
    return [jax.device_put(a[k], self.devices[k]) for a in arrays]

  def _chain(self, k, chains):
    """compat_q2: batch k's carry on its device (the empty carry for a first chunk)."""
    if not self.cfg.chained:
      return None
    chain = chains[k] if chains is not None else None
    if chain is None:
      return empty_chain(self._variables[k]["params"])
    return jax.device_put(chain, self.devices[k])

  def start(self, x, labels, keys, draws, chains=None):
    """Per batch k (index k of each argument; draws: AugmentDraws, chains: ChainCarry or None):
    (BatchState, start metrics), each on devices[k]."""
    return [self._start(self._variables[k], *self._on_device(k, x, labels, keys, draws),
                        chain=self._chain(k, chains))
            for k in range(len(x))]

  def advance(self, states, labels, keys, draws, num_steps: int):
    """num_steps iterations of every batch, as blocks of unrolled iterations."""
    per_block = []
    for n in iteration_blocks(num_steps):
      out = [self._advance(n)(self._variables[k], states[k],
                              *self._on_device(k, labels, keys, draws))
             for k in range(len(states))]
      states = [state for state, _ in out]
      per_block.append([m for _, m in out])
    metrics = [jax.tree.map(lambda *xs: np.concatenate(xs), *[b[k] for b in per_block])
               for k in range(len(states))]
    return states, metrics


def batch_groups(todo: list, size: int, chained: bool) -> list[list]:
  """The batches run together, up to `size` at a time (one per device). Chained (compat_q2):
  chunk j of an ipc index needs chunk j − 1's carry, so a group holds the same step of up to
  `size` different ipc indices' chains."""
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

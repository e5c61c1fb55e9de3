"""Data parallelism of squeeze and relabel: one mesh axis `data` over every device of every
process; the global batch is sharded on it and the parameters are replicated (XLA inserts the
gradient all-reduce). BatchNorm statistics are per replica (one group per device, as torch's
DistributedDataParallel) unless `sync_batch_norm`; a batch that does not split evenly over the
devices runs whole on every device. docs/scale-out.md tells the details.
"""

import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
  """A one-axis mesh over `devices` (default: all devices of all processes, process by process,
  so each process's devices hold a contiguous block of every batch)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a training batch and the state live: `mesh`, and whether BatchNorm statistics are
  synchronised over the global batch (`sync_batch_norm`) or per replica."""
  mesh: Mesh
  sync_batch_norm: bool = False
  replicas: int = 0  # groups of per-replica statistics; 0: one per device (another count
                     # reproduces a run on that many devices, e.g. an 8-GPU run on one)

  @classmethod
  def from_config(cls, config, devices=None) -> "Layout":
    return cls(data_mesh(devices), bool(config.sync_batch_norm))

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  @property
  def local_devices(self) -> int:
    """Devices of this process in the mesh (every process has the same number)."""
    return sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  @property
  def sharded(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

  def splits(self, batch_size: int) -> bool:
    """Whether a global batch of `batch_size` is sharded (it splits evenly over the devices)."""
    return batch_size % self.num_devices == 0

  def groups(self, batch_size: int) -> int:
    """How many groups compute BatchNorm statistics (and batch-wide augmentation such as
    mixing) separately: one per replica, unless synchronised or the batch does not split."""
    replicas = self.replicas or self.num_devices
    if self.sync_batch_norm or not self.splits(batch_size) or batch_size % replicas:
      return 1
    return replicas

  def global_batch(self, local: np.ndarray, batch_size: int) -> jax.Array:
    """A global array of `batch_size` rows from this process's part (`local`): its contiguous
    slice of the rows when the batch is sharded, all of them when it is not."""
    sharding = self.sharded if self.splits(batch_size) else self.replicated
    return jax.make_array_from_process_local_data(sharding, np.asarray(local),
                                                  (batch_size, *np.shape(local)[1:]))

  def global_eval_batch(self, local: np.ndarray) -> jax.Array:
    """Evaluation batches are always sharded: every process gives the same number of rows."""
    local = np.asarray(local)
    size = len(local) * jax.process_count()
    return jax.make_array_from_process_local_data(self.sharded, local, (size, *local.shape[1:]))

  def replicate(self, tree):
    """`tree` (host values, or arrays every process holds whole) as arrays replicated over the
    mesh; PRNG keys stay keys."""
    def put(x):
      if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
      return jax.make_array_from_process_local_data(self.replicated, np.asarray(x))
    return jax.tree.map(put, tree)

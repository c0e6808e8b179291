"""Everything about running on many devices and many hosts, in one place.

One 2-D device mesh with axes (DATA, FSDP):
- the batch's leading dimension is split over both axes jointly, so every device holds
  1 / num_devices of the batch (plain data parallelism when FSDP has size 1);
- large parameters (and their optimizer moments and EMA, which share their shapes) are split over
  FSDP along one dimension, so FSDP of size k divides their memory by k (ZeRO-3 style); XLA inserts
  the all-gathers and reduce-scatters from the shardings alone.
Programs are `jax.jit` with in/out shardings from `shardings_for`; there is no `pmap`.

Multi-host: call `initialize_distributed()` first (before anything touches devices), feed each
process its own slice of the batch through `host_batch_to_global`, and restore checkpoints into
`shardings_for(abstract_state, mesh)`; Orbax then reads only what each host needs.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)

_log = logging.getLogger(__name__)
_initialized = False


# ---------------------------------------------------------------------------------------------
# Processes


def _detected_cluster() -> str | None:
    """The name of a multi-process launcher jax can configure itself from, or None."""
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    # Cloud TPU VMs list every worker of the slice; one entry means a single host.
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h.strip()]) > 1 or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: int | Sequence[int] | None = None) -> None:
    """Joins this process to a multi-process run (explicit args, then JAXDIFF_* env, then
    SLURM/TPU auto-detection); a lone process does nothing. Safe to call twice."""
    global _initialized
    if _initialized or jax.distributed.is_initialized():
        _initialized = True
        return
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAXDIFF_COORDINATOR")
    if num_processes is None and env.get("JAXDIFF_NUM_PROCESSES"):
        num_processes = int(env["JAXDIFF_NUM_PROCESSES"])
    if process_id is None and env.get("JAXDIFF_PROCESS_ID"):
        process_id = int(env["JAXDIFF_PROCESS_ID"])
    if local_device_ids is None and env.get("JAXDIFF_LOCAL_DEVICE_IDS"):
        local_device_ids = [int(i) for i in env["JAXDIFF_LOCAL_DEVICE_IDS"].split(",")]

    # CPU processes need a collectives backend to talk across processes; gloo ships with jaxlib.
    # The option only affects the CPU client, so it is harmless on GPU/TPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs num_processes and process_id too "
                             "(or JAXDIFF_NUM_PROCESSES / JAXDIFF_PROCESS_ID)")
        if num_processes > 1:
            jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids)
            _initialized = True
    elif (cluster := _detected_cluster()) is not None:
        # jax reads the coordinator, the process count and id from the launcher's environment.
        _log.info("multi-process %s environment detected", cluster)
        jax.distributed.initialize(local_device_ids=local_device_ids)
        _initialized = True
    if _initialized:
        _log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                  jax.process_count(), jax.local_device_count(), jax.device_count())


# ---------------------------------------------------------------------------------------------
# Mesh


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (DATA, FSDP) mesh over `devices` (default all); -1 takes all the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of data and fsdp can be -1")
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else -1
    elif fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else -1
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not fit {n} devices; "
                         f"the product must equal {n} (use -1 on one axis for the rest)")
    # Auto axes: jit propagates shardings itself; XLA picks the collectives.
    types = (jax.sharding.AxisType.Auto,) * 2
    if devices == list(jax.devices()):
        # jax.make_mesh orders devices for the physical topology (ICI rings on TPU).
        return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=types)
    return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), BATCH_AXES, axis_types=types)


def batch_size_divisor(mesh: Mesh) -> int:
    """How many devices the batch dimension is split over."""
    return mesh.shape[DATA] * mesh.shape[FSDP]


# ---------------------------------------------------------------------------------------------
# Sharding rules: the only place they live.


def param_spec(shape: Sequence[int], min_size: int = 2 ** 14, fsdp_size: int = 1) -> P:
    """FSDP split of the largest dim divisible by `fsdp_size` for arrays of >= min_size
    elements; smaller arrays (biases, norms, scalars) are replicated."""
    shape = tuple(shape)
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        # Splitting over an axis of size 1 changes nothing; small arrays cost more in collectives.
        return P()
    # Ties go to the later dim (the output features of a kernel), largest first.
    candidates = [(d, i) for i, d in enumerate(shape) if d % fsdp_size == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    return P(*[FSDP if i == axis else None for i in range(len(shape))])


def shardings_for(tree: Any, mesh: Mesh, min_size: int = 2 ** 14) -> Any:
    """A NamedSharding per leaf of `tree` (arrays, ShapeDtypeStructs, optax states, scalars)."""
    fsdp_size = mesh.shape[FSDP]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), min_size, fsdp_size)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of `mesh` (scalars, schedules, metrics)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading dim split over (DATA, FSDP) jointly, the other `ndim - 1` dims whole."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def pad_batch(n: int, mesh: Mesh, multiple: int = 1) -> int:
    """`n` rounded up to a multiple of the devices the batch is split over (times `multiple`)."""
    k = batch_size_divisor(mesh) * multiple
    return -(-n // k) * k


def pad_rows(tree: Any, size: int) -> Any:
    """Each leaf's leading dim grown to `size` by repeating its last row (NumPy or JAX arrays)."""
    def pad(x):
        extra = size - x.shape[0]
        if extra == 0:
            return x
        xp = np if isinstance(x, np.ndarray) else jnp
        return xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)])
    return jax.tree.map(pad, tree)


# ---------------------------------------------------------------------------------------------
# Moving data


def host_batch_to_global(batch: Any, mesh: Mesh) -> Any:
    """Global batch arrays from each process's local rows (concatenated in process order)."""
    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
    return jax.tree.map(one, batch)


def reshard(tree: Any, shardings: Any) -> Any:
    """`tree` (host numpy or arrays on any mesh) laid out on `shardings` (same structure)."""
    return jax.tree.map(jax.device_put, tree, shardings)

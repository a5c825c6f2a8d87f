"""The device mesh and the one table that maps logical axis names onto it.

Parameters and activations name their axes logically (`embed`, `mlp`, `heads`, ...);
LOGICAL_AXIS_RULES says which mesh axis each is split over. Changing a parallelism strategy
means changing this table, not the model. Kernels that XLA cannot partition (Pallas) are
mapped onto the mesh by the same table in jaxllm/parallel/blocks.py (`shard_map` on
per-device blocks).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import jax
import ml_collections as mc
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxllm.config.schema import ConfigError, base_config

MESH_AXES = ("data", "fsdp", "tensor", "expert", "sequence")
BATCH_AXES = ("data", "fsdp", "expert")  # the mesh axes that split a batch's rows

LOGICAL_AXIS_RULES = (
    # Activations: rows over data, fsdp and expert (outside the MoE layers expert devices are
    # data parallel), tokens over sequence; the residual stream's D is whole on each device
    # (tensor parallelism splits heads and F inside a layer).
    ("batch", BATCH_AXES),
    ("length", "sequence"),
    ("act_embed", None),
    # Parameters: FSDP splits D over fsdp and sequence together, so that sequence-parallel
    # devices do not each hold a full copy of the weights; tensor splits heads, F and V.
    ("vocab", "tensor"),
    ("embed", ("fsdp", "sequence")),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),  # norm scales are D floats: replicating them costs nothing
    ("layers", None),
    ("expert", "expert"),  # MoE: experts over expert, each expert's F over tensor
    ("expert_mlp", "tensor"),
    ("router", None),  # the router's E columns and the shared-expert gate's one
)


def mesh_shape(mesh_config: mc.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Sizes of MESH_AXES; a -1 takes the devices the others leave."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(f"config.mesh: {num_devices} devices are not divisible by the "
                             f"fixed axes {dict(zip(MESH_AXES, sizes, strict=True))}")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"config.mesh: {dict(zip(MESH_AXES, sizes, strict=True))} needs "
                         f"{math.prod(sizes)} devices, but {num_devices} are available")
    return tuple(sizes)


def check_divisible(config: mc.ConfigDict, sizes: tuple[int, ...]) -> None:
    """Every sharded dimension must split evenly over its mesh axis: one clear error if not."""
    axes = dict(zip(MESH_AXES, sizes, strict=True))
    m = config.model
    checks = [("tensor", f"model.{k}", m[k]) for k in
              ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size",
               "moe_intermediate_size", "shared_expert_intermediate_size")]
    checks.append(("expert", "model.num_experts", m.num_experts))
    axes["fsdp×sequence"] = axes["fsdp"] * axes["sequence"]
    checks.append(("fsdp×sequence", "model.hidden_size", m.hidden_size))
    for name in config.stages.keys():
        checks.append(("sequence", f"stages.{name}.seq_len", config.stages[name].seq_len))
    for axis, key, value in checks:
        if value % axes[axis]:
            raise ConfigError(f"config.{key}={value} does not split over mesh axis {axis!r} of "
                              f"size {axes[axis]}; choose config.mesh sizes dividing {value}")
    if axes["expert"] > 1 and not m.num_experts:
        raise ConfigError(f"config.mesh.expert={axes['expert']} needs a mixture-of-experts "
                          "model (model.num_experts > 0); use data for a dense model")
    ways = math.prod(axes[a] for a in BATCH_AXES)
    for name in config.stages.keys():
        rows = config.stages[name].batch_size
        if config.stages[name].steps and rows % (ways * config.optimizer.grad_accum):
            raise ConfigError(
                f"config.stages.{name}.batch_size: {rows} rows do not split over mesh "
                f"data×fsdp×expert={ways} times optimizer.grad_accum="
                f"{config.optimizer.grad_accum}")


def make_mesh(config: mc.ConfigDict, devices=None) -> Mesh:
    """The mesh of `config.mesh` over `devices` (all by default), checked against the model."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(config.mesh, len(devices))
    check_divisible(config, shape)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def param_shardings(abstract_boxed_params, mesh: Mesh):
    """NamedShardings for a tree of logically-boxed parameters (from `eval_shape` of init)."""
    specs = nn.get_partition_spec(abstract_boxed_params)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch rows over (data, fsdp, expert); every other dimension replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_ways(mesh: Mesh) -> int:
    """How many ways a batch's rows split on `mesh`."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def to_host(x) -> np.ndarray:
    """The whole of a global array (or a host array) on this process, also where other
    processes hold parts of it (an all-gather between them)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[None]:
    """Traces and runs under `mesh` with the logical axes of LOGICAL_AXIS_RULES."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def mesh_from_spec(model_config: mc.ConfigDict, spec: str, devices=None) -> Mesh:
    """`--mesh=tensor:4,fsdp:2`: sizes of MESH_AXES (the unnamed ones 1, data
    -1: the devices left), over `devices` (all by default), checked against the model."""
    config = base_config()
    config.model.update(model_config.to_dict())
    for part in spec.split(","):
        axis, _, size = part.partition(":")
        if axis not in MESH_AXES or not size.lstrip("-").isdigit():
            raise ValueError(f"--mesh={spec!r}: give AXIS:SIZE pairs, axes from "
                             f"{', '.join(MESH_AXES)}")
        config.mesh[axis] = int(size)
    return make_mesh(config, devices)

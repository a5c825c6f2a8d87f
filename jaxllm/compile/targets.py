"""Hardware as it is rented, by name, and its compile-only devices on this machine.

| target   | N counts                     | devices          | memory / device | compiler          |
|----------|------------------------------|------------------|-----------------|-------------------|
| v4-N     | TensorCores (2 a chip)       | N/2 chips        | 32 GiB          | libtpu            |
| v5p-N    | TensorCores (2 a chip)       | N/2 chips        | 95 GiB          | libtpu            |
| v5e-N    | chips                        | N chips          | 16 GiB          | libtpu            |
| v6e-N    | chips                        | N chips          | 32 GiB          | libtpu            |
| h100xN   | GPUs, 8 a host (N ≤ 8: one)  | N GPUs           | 79.1 GiB        | deviceless XLA    |
| h200xN   | GPUs, 8 a host (N ≤ 8: one)  | N GPUs           | 140.4 GiB       | deviceless XLA    |

Slice shapes are Cloud TPU's (v5p-256 is 4x4x8 chips); TPU hosts hold 2x2x1 chips (a
single-host v5e-8 / v6e-8 holds 2x4). GPU targets are XLA's GpuTargetConfigProto of an H100
SXM (specs/h100_sxm.txtpb, XLA's own spec less a field jaxlib 0.10 does not know); the H200
differs in memory size and bandwidth only.
"""

from __future__ import annotations

import dataclasses
import os
import re

GiB = 2**30

# Chips of each slice shape, as Cloud TPU lays them out (x, y, z).
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4),
              32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8),
              1024: (8, 8, 16), 2048: (8, 16, 16), 3072: (8, 16, 24), 4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class TpuFamily:
    name: str  # as in the slice name, v5p-256
    topology_prefix: str  # as libtpu names it, v5p:4x4x8
    cores_per_chip: int  # what N counts per chip
    memory: int  # HBM bytes per chip
    chip_config: str  # libtpu's: megacore makes one device of a chip's two TensorCores


TPU_FAMILIES = {f.name: f for f in (
    TpuFamily("v4", "v4", 2, 32 * GiB, "megacore"),
    TpuFamily("v5p", "v5p", 2, 95 * GiB, "default"),
    TpuFamily("v5e", "v5e", 1, 16 * GiB, "default"),
    TpuFamily("v6e", "v6e", 1, 32 * GiB, "default"),
)}

_SPEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "specs", "h100_sxm.txtpb")
H200_MEMORY = 150754820096  # 143,771 MiB, as an H200 SXM reports it


@dataclasses.dataclass(frozen=True)
class GpuKind:
    name: str
    memory: int  # bytes per GPU
    bandwidth: int  # bytes/s of HBM
    description: str


GPU_KINDS = {g.name: g for g in (
    GpuKind("h100", 84942979072, 3352320000000, "NVIDIA H100 80GB HBM3"),
    GpuKind("h200", H200_MEMORY, 4800000000000, "NVIDIA H200"),
)}
GPUS_PER_HOST = 8


class TargetError(ValueError):
    """A target name that names no known hardware, or a compiler that is not installed."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" or "gpu"
    devices: int
    device_memory: int  # bytes per device
    shape: tuple[int, ...]  # TPU: chips per axis; GPU: (hosts, GPUs per host)
    family: str

    def describe(self) -> str:
        if self.platform == "tpu":
            grid = "x".join(map(str, self.shape))
            return f"{self.name}: {self.devices} TPU {self.family} chips ({grid})"
        hosts, per_host = self.shape
        return (f"{self.name}: {self.devices} {GPU_KINDS[self.family].description} GPUs "
                f"({hosts} host{'s' * (hosts > 1)} of {per_host})")


def known_targets() -> list[str]:
    tpus = [f"{f.name}-{chips * f.cores_per_chip}" for f in TPU_FAMILIES.values()
            for chips in (_SHAPES_3D if f.cores_per_chip == 2 else _SHAPES_2D)]
    gpus = [f"{g}x{n}" for g in GPU_KINDS for n in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    return tpus + gpus


def _unknown(name: str, why: str) -> TargetError:
    examples = "v4-8 .. v4-8192, v5p-8 .. v5p-8192, v5e-1 .. v5e-256, v6e-1 .. v6e-256, " \
               "h100x1 / x2 / x4 / x8 / x16 ..., h200x8 ..."
    return TargetError(f"--target={name}: {why}; known targets: {examples}")


def parse_target(name: str) -> Target:
    """`v5p-256`, `v6e-64`, `h100x64`, ... → Target; TargetError names the known ones."""
    tpu = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
    gpu = re.fullmatch(r"(h100|h200)x(\d+)", name)
    if tpu:
        family, count = TPU_FAMILIES[tpu[1]], int(tpu[2])
        shapes = _SHAPES_3D if family.cores_per_chip == 2 else _SHAPES_2D
        if count % family.cores_per_chip or count // family.cores_per_chip not in shapes:
            what = "TensorCores (2 a chip)" if family.cores_per_chip == 2 else "chips"
            sizes = ", ".join(str(c * family.cores_per_chip) for c in shapes)
            raise _unknown(name, f"{family.name} slices count {what}: {sizes}")
        chips = count // family.cores_per_chip
        return Target(name, "tpu", chips, family.memory, shapes[chips], family.name)
    if gpu:
        count = int(gpu[2])
        if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST) or (
                count < GPUS_PER_HOST and GPUS_PER_HOST % count):
            raise _unknown(name, f"GPU nodes hold {GPUS_PER_HOST} GPUs: give 1, 2, 4, 8 or a "
                                 f"multiple of {GPUS_PER_HOST}")
        per_host = min(count, GPUS_PER_HOST)
        kind = GPU_KINDS[gpu[1]]
        return Target(name, "gpu", count, kind.memory, (count // per_host, per_host), kind.name)
    raise _unknown(name, "not a TPU slice (v5p-256) or GPU node set (h100x64)")


def gpu_target_config(kind: str) -> str:
    """XLA's GpuTargetConfigProto text for an H100 SXM or an H200."""
    with open(_SPEC) as f:
        text = f.read()
    if kind == "h100":
        return text
    g, h100 = GPU_KINDS[kind], GPU_KINDS["h100"]
    for field, old, new in (("device_memory_size", h100.memory, g.memory),
                            ("memory_bandwidth", h100.bandwidth, g.bandwidth)):
        text = text.replace(f"{field}: {old}", f"{field}: {new}")
    return text.replace(f'"{h100.description}"', f'"{g.description}"').replace(
        f"with {h100.memory}B RAM", f"with {g.memory}B RAM")


def compile_only_devices(target: Target) -> list:
    """The target's devices as compile-only devices on this machine (nothing runs on them).

    TargetError names the pip command when the target's compiler is not installed."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        try:
            import libtpu  # noqa: F401
        except ImportError:
            raise TargetError(f"--target={target.name} compiles with libtpu, which is not "
                              "installed: pip install 'jaxllm[aot]' (or \"jax[tpu]\" at this "
                              "jax's version)") from None
        # What libtpu would otherwise look up from a TPU VM's metadata server, then print
        # warnings about: this machine is not one, and the topology is named below. Its
        # one-process lock guards TPU chips, and compile-only devices have none: several
        # compiles (two test workers, two commands) may load it at once.
        for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                           ("TPU_ACCELERATOR_TYPE", target.name),
                           ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
            os.environ.setdefault(key, value)
        family = TPU_FAMILIES[target.family]
        hosts = (2, 4, 1) if target.devices == 8 and family.cores_per_chip == 1 else (2, 2, 1)
        hosts = tuple(min(h, s) for h, s in zip(hosts, (*target.shape, 1), strict=False))
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{family.topology_prefix}:"
            + "x".join(map(str, target.shape)), chip_config_name=family.chip_config,
            chips_per_host_bounds=hosts, num_slices=1)
        return list(topology.devices)
    import jax

    if jax.config.jax_platforms != "cpu":
        raise TargetError(f"--target={target.name}: deviceless GPU compilation needs "
                          "JAX_PLATFORMS=cpu set before jax is imported (python -m "
                          "jaxllm.compile sets it)")
    try:
        import jax_plugins.xla_cuda13  # noqa: F401
    except ImportError:
        raise TargetError(f"--target={target.name} compiles with XLA's CUDA plugin, which is "
                          "not installed: pip install 'jaxllm[aot]' (or "
                          "\"jax[cuda13-local]\" at this jax's version)") from None
    hosts, per_host = target.shape
    topology = topologies.get_topology_desc(
        platform="cuda", target_config=gpu_target_config(target.family),
        topology=f"1x{hosts}x{per_host}")
    return list(topology.devices)

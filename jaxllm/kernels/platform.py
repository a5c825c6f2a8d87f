"""Which hardware a kernel is traced for: the devices of the mesh in context.

A step compiled ahead of time for a TPU slice or a GPU node on a CPU machine must get that
target's kernels, so the choice reads the mesh being compiled for (`jax.set_mesh`, as training,
sharded decoding and `jaxllm.compile` do), never the machine's default backend. Only with no
mesh in context, where a jit runs on the default device, is that device asked.
"""

from __future__ import annotations

import jax

PLATFORMS = ("cpu", "gpu", "tpu")


def traced_platform() -> str:
    """'cpu', 'gpu' or 'tpu': the platform of the mesh in context, else of the default device."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = device.platform if device is not None else jax.devices()[0].platform
    return "gpu" if platform in ("cuda", "rocm") else platform

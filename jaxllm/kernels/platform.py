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


NN = (((1,), (0,)), ((), ()))  # dimension numbers of a @ b for 2-D blocks


def mxu_dot(a: jax.Array, b: jax.Array, dims=NN) -> jax.Array:
    """A TPU kernel's block matmul, float32 out. Precision: the configured one for float32
    operands, DEFAULT for 16-bit ones, whose single MXU pass is all there is: Mosaic refuses
    a float32 contraction of bfloat16 operands ("Bad lhs type"), which a global
    `jax_default_matmul_precision=highest` would otherwise ask of it."""
    precision = None if a.dtype.itemsize >= 4 else jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jax.numpy.float32,
                               precision=precision)

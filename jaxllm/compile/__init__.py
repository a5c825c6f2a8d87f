"""Ahead-of-time compilation for rented hardware, on any machine: `python -m jaxllm.compile`.

targets.py names the hardware (TPU slices, GPU nodes) and makes its compile-only devices;
program.py compiles each stage's steps for them and reads memory, collectives, kernels and
FLOPs off the compiled program; __main__.py is the command. Names resolve lazily, so that the
command sets JAX_PLATFORMS and XLA_FLAGS before anything imports jax.
"""

from jaxllm._lazy import lazy_exports

_API = {
    "StageReport": "jaxllm.compile.program",
    "compile_stages": "jaxllm.compile.program",
    "Target": "jaxllm.compile.targets",
    "TargetError": "jaxllm.compile.targets",
    "compile_only_devices": "jaxllm.compile.targets",
    "parse_target": "jaxllm.compile.targets",
}

__getattr__, __all__ = lazy_exports(__name__, _API)

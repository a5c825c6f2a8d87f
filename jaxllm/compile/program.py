"""Compile each stage's train and eval steps for a target's devices, and read the result.

What is compiled is what `jaxllm.main` runs (train/loop.py `stage_steps` over the state of
train/stages.py `abstract_train_state`, and a distill / dpo stage's frozen teacher / reference
params, train/teacher.py `frozen_model`), on the config's mesh over compile-only devices: the
state and batches are abstract (ShapeDtypeStructs with their shardings), nothing is allocated,
and lowering happens inside `jax.set_mesh`, so the kernels are the target's (Mosaic on TPU,
Triton on GPU; kernels/platform.py). From the compiled program: per-device memory
(`memory_analysis`), its collectives and Pallas kernels (counted in the optimised HLO text),
and the traced step's FLOPs (flops.py) against the model's training FLOPs.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mc

from jaxllm.checkpoint.state import abstract_like
from jaxllm.compile.flops import jaxpr_flops
from jaxllm.config.schema import stage_names
from jaxllm.model.transformer import abstract_params
from jaxllm.parallel import sharding
from jaxllm.train.loop import stage_steps
from jaxllm.train.metrics import flops_per_token
from jaxllm.train.stages import abstract_train_state, stage_model_config, stage_spans
from jaxllm.train.step import Distillation, Preference
from jaxllm.train.teacher import frozen_model

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")
# An op applied, `all-gather(` (async pairs counted by their start), not a name (%all-gather.1).
_OP = re.compile(r"(?<![\w%.-])(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_KERNELS = {"mosaic": 'custom_call_target="tpu_custom_call"',
            "triton": 'custom_call_target="__gpu$xla.gpu.triton"'}
BATCH_KEYS = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32,
              "positions": jnp.int32, "loss_mask": jnp.float32}


@dataclasses.dataclass
class StageReport:
    stage: str
    step: str  # "train" or "eval"
    arguments: int  # bytes per device
    outputs: int
    aliased: int  # outputs that reuse donated arguments
    temporaries: int
    compile_seconds: float
    collectives: dict[str, int]
    kernels: dict[str, int]
    flops_per_step: float  # of the traced step, all devices (flops.py)
    model_flops_per_step: float
    device_memory: int
    uncounted_kernels: int  # Pallas calls without a cost estimate, not in flops_per_step
    error: str = ""  # the compiler's refusal, if it refused
    hlo: str = dataclasses.field(default="", repr=False)  # the optimised HLO module's text

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def fits(self) -> bool:
        return not self.error and self.total <= self.device_memory

    def to_json(self) -> dict:
        return {"stage": self.stage, "step": self.step, "fits": self.fits,
                "bytes_per_device": {"arguments": self.arguments,
                                     "temporaries": self.temporaries,
                                     "outputs": self.outputs - self.aliased,
                                     "total": self.total},
                "device_memory": self.device_memory,
                "compile_seconds": round(self.compile_seconds, 1),
                "collectives": self.collectives, "kernels": self.kernels,
                "flops_per_step": self.flops_per_step,
                "model_flops_per_step": self.model_flops_per_step,
                "uncounted_kernel_calls": self.uncounted_kernels,
                **({"error": self.error} if self.error else {})}


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective instructions of an optimised HLO module by kind (async ones once)."""
    counts = collections.Counter(_OP.findall(hlo_text))
    return {k: counts[k] for k in COLLECTIVES if counts[k]}


def count_kernels(hlo_text: str) -> dict[str, int]:
    """Pallas kernels in an optimised HLO module: Mosaic (TPU) and Triton (GPU) calls."""
    return {kind: hlo_text.count(marker) for kind, marker in _KERNELS.items()}


def abstract_batch(config: mc.ConfigDict, stage_name: str, mesh) -> dict:
    """ShapeDtypeStructs of one global batch of the stage, on the mesh's batch sharding."""
    s = config.stages[stage_name]
    batch_sh = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((s.batch_size, s.seq_len), dtype, sharding=batch_sh)
            for k, dtype in BATCH_KEYS.items()}


def compile_stages(config: mc.ConfigDict, devices: list, device_memory: int,
                   stages: list[str] | None = None, eval_step: bool = True,
                   progress=None) -> list[StageReport]:
    """Compiles the train (and eval) step of each stage (all with steps > 0, or `stages`) for
    `devices`; a step the compiler refuses (TPU: over the chip's HBM) is reported with the
    compiler's message, not raised."""
    mesh = sharding.make_mesh(config, devices)
    spans = {s.name: s for s in stage_spans(config)}
    names = stages or [n for n in stage_names(config) if config.stages[n].steps]
    reports = []
    # No array may be created under a mesh of compile-only devices: shapes first, outside it.
    abstract, state_sh, _ = abstract_train_state(config, mesh)
    state = abstract_like(abstract, state_sh)
    # A distill / dpo stage's teacher / reference: its params' shapes, sharded as it would be.
    frozen = {}
    for name in names:
        kind, model_cfg = frozen_model(config, name, stage_model_config(config, name))
        if kind is not None:
            boxed = abstract_params(model_cfg)
            frozen[name] = kind, abstract_like(nn.unbox(boxed),
                                               sharding.param_shardings(boxed, mesh))
    with sharding.use_mesh(mesh):
        for name in names:
            s = config.stages[name]
            kind, frozen_params = frozen.get(name, (None, None))
            distill = kind if isinstance(kind, Distillation) else None
            preference = kind if isinstance(kind, Preference) else None
            train, evaluate, _ = stage_steps(config, spans[name], stage_model_config(config, name),
                                             mesh, state_sh, distill, preference)
            batch = abstract_batch(config, name, mesh)
            tokens = s.batch_size * s.seq_len
            model_flops = flops_per_token(config.model, s.seq_len) * tokens
            extra = () if kind is None else (frozen_params,)
            steps = [("train", train, (state, batch, *extra), model_flops)]
            if eval_step:  # a forward pass: a third of the training FLOPs (dpo: + reference)
                eval_args = (state.params, batch, *(extra if preference else ()))
                steps.append(("eval", evaluate, eval_args, model_flops / 3))
            for kind, fn, args, flops in steps:
                if progress:
                    progress(f"compiling {name} {kind} step ...")
                reports.append(_compile_one(name, kind, fn, args, flops, device_memory))
    return reports


def _compile_one(stage: str, kind: str, fn, args, model_flops: float,
                 device_memory: int) -> StageReport:
    start = time.perf_counter()
    traced = fn.trace(*args)
    flops = jaxpr_flops(traced.jaxpr.jaxpr)
    try:
        compiled = traced.lower().compile()
    except Exception as e:  # the TPU compiler refuses a program over the chip's memory
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        return StageReport(stage, kind, 0, 0, 0, 0, time.perf_counter() - start, {}, {},
                           flops.flops, model_flops, device_memory, flops.uncounted,
                           error=message.strip().splitlines()[0][:400])
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    return StageReport(
        stage, kind, memory.argument_size_in_bytes, memory.output_size_in_bytes,
        memory.alias_size_in_bytes, memory.temp_size_in_bytes, seconds,
        count_collectives(text), count_kernels(text), flops.flops, model_flops, device_memory,
        flops.uncounted, hlo=text)

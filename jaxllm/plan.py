"""`python -m jaxllm.plan --config=... [--devices=N] [--json]`: will this config fit?

A dry run that allocates nothing: parameter counts from `eval_shape`, per-device shard shapes
from the real sharding rules on an abstract mesh of `--devices` devices, and an estimate of
activation memory per stage. Dimension letters (docs/glossary.md), per device: Bl rows of a
micro-batch, Tl tokens of a row, Nl / Kl query / kv heads, Fl / Fel a dense / an expert's ffn
width, Vl vocab rows; D model dim, H head dim, L layers, S a row's length.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections as mc
from flax import linen as nn
from jax.sharding import AbstractMesh, AxisType

from jaxllm.config.load import load_config
from jaxllm.config.schema import ConfigError, stage_names
from jaxllm.config.validate import validate
from jaxllm.model import abstract_params, frozen
from jaxllm.parallel import sharding
from jaxllm.parallel.experts import capacity
from jaxllm.train.loss import num_chunks
from jaxllm.train.metrics import (
    PLANNED_MFU,
    ffn_widths,
    flops_per_token,
    format_seconds,
    step_seconds,
)
from jaxllm.train.teacher import frozen_model

ACCELERATORS = {"v5p": 95e9, "v6e": 32e9, "h100": 80e9}  # bytes of memory per chip
CHIPS = {"v5p": "tpu_v5p", "v6e": "tpu_v6e", "h100": "h100_sxm"}  # their metrics.RATED_PEAKS
# XLA needs headroom beyond live buffers (fragmentation, collectives' scratch).
USABLE_FRACTION = 0.9


def _bytes(dtype: str) -> int:
    return jnp.dtype(dtype).itemsize


def activation_parts(config: mc.ConfigDict, stage_name: str, axes: dict[str, int]) -> dict:
    """One device's temporaries in one micro-batch's forward + backward, by part (bytes):

      saved    what the forward pass keeps for the backward (remat full: each layer's input);
      layer    one layer's activations while it is recomputed and differentiated;
      weights  that layer's weights gathered over the FSDP axes in the compute dtype, twice:
               the layer that runs and the next one, fetched meanwhile;
      experts  MoE: the expert exchange's receive buffers, sized for the worst case (every
               routed copy of the group landing on one device: ep · tokens · top-k rows), the
               experts' Fl-wide intermediates and their gradients;
      loss     the head gathered likewise, its gradient over one chunk before that is
               reduce-scattered, and a chunk's float32 logits and their gradient.

    The loss runs between the last layer's forward pass and the first one's backward, so the
    peak (`peak_activations`) is `saved` plus the larger of the loss and a layer's working set.
    """
    m, s = config.model, config.stages[stage_name]
    batch_devices = math.prod(axes[a] for a in sharding.BATCH_AXES)
    Bl = s.batch_size / config.optimizer.grad_accum / batch_devices
    Tl, S = s.seq_len / axes["sequence"], s.seq_len
    tp, ep = axes["tensor"], axes["expert"]
    D, L, H, a = m.hidden_size, m.num_layers, m.head_dim, _bytes(m.dtype)
    Nl, Kl, Vl = m.num_heads / tp, m.num_kv_heads / tp, m.vocab_size / tp
    sparse = L // m.decoder_sparse_step if m.num_experts else 0
    # Fl: the dense SwiGLU width of a layer on one device (MoE: the shared expert's); Fel: an
    # expert's.
    Fl = (m.intermediate_size * (L - sparse) + m.shared_expert_intermediate_size * sparse) / L / tp
    Fel = m.moe_intermediate_size / tp
    # Attention's Tl×S float32 scores and probabilities with plain XLA softmax; the blockwise
    # kernels hold one block of keys (at most 512) at a time instead.
    scores = 2 * 4 * Nl * Tl * (S if m.attention_impl == "xla" else min(S, 512))
    # Everything one layer keeps for its backward pass, per token: norm outputs and residual
    # stream (5 D), q/k/v before and after RoPE, attention output, and the four Fl-wide MLP
    # intermediates.
    # Split over sequence, ring attention holds two more K/V blocks of Tl tokens while it
    # attends (the one it computes with and the one arriving) and keeps none for the backward.
    kv_others = 2 * Kl * H * 2 * Tl * a if S > Tl else 0
    layer = (Bl * Tl * a * (5 * D + 2 * (Nl + 2 * Kl) * H + Nl * H + 4 * Fl)
             + Bl * (scores + kv_others))
    carry = Bl * Tl * D * a  # the residual stream saved between layers under scan
    if m.remat == "none":
        saved, layer = L * layer, 0.0
    elif m.remat == "dots":  # matmul outputs are kept, elementwise results recomputed
        saved = L * (carry + Bl * Tl * a * ((Nl + 2 * Kl) * H + Nl * H + D + 3 * Fl))
    else:  # full: only the carry is kept; one layer is recomputed at a time
        saved = L * carry

    # q, k, v, o and the dense FFN (MoE: the shared expert, and a sparse layer's own experts).
    layer_weights = D * ((Nl + 2 * Kl) * H + Nl * H + 3 * Fl
                         + 3 * Fel * m.num_experts / ep * sparse / L)

    experts = 0.0
    if sparse:
        copies = Bl * Tl * m.num_experts_per_tok  # one device's routed copies (M rows)
        if m.moe_capacity_factor > 0:  # [E, Ec, D] slots, Ec counting one device's tokens
            rows = m.num_experts * capacity(m.moe_capacity_factor, int(Bl * Tl),
                                            m.num_experts_per_tok, m.num_experts)
        else:
            rows = ep * copies
        # Received rows and the experts' outputs with their gradients (4 D), the gate, up and
        # silu·up intermediates with theirs (6 Fel); the copies sent and returned (4 D).
        experts = rows * a * (4 * D + 6 * Fel) + copies * a * 4 * D

    chunk = S if config.loss.chunk_size <= 0 else S / num_chunks(S, config.loss.chunk_size)
    # The head three times (gathered, a chunk's gradient, a transposed copy); a chunk's logits
    # in float32 and their gradient in the compute dtype.
    loss = 3 * Vl * D * a + Bl * (chunk / axes["sequence"]) * Vl * (4 + a)
    return {"saved": saved, "layer": layer, "weights": 2 * layer_weights * a,
            "experts": experts, "loss": loss}


def peak_activations(parts: dict) -> float:
    """The peak of `activation_parts`: the saved activations, then the loss or one layer."""
    return parts["saved"] + max(parts["loss"], parts["layer"] + parts["weights"]
                                + parts["experts"])


def param_counts(model_cfg, mesh) -> tuple[int, int]:
    """(parameters, parameters per device under the sharding rules on `mesh`)."""
    boxed = abstract_params(model_cfg)
    shapes, specs = nn.unbox(boxed), sharding.param_shardings(boxed, mesh)
    return (sum(x.size for x in jax.tree.leaves(shapes)),
            sum(math.prod(sh.shard_shape(x.shape)) for x, sh in
                zip(jax.tree.leaves(shapes), jax.tree.leaves(specs), strict=True)))


def make_plan(config: mc.ConfigDict, num_devices: int) -> dict:
    validate(config)
    sizes = sharding.mesh_shape(config.mesh, num_devices)
    sharding.check_divisible(config, sizes)
    axes = dict(zip(sharding.MESH_AXES, sizes, strict=True))
    mesh = AbstractMesh(sizes, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(sizes))
    total, local = param_counts(config.model, mesh)
    m = config.model
    params = local * _bytes(m.param_dtype)
    optimizer = 2 * local * _bytes(m.param_dtype)  # Adam's two moments, like the params
    # Float32: the micro-batches' sum, and with accumulation the micro-batch's own beside it.
    gradients = local * 4 * (2 if config.optimizer.grad_accum > 1 else 1)
    stages, peak = {}, 0.0
    for name in stage_names(config):
        s = config.stages[name]
        if not s.steps:
            continue
        parts = activation_parts(config, name, axes)
        act = peak_activations(parts)
        # A distill / dpo stage's frozen teacher / reference: its params, sharded alike, and
        # its final hidden states, which the loss reads.
        kind, frozen_cfg = frozen_model(config, name, frozen(config.model))  # shapes only
        frozen_bytes = 0.0
        if kind is not None:
            tokens = s.batch_size / math.prod(axes[a] for a in sharding.BATCH_AXES) * s.seq_len
            frozen_bytes = (param_counts(frozen_cfg, mesh)[1] * _bytes(frozen_cfg.param_dtype)
                            + tokens / axes["sequence"] * frozen_cfg.hidden_size
                            * _bytes(frozen_cfg.dtype))
        peak = max(peak, act + frozen_bytes)
        flops_per_step = flops_per_token(m, s.seq_len) * s.batch_size * s.seq_len
        stages[name] = {"steps": s.steps, "seq_len": s.seq_len, "batch_size": s.batch_size,
                        "tokens_per_step": s.batch_size * s.seq_len,
                        "flops_per_token": flops_per_token(m, s.seq_len),
                        "step_seconds": {k: step_seconds(flops_per_step, num_devices, chip)
                                         for k, chip in CHIPS.items()},
                        "activation_bytes": act, "activation_parts": parts,
                        **({"frozen_model_bytes": frozen_bytes} if kind is not None else {})}
    total_bytes = params + optimizer + gradients + peak
    first = next(iter(stages.values()), {"seq_len": 4096})
    extra = {}
    if config.init.upcycle_from:  # reads the dense source's config only, no weights
        from jaxllm.convert import upcycle

        dense, _ = upcycle.read_dense_config(config.init.upcycle_from)
        extra["upcycle"] = upcycle.upcycle_plan(
            dense, m, config.init.upcycle_reinit,
            f"config.init.upcycle_from={config.init.upcycle_from!r}").describe()
    return {
        "params_total": total,
        # MoE: a token runs through K of the E experts of each sparse layer.
        "params_active": total - 3 * m.hidden_size * (ffn_widths(m)[0] - ffn_widths(m)[1]),
        "flops_per_token": flops_per_token(m, first["seq_len"]),
        "devices": num_devices,
        "mesh": axes,
        "bytes_per_device": {"params": params, "optimizer": optimizer, "gradients": gradients,
                             "activations": peak, "total": total_bytes},
        "fits": {name: total_bytes <= cap * USABLE_FRACTION for name, cap in ACCELERATORS.items()},
        "stages": stages,
        **extra,
    }


FAR_OVER = 2.0  # an estimate this many times what a device has is refused without compiling


def device_memory(devices: list) -> int | None:
    """Bytes each of `devices` (one kind) can hold: its memory_stats' limit on GPU / TPU; on
    CPU the memory available now, shared by the process's CPU devices. None: unknown."""
    device = devices[0]
    if device.platform != "cpu":
        return (device.memory_stats() or {}).get("bytes_limit")
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return available // sum(d.platform == "cpu" for d in jax.local_devices())


def check_fits(config: mc.ConfigDict, devices: list) -> None:
    """Raises ConfigError, in one line, for the first stage whose estimated bytes per device
    are over FAR_OVER times what each device has; allocates nothing (`make_plan`)."""
    capacity = device_memory(devices)
    if not capacity:
        return
    plan = make_plan(config, len(devices))
    b = plan["bytes_per_device"]
    static = b["params"] + b["optimizer"] + b["gradients"]
    for name, s in plan["stages"].items():
        need = static + s["activation_bytes"] + s.get("frozen_model_bytes", 0.0)
        if need > FAR_OVER * capacity:
            gib = lambda x: f"{x / 2**30:,.1f} GiB"  # noqa: E731
            raise ConfigError(
                f"stage {name} needs about {gib(need)} per device (python -m jaxllm.plan's "
                f"estimate: params {gib(b['params'])}, optimizer {gib(b['optimizer'])}, "
                f"gradients {gib(b['gradients'])}, activations {gib(s['activation_bytes'])}), "
                f"far over the {gib(capacity)} each of the {len(devices)} "
                f"{devices[0].platform} device{'s' * (len(devices) > 1)} has; what would fit: "
                "more devices (config.mesh), model.remat=full, optimizer.grad_accum, a smaller "
                f"stages.{name}.batch_size (see python -m jaxllm.plan, or jaxllm.compile "
                "--target=... for the hardware it is meant for); --config.check_memory=false "
                "skips this check")


def _gb(x: float) -> str:
    return f"{x / 1e9:8.2f} GB"


def _parts(parts: dict) -> str:
    """'saved 10.74 GB + layer 8.54 GB (weights 3.24 GB, experts 0.00 GB)', or '+ loss ...'."""
    working = parts["layer"] + parts["weights"] + parts["experts"]
    if parts["loss"] > working:
        return f"saved {_gb(parts['saved']).strip()} + loss {_gb(parts['loss']).strip()}"
    detail = ", ".join(f"{k} {_gb(parts[k]).strip()}" for k in ("weights", "experts")
                       if parts[k])
    return f"saved {_gb(parts['saved']).strip()} + layer {_gb(working).strip()} ({detail})"


def format_plan(plan: dict) -> str:
    b = plan["bytes_per_device"]
    lines = [
        f"parameters      {plan['params_total'] / 1e9:.3f}B total, "
        f"{plan['params_active'] / 1e9:.3f}B active",
        f"mesh            {plan['devices']} device{'s' * (plan['devices'] != 1)}: "
        + (" × ".join(f"{k}={v}" for k, v in plan["mesh"].items() if v > 1) or "no axis split"),
        "per device      " + ", ".join(f"{k} {_gb(v).strip()}" for k, v in b.items()),
        "fits            " + ", ".join(
            f"{k} ({ACCELERATORS[k] / 1e9:.0f} GB): {'yes' if ok else 'no'}"
            for k, ok in plan["fits"].items()),
        "stages:",
    ]
    for name, s in plan["stages"].items():
        lines.append(f"  {name:<13} {s['steps']:>9} steps, seq_len {s['seq_len']:>6}, "
                     f"{s['tokens_per_step']:>10,} tokens/step, "
                     f"{s['flops_per_token'] / 1e9:.2f} GFLOP/token, "
                     f"activations {_gb(s['activation_bytes']).strip()} "
                     f"({_parts(s['activation_parts'])})"
                     + (f", teacher / reference {_gb(s['frozen_model_bytes']).strip()}"
                        if "frozen_model_bytes" in s else ""))
        lines.append(f"  {'':<13} a step at " + " / ".join(f"{m:.0%}" for m in PLANNED_MFU)
                     + " MFU (rated peaks): " + ", ".join(
                         f"{k} {format_seconds(t)}" for k, t in s["step_seconds"].items()))
    if "upcycle" in plan:
        lines.append(f"init            {plan['upcycle']}")
    return "\n".join(lines)


def main(argv: list[str], overrides: list[str]) -> None:
    from absl import flags, logging

    from jaxllm.config.cli import run_command

    F = flags.FLAGS  # defined below, only when run as a program (tests import make_plan)
    logging.set_verbosity(logging.WARNING)
    plan = run_command(lambda: make_plan(load_config(F.config, overrides),
                                         F.devices or jax.device_count()))
    print(json.dumps(plan, indent=1) if F.json else format_plan(plan))


if __name__ == "__main__":
    from absl import flags

    from jaxllm.config.cli import run_with_overrides

    flags.DEFINE_string("config", None, "Config file, optionally with :ARG; then any number of "
                        "--config.KEY=VALUE overrides.")
    flags.DEFINE_integer("devices", None, "Devices to plan for (default: those present).")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
    flags.mark_flag_as_required("config")
    run_with_overrides(main)

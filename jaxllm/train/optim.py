"""AdamW and learning-rate schedules.

The optax chain holds no learning rate: each stage has its own schedule of its own step,
and the train step multiplies the update by `schedule(stage_step)`. So Adam's moments can
carry across stages while the schedule restarts.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections as mc
import optax

Schedule = Callable[[jax.Array], jax.Array]


def decay_mask(params: dict) -> dict:
    """Weight decay on matrices only: not on norm scales and biases (all 1-D per layer)."""

    def decays(path, leaf) -> bool:
        name = getattr(path[-1], "key", "")
        return name not in ("scale", "bias")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt: mc.ConfigDict) -> optax.GradientTransformation:
    """Clip by global norm (clip_norm 0: off), then Adam, then decoupled weight decay; the
    caller scales by -lr. Off is the identity, whose state is the clip's: a run may turn it
    off or on when it resumes."""
    return optax.chain(
        optax.clip_by_global_norm(opt.clip_norm) if opt.clip_norm else optax.identity(),
        optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps),
        optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
    )


def make_schedule(lr: mc.ConfigDict, steps: int) -> Schedule:
    """Step → learning rate for one stage of `steps` steps.

    cosine: linear warmup to `peak`, cosine to `end`. linear: warmup, then a straight line to
    `end`. constant: warmup, then `peak`. wsd (warmup-stable-decay): warmup, `peak` until the
    last `decay_fraction` of the steps, then linear to `end`.
    """
    peak, end, warmup = float(lr.peak), float(lr.end), int(lr.warmup_steps)
    steps = max(int(steps), 1)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1) / max(warmup, 1)
        # The last step (steps - 1) lands exactly on `end`.
        frac = jnp.clip((step - warmup) / max(steps - 1 - warmup, 1), 0.0, 1.0)
        if lr.schedule == "cosine":
            after = end + (peak - end) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
        elif lr.schedule == "linear":
            after = peak + (end - peak) * frac
        elif lr.schedule == "constant":
            after = jnp.full_like(frac, peak)
        elif lr.schedule == "wsd":
            decay_start = steps - int(round(lr.decay_fraction * steps))
            decay_frac = jnp.clip((step - decay_start) / max(steps - 1 - decay_start, 1), 0.0, 1.0)
            after = peak + (end - peak) * decay_frac
        else:
            raise ValueError(f"unknown lr.schedule {lr.schedule!r}")
        return jnp.where(step < warmup, warm, after)

    return schedule

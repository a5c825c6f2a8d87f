"""The mixture-of-experts FFN of Qwen2-MoE, and the router statistics its losses need.

Dimension letters (docs/glossary.md): B batch, T length, D model dim, E experts, k experts per
token, Fe an expert's ffn dim, Lg scanned layer groups.

`SparseMoE` computes what transformers' `Qwen2MoeSparseMoeBlock` computes:

    probs = softmax(float32(x @ router))             router: a bias-free D → E projection
    weights, experts = top-k of probs                 renormalised to sum 1 if norm_topk_prob
    y = Σ_j weights_j · expert_{experts_j}(x)         routed SwiGLU experts of size Fe
      + sigmoid(x @ shared_expert_gate) · shared(x)   a SwiGLU of shared_expert_intermediate_size

The routing runs here in plain XLA; sorting the token-copies by expert, the grouped matmuls and
expert parallelism (all-to-all over the `expert` mesh axis, inside `jax.shard_map`) are
jaxllm/parallel/experts.py. Parameters: `router/kernel` [D, E], `experts/{gate,up}_proj` [E, D, Fe],
`experts/down_proj` [E, Fe, D], `shared_expert/{gate,up,down}_proj/kernel`,
`shared_expert_gate/kernel` [D, 1]; logical axes `expert` (split over the expert mesh axis)
and `expert_mlp` (over tensor).

Each sparse layer also returns its router statistics (sums over its tokens, so they add over
layers, micro-batches and devices, and do not care about the order of tokens): `router_losses`
turns the sums of all layers into the Switch load-balancing loss exactly as transformers'
`load_balancing_loss_func` computes it, the router z-loss and the expert-load metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mc
from flax import linen as nn

from jaxllm.model.layers import MLP, Linear, dtype_of, init_normal
from jaxllm.parallel import experts


class Experts(nn.Module):
    """E routed SwiGLU experts, stored stacked; dispatch in jaxllm/parallel/experts.py."""

    cfg: mc.FrozenConfigDict

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, weights_BxTxk: jax.Array, experts_BxTxk: jax.Array):
        cfg = self.cfg
        E, D, Fe = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size

        def param(name, shape, axes):
            return self.param(name, init_normal(cfg.init_std, axes), shape,
                              dtype_of(cfg.param_dtype)).astype(dtype_of(cfg.dtype))

        gate_ExDxFe = param("gate_proj", (E, D, Fe), ("expert", "embed", "expert_mlp"))
        up_ExDxFe = param("up_proj", (E, D, Fe), ("expert", "embed", "expert_mlp"))
        down_ExFexD = param("down_proj", (E, Fe, D), ("expert", "expert_mlp", "embed"))
        return experts.experts_ffn(x_BxTxD, weights_BxTxk, experts_BxTxk, gate_ExDxFe, up_ExDxFe,
                                   down_ExFexD, impl=cfg.moe_impl,
                                   capacity_factor=cfg.moe_capacity_factor)


class SparseMoE(nn.Module):
    """x [B, T, D] → (y [B, T, D], this layer's router statistics: sums over its tokens of
    the top-k one-hots (counts [E]) and of the probabilities (probs [E]), z = Σ
    logsumexp(router logits)², the tokens, and the token-copies the capacity dropped)."""

    cfg: mc.FrozenConfigDict

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> tuple[jax.Array, dict]:
        cfg = self.cfg
        logits_BxTxE = Linear((cfg.num_experts,), ("embed", "router"), cfg,
                              name="router")(x_BxTxD).astype(jnp.float32)
        probs_BxTxE, weights_BxTxk, experts_BxTxk = experts.route(
            logits_BxTxE, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        y_BxTxD, dropped = Experts(cfg, name="experts")(x_BxTxD, weights_BxTxk, experts_BxTxk)
        if cfg.shared_expert_intermediate_size:
            shared_BxTxD = MLP(cfg, cfg.shared_expert_intermediate_size,
                               name="shared_expert")(x_BxTxD)
            gate_BxTx1 = Linear((1,), ("embed", "router"), cfg, name="shared_expert_gate")(x_BxTxD)
            y_BxTxD = y_BxTxD + jax.nn.sigmoid(gate_BxTx1) * shared_BxTxD
        stats = {
            "counts": jnp.sum(jax.nn.one_hot(experts_BxTxk, cfg.num_experts, dtype=jnp.float32),
                              axis=(0, 1, 2)),
            "probs": jnp.sum(probs_BxTxE, axis=(0, 1)),
            "z": jnp.sum(jnp.square(jax.nn.logsumexp(logits_BxTxE, axis=-1))),
            "tokens": jnp.float32(x_BxTxD.shape[0] * x_BxTxD.shape[1]),
            "dropped": dropped.astype(jnp.float32),
        }
        return y_BxTxD.astype(x_BxTxD.dtype), stats


def router_losses(stats_Lg: dict, cfg: mc.FrozenConfigDict) -> dict:
    """The statistics of every scanned layer group (leading axis Lg) → losses and metrics:

    aux_loss       E · Σ_e (tokens routed to e / N) · (Σ probs of e / N), N the tokens of all
                   sparse layers together (transformers' load_balancing_loss_func); with
                   `router_aux_loss_per_layer`, the same of each sparse layer, averaged
    router_z_loss  mean over tokens and sparse layers of logsumexp(router logits)²
    expert_load    max over layers and experts of the tokens an expert got, over the mean (1
                   is perfect balance)
    dropped_frac   token-copies dropped by the capacity / all token-copies
    """
    counts_LgxE = stats_Lg["counts"]
    tokens = jnp.maximum(jnp.sum(stats_Lg["tokens"]), 1.0)
    share_E = jnp.sum(counts_LgxE, axis=0) / tokens
    prob_E = jnp.sum(stats_Lg["probs"], axis=0) / tokens
    mean_Lg = stats_Lg["tokens"] * cfg.num_experts_per_tok / cfg.num_experts
    sparse = stats_Lg["tokens"] > 0
    load = jnp.max(jnp.where(sparse[:, None],
                             counts_LgxE / jnp.where(sparse, mean_Lg, 1.0)[:, None], 0.0))
    if cfg.router_aux_loss_per_layer:
        tokens_Lg = jnp.maximum(stats_Lg["tokens"], 1.0)[:, None]
        share_LgxE = counts_LgxE / tokens_Lg
        aux_Lg = cfg.num_experts * jnp.sum(share_LgxE * stats_Lg["probs"] / tokens_Lg, 1)
        aux = jnp.sum(jnp.where(sparse, aux_Lg, 0.0)) / jnp.maximum(jnp.sum(sparse), 1)
    else:
        aux = cfg.num_experts * jnp.sum(share_E * prob_E)
    return {"aux_loss": aux,
            "router_z_loss": jnp.sum(stats_Lg["z"]) / tokens,
            "expert_load": load,
            "dropped_frac": jnp.sum(stats_Lg["dropped"]) / (tokens * cfg.num_experts_per_tok)}

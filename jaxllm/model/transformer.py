"""The decoder-only transformer (Qwen2 / Llama) and its pure-function entry points.

Dimension letters: B batch, T length, D model dim, V vocab, L layers.
Layers run under `nn.scan`, so an 80-layer model traces and compiles one layer; their
parameters carry a leading L axis (logical name `layers`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections as mc
from flax import linen as nn

from jaxllm.model.attention import Attention
from jaxllm.model.layers import MLP, RMSNorm, dtype_of, init_normal

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    cfg: mc.FrozenConfigDict

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
                 segment_ids_BxT: jax.Array) -> tuple[jax.Array, None]:
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)  # noqa: E731
        x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "act_embed"))
        h_BxTxD = x_BxTxD + Attention(cfg, name="attn")(
            norm("attn_norm")(x_BxTxD), positions_BxT, segment_ids_BxT)
        out_BxTxD = h_BxTxD + MLP(cfg, name="mlp")(norm("mlp_norm")(h_BxTxD))
        return out_BxTxD, None


class Transformer(nn.Module):
    cfg: mc.FrozenConfigDict

    @nn.compact
    def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array,
                 segment_ids_BxT: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = dtype_of(cfg.dtype)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                         param_dtype=dtype_of(cfg.param_dtype),
                         embedding_init=init_normal(cfg.init_std, ("vocab", "embed")),
                         name="embed")
        x_BxTxD = embed(tokens_BxT)

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, prevent_cse=False, policy=_REMAT_POLICIES[cfg.remat])
        layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x_BxTxD, _ = layers(cfg, name="layers")(x_BxTxD, positions_BxT, segment_ids_BxT)
        x_BxTxD = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x_BxTxD)

        if cfg.tie_embeddings:
            head_VxD = embed.embedding.astype(dtype)
            return jnp.einsum("btd,vd->btv", x_BxTxD, head_VxD, preferred_element_type=jnp.float32)
        head_DxV = self.param("lm_head", lambda *a: {"kernel": init_normal(
            cfg.init_std, ("embed", "vocab"))(*a)}, (cfg.hidden_size, cfg.vocab_size),
            dtype_of(cfg.param_dtype))["kernel"]
        return jnp.einsum("btd,dv->btv", x_BxTxD, head_DxV.astype(dtype),
                          preferred_element_type=jnp.float32)


def frozen(model_config: mc.ConfigDict | mc.FrozenConfigDict) -> mc.FrozenConfigDict:
    """Linen module attributes must be hashable: a FrozenConfigDict is."""
    if isinstance(model_config, mc.FrozenConfigDict):
        return model_config
    return mc.FrozenConfigDict(model_config)


def default_positions_and_segments(tokens_BxT: jax.Array, positions_BxT=None,
                                   segment_ids_BxT=None) -> tuple[jax.Array, jax.Array]:
    B, T = tokens_BxT.shape
    if positions_BxT is None:
        positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones((B, T), jnp.int32)
    return positions_BxT, segment_ids_BxT


def _dummy_inputs() -> tuple[jax.Array, jax.Array, jax.Array]:
    ones = jnp.ones((1, 1), jnp.int32)
    return ones, ones * 0, ones


def abstract_params(model_config) -> dict:
    """Parameter shapes with their logical-axis boxes, allocating nothing (`eval_shape`)."""
    model = Transformer(frozen(model_config))
    return jax.eval_shape(lambda rng: model.init(rng, *_dummy_inputs())["params"],
                          jax.random.key(0))


def init_params(model_config, rng: jax.Array) -> dict:
    """Unsharded init, for tests and small models (training uses sharded init in train/)."""
    model = Transformer(frozen(model_config))
    # jit: eager init dispatches op by op and takes seconds even for a tiny model.
    return jax.jit(lambda r: nn.unbox(model.init(r, *_dummy_inputs())["params"]))(rng)


def param_count(model_config) -> int:
    return sum(x.size for x in jax.tree.leaves(nn.unbox(abstract_params(model_config))))


def apply(model_config, params: dict, tokens_BxT: jax.Array, positions_BxT: jax.Array,
          segment_ids_BxT: jax.Array) -> jax.Array:
    """Traceable forward (use inside jit): logits float32 [B, T, V]."""
    return Transformer(frozen(model_config)).apply(
        {"params": params}, tokens_BxT, positions_BxT, segment_ids_BxT)


@functools.partial(jax.jit, static_argnums=0)
def _forward_jit(model_config, params, tokens_BxT, positions_BxT, segment_ids_BxT):
    return apply(model_config, params, tokens_BxT, positions_BxT, segment_ids_BxT)


def forward(model_config, params: dict, tokens: jax.Array, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None) -> jax.Array:
    """`jaxllm.forward`: int32 tokens [B, T] → float32 logits [B, T, V]; no dropout.

    `positions` default to 0..T-1 and `segment_ids` to one document per row.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    positions, segment_ids = default_positions_and_segments(tokens, positions, segment_ids)
    return _forward_jit(frozen(model_config), params, tokens, jnp.asarray(positions, jnp.int32),
                        jnp.asarray(segment_ids, jnp.int32))

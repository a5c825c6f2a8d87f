"""The decoder-only transformer (Qwen2 / Llama) and its pure-function entry points.

Dimension letters (docs/glossary.md): B batch, T length, D model dim, V vocab, L layers, Lg layer
groups.
Layers run under `nn.scan`, so an 80-layer model traces and compiles one layer; their
parameters carry a leading L axis (logical name `layers`). `model.scan_layers=False` runs the
same stacked parameters in a Python loop instead (`layer_loop`: faster steps for small models
on CPU, compile time grows with depth).

Mixture of experts (jaxllm/model/moe.py): layer i is sparse when (i + 1) % decoder_sparse_step
== 0. With a step of 1 every layer is sparse and the scan is over layers as for dense models
(params `layers/mlp/...` with the MoE's children). With a step > 1 the scan is over the
Lg = L / step groups of `step` layers, step - 1 dense then one sparse (`Group`; params
`layers/layer_{j}/...` with a leading Lg axis): compile time stays that of one group, whatever
the depth. Each scanned step also returns its router statistics, which `apply(with_aux=True)`
turns into the MoE losses and metrics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections as mc
from flax import linen as nn

from jaxllm.model.attention import Attention
from jaxllm.model.layers import MLP, RMSNorm, dtype_of, init_normal
from jaxllm.model.moe import SparseMoE, router_losses

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.)), the mlp a SwiGLU or,
    when `sparse`, the MoE. Returns (x, (kv, router statistics))."""

    cfg: mc.FrozenConfigDict
    sparse: bool = False

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, segment_ids_BxT: jax.Array,
                 kv=None, kv_meta=None) -> tuple[jax.Array, tuple]:
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)  # noqa: E731
        x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "act_embed"))
        attn_BxTxD, kv = Attention(cfg, name="attn")(
            norm("attn_norm")(x_BxTxD), positions_BxT, segment_ids_BxT, kv, kv_meta)
        h_BxTxD = x_BxTxD + attn_BxTxD
        if self.sparse:
            mlp_BxTxD, stats = SparseMoE(cfg, name="mlp")(norm("mlp_norm")(h_BxTxD))
        else:
            mlp_BxTxD, stats = MLP(cfg, name="mlp")(norm("mlp_norm")(h_BxTxD)), None
        return h_BxTxD + mlp_BxTxD, (kv, stats)


class Group(nn.Module):
    """decoder_sparse_step = k layers, `layer_0` .. `layer_{k-1}`, the last one sparse; the
    scanned unit of an MoE model whose dense and sparse layers alternate. Its KV cache slices
    are [k, ...]."""

    cfg: mc.FrozenConfigDict

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, kv=None, kv_meta=None):
        k = self.cfg.decoder_sparse_step
        ks, vs = [], []
        for j in range(k):
            x_BxTxD, (kv_j, stats) = Block(self.cfg, sparse=j == k - 1, name=f"layer_{j}")(
                x_BxTxD, positions_BxT, segment_ids_BxT,
                None if kv is None else (kv[0][j], kv[1][j]), kv_meta)
            if kv_j is not None:
                ks.append(kv_j[0])
                vs.append(kv_j[1])
        return x_BxTxD, ((jnp.stack(ks), jnp.stack(vs)) if ks else None, stats)


def layer_groups(cfg) -> tuple[int, int]:
    """(Lg scanned steps, layers per step): decoder_sparse_step layers for an MoE model whose
    sparse layers are not every layer, else 1."""
    step = cfg.decoder_sparse_step if cfg.num_experts and cfg.decoder_sparse_step > 1 else 1
    return cfg.num_layers // step, step


class Transformer(nn.Module):
    """tokens, positions, segment ids [B, T] → float32 logits [B, T, V].

    With a KV `cache` (see `init_cache`; decoding only) it returns the logits of the last
    position [B, V], which is all sampling needs, and the cache with these tokens written.
    """

    cfg: mc.FrozenConfigDict

    @nn.compact
    def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array,
                 segment_ids_BxT: jax.Array, cache: dict | None = None, with_aux: bool = False,
                 head_out: bool = True):
        cfg = self.cfg
        dtype = dtype_of(cfg.dtype)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                         param_dtype=dtype_of(cfg.param_dtype),
                         embedding_init=init_normal(cfg.init_std, ("vocab", "embed")),
                         name="embed")
        # The table whole along V, still split along D: every device looks up all the batch's
        # tokens in its columns, then an all-to-all hands each its own tokens' rows. With V
        # split over tensor too, the partitioner would instead replicate the whole batch's
        # embeddings on every device. Cast on the shard: the lookup's gradient in bf16.
        table_VxD = nn.with_logical_constraint(embed.embedding.astype(dtype), (None, "embed"))
        x_BxTxD = jnp.take(table_VxD, tokens_BxT, axis=0)
        x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "act_embed"))

        Lg, step = layer_groups(cfg)
        unit = Group if step > 1 else Block
        kwargs = {"sparse": True} if cfg.num_experts and step == 1 else {}

        def scan(block, in_axes):
            return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=in_axes, length=Lg,
                           metadata_params={nn.PARTITION_NAME: "layers"})(
                               cfg, name="layers", **kwargs)

        if cache is None and not cfg.scan_layers and not self.is_initializing():
            x_BxTxD, stats_Lg = layer_loop(
                functools.partial(unit, cfg, **kwargs), self.variables["params"]["layers"],
                cfg.remat, x_BxTxD, positions_BxT, segment_ids_BxT)
        elif cache is None:
            block = unit
            if cfg.remat != "none":
                block = nn.remat(unit, prevent_cse=False, policy=_REMAT_POLICIES[cfg.remat])
            x_BxTxD, (_, stats_Lg) = scan(block, (nn.broadcast, nn.broadcast))(
                x_BxTxD, positions_BxT, segment_ids_BxT)
        else:
            # Each layer gets its slice of the cache (scanned); segment ids and slot are shared.
            index = cache["index"]
            kv_segment_ids_BxS = jax.lax.dynamic_update_slice(
                cache["segment_ids"], segment_ids_BxT.astype(jnp.int32), (0, index))
            by_group = lambda x: x.reshape(Lg, step, *x.shape[1:]) if step > 1 else x  # noqa: E731
            x_BxTxD, ((k_cache, v_cache), stats_Lg) = scan(
                unit, (nn.broadcast, nn.broadcast, 0, nn.broadcast))(
                x_BxTxD, positions_BxT, segment_ids_BxT,
                (by_group(cache["k"]), by_group(cache["v"])), (kv_segment_ids_BxS, index))
            cache = {"k": k_cache.reshape(cache["k"].shape),
                     "v": v_cache.reshape(cache["v"].shape),
                     "segment_ids": kv_segment_ids_BxS, "index": index + tokens_BxT.shape[1]}
            x_BxTxD = x_BxTxD[:, -1:]
        x_BxTxD = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x_BxTxD)

        if cfg.tie_embeddings:
            head = embed.embedding
        else:
            head = self.param("lm_head", lambda *a: {"kernel": init_normal(
                cfg.init_std, ("embed", "vocab"))(*a)}, (cfg.hidden_size, cfg.vocab_size),
                dtype_of(cfg.param_dtype))["kernel"]
        aux = router_losses(stats_Lg, cfg) if cache is None and cfg.num_experts else {}
        if not head_out:  # the loss applies the head itself, a chunk of tokens at a time
            return x_BxTxD, aux
        logits_BxTxV = vocab_logits(cfg, head, x_BxTxD)
        if cache is not None:
            return logits_BxTxV[:, 0], cache
        return (logits_BxTxV, aux) if with_aux else logits_BxTxV


def layer_loop(make_unit, stacked: dict, remat: str, x_BxTxD: jax.Array,
               positions_BxT: jax.Array, segment_ids_BxT: jax.Array):
    """The scanned layers applied one after the other in Python (`model.scan_layers=False`):
    unit g runs on slice g of the same stacked parameters [Lg, ...], so checkpoints do not
    change. XLA compiles every layer, but autodiff keeps each layer's residuals as they are
    instead of copying them into [Lg, ...] buffers and back, which on CPU makes a small
    model's step about 10 % faster. Returns (x, router statistics stacked over Lg or None)."""
    def one(params, x_BxTxD):
        x_BxTxD, (_, stats) = make_unit().apply({"params": params}, x_BxTxD, positions_BxT,
                                                segment_ids_BxT)
        return x_BxTxD, stats

    if remat != "none":
        one = jax.checkpoint(one, prevent_cse=False, policy=_REMAT_POLICIES[remat])
    stats = []
    for g in range(jax.tree.leaves(stacked)[0].shape[0]):
        x_BxTxD, stats_g = one(jax.tree.map(lambda a: a[g], stacked), x_BxTxD)  # noqa: B023
        stats.append(stats_g)
    if stats[0] is None:
        return x_BxTxD, None
    return x_BxTxD, jax.tree.map(lambda *a: jnp.stack(a), *stats)


def vocab_logits(cfg, head: jax.Array, x_BxTxD: jax.Array) -> jax.Array:
    """float32 logits [B, T, V] of final hidden states: `head` is the embedding [V, D] when
    tied, else lm_head's kernel [D, V] (see `head_weight`)."""
    spec = "btd,vd->btv" if cfg.tie_embeddings else "btd,dv->btv"
    return jnp.einsum(spec, x_BxTxD, head.astype(dtype_of(cfg.dtype)),
                      preferred_element_type=jnp.float32)


def head_weight(cfg, params: dict) -> jax.Array:
    """The output head's weight in `params`, as `vocab_logits` takes it."""
    return params["embed"]["embedding"] if cfg.tie_embeddings else params["lm_head"]["kernel"]


def init_cache(model_config, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for `batch` rows of up to `max_len` tokens: k and v
    [L, B, S, K, H] in the model's compute dtype (or `dtype`), segment ids [B, S] (0 = empty),
    and `index`, the next slot to write."""
    cfg = frozen(model_config)
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or dtype_of(cfg.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.int32(0)}


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
          segment_ids_BxT: jax.Array, cache: dict | None = None, with_aux: bool = False,
          head_out: bool = True):
    """Traceable forward (use inside jit): logits float32 [B, T, V]; with a KV cache,
    (last position's logits [B, V], updated cache) as `Transformer` says; `with_aux` (no
    cache): (logits, aux), aux the MoE losses and metrics of jaxllm/model/moe.py
    `router_losses` ({} for a dense model). `head_out=False` (no cache): (the final normed
    hidden states [B, T, D], aux) instead, for a loss that applies `vocab_logits` itself."""
    return Transformer(frozen(model_config)).apply(
        {"params": params}, tokens_BxT, positions_BxT, segment_ids_BxT, cache, with_aux,
        head_out)


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

"""Decoding with a KV cache: `generate_ids` (token ids in and out) and `generate` (text in and
out, the notebook API's `jaxllm.generate`); the command is jaxllm/generate.py.

Prompts are left-padded to one length P, a power of two so that prompts of
similar length share a compilation. Padding is segment 0, which no real token attends to, and
positions count from each prompt's first token (what transformers does with an attention
mask), so a padded prompt decodes exactly as it would alone. One jitted function prefills the
cache with the whole prompt, then runs a `lax.while_loop` of decode steps, one token per step,
until every row has produced EOS or `max_new_tokens` tokens. The cache holds P +
max_new_tokens slots per row: k and v [L, B, S, K, H] in the model's compute dtype.

Sampling, per row: temperature 0 is greedy (argmax); otherwise logits / temperature, then
top-k (keep the k most likely tokens), then top-p (keep the smallest set of most likely
tokens whose probability reaches p), the order transformers applies them in.

A model larger than one device decodes on a mesh (`load_model(..., mesh="tensor:4,fsdp:2")`,
`--mesh=tensor:4,fsdp:2`, or `mesh=`): the params take their training shardings
(parallel/sharding.py), the cache splits its kv heads over `tensor` and its rows over
data×fsdp×expert, and the batch is padded to a multiple of it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
from flax import linen as nn

from jaxllm.model.transformer import abstract_params, apply, frozen, init_cache
from jaxllm.parallel import sharding

CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")  # k and v [L, B, S, K, H]


def sample(logits_BxV: jax.Array, rng: jax.Array, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
    """One token id per row (int32 [B]); see the module docstring for the rules."""
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    if not top_k and top_p >= 1:
        return jax.random.categorical(rng, logits_BxV).astype(jnp.int32)
    # Candidates Vc in descending order of probability: the top k, or every token.
    if top_k:
        logits_BxVc, ids_BxVc = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))
    else:
        ids_BxVc = jnp.argsort(-logits_BxV, axis=-1)
        logits_BxVc = jnp.take_along_axis(logits_BxV, ids_BxVc, axis=-1)
    if top_p < 1:
        probs_BxVc = jax.nn.softmax(logits_BxVc, axis=-1)
        before_BxVc = jnp.cumsum(probs_BxVc, axis=-1) - probs_BxVc  # mass of the likelier ones
        logits_BxVc = jnp.where(before_BxVc < top_p, logits_BxVc, -jnp.inf)  # the first stays
    choice_B = jax.random.categorical(rng, logits_BxVc)
    return jnp.take_along_axis(ids_BxVc, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model_config", "max_new_tokens", "num_ids",
                                             "temperature", "top_k", "top_p"))
def _generate(params: dict, tokens_BxP: jax.Array, positions_BxP: jax.Array,
              segment_ids_BxP: jax.Array, rng: jax.Array, eos_id: jax.Array, *,
              model_config: mc.FrozenConfigDict, max_new_tokens: int, num_ids: int,
              temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Prefill, then decode; new tokens [B, max_new_tokens], eos_id after a row's EOS."""
    B, P = tokens_BxP.shape
    V = model_config.vocab_size

    def pick(logits_BxV: jax.Array, key: jax.Array) -> jax.Array:
        if num_ids < V:  # rows past the tokenizer's ids (vocab padding) are never sampled
            logits_BxV = jnp.where(jnp.arange(V) < num_ids, logits_BxV, -jnp.inf)
        return sample(logits_BxV, key, temperature, top_k, top_p)

    cache = init_cache(model_config, B, P + max_new_tokens)
    for name in ("k", "v"):  # a no-op without a mesh
        cache[name] = nn.with_logical_constraint(cache[name], CACHE_AXES)
    logits_BxV, cache = apply(model_config, params, tokens_BxP, positions_BxP,
                              segment_ids_BxP, cache)
    rng, key = jax.random.split(rng)
    token_B = pick(logits_BxV, key)
    out_BxN = jnp.full((B, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(token_B)
    next_position_B = positions_BxP[:, -1] + 1

    def unfinished(carry) -> jax.Array:
        i, _, done_B, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def step(carry):  # token i-1 in, token i out
        i, out_BxN, done_B, cache, rng = carry
        logits_BxV, cache = apply(model_config, params, out_BxN[:, i - 1, None],
                                  (next_position_B + i - 1)[:, None],
                                  jnp.ones((B, 1), jnp.int32), cache)
        rng, key = jax.random.split(rng)
        token_B = jnp.where(done_B, eos_id, pick(logits_BxV, key))
        return i + 1, out_BxN.at[:, i].set(token_B), done_B | (token_B == eos_id), cache, rng

    _, out_BxN, _, _, _ = jax.lax.while_loop(
        unfinished, step, (1, out_BxN, token_B == eos_id, cache, rng))
    return out_BxN


def _bucket(n: int) -> int:
    return max(8, 1 << (n - 1).bit_length())


def generate_ids(model_config, params: dict, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int, *, eos_id: int | None = None, num_ids: int | None = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 mesh: jax.sharding.Mesh | None = None) -> list[list[int]]:
    """Token ids in, new token ids out, one list per prompt; a row that produces `eos_id`
    stops there (the EOS is included, as transformers does). Only ids below `num_ids`
    (default: every row of the vocabulary) are sampled. `mesh`: decode sharded over it (by
    default, the mesh the params are on, if any)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                         f"temperature={temperature}, top_k={top_k}, top_p={top_p}")
    if not prompts:
        raise ValueError("no prompts")
    cfg = frozen(model_config)
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty: a prompt needs at least one token")
    for i, prompt in enumerate(prompts):
        if max(prompt) >= cfg.vocab_size or min(prompt) < 0:
            raise ValueError(f"prompt {i} holds token ids outside [0, {cfg.vocab_size})")
    if max(lengths) + max_new_tokens > cfg.max_position_embeddings:
        logging.warning("%d prompt + %d new tokens exceed the model's max_position_embeddings "
                        "(%d): quality past it is not what the model was trained for",
                        max(lengths), max_new_tokens, cfg.max_position_embeddings)
    rows = len(prompts)
    if mesh is not None:
        params = jax.device_put(params, sharding.param_shardings(abstract_params(cfg), mesh))
    else:
        mesh = mesh_of(params)  # already placed there: nothing to move
    if mesh is not None:  # whole rows per data×fsdp×expert shard: pad with 1-token prompts
        ways = sharding.batch_ways(mesh)
        prompts = list(prompts) + [[0]] * (-rows % ways)
    B, P = len(prompts), _bucket(max(lengths))
    tokens_BxP = np.zeros((B, P), np.int32)
    positions_BxP = np.zeros((B, P), np.int32)
    segment_ids_BxP = np.zeros((B, P), np.int32)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends at slot P - 1
        n = len(prompt)
        tokens_BxP[row, P - n:] = prompt
        positions_BxP[row, P - n:] = np.arange(n)
        segment_ids_BxP[row, P - n:] = 1
    run = functools.partial(
        _generate, params, tokens_BxP, positions_BxP, segment_ids_BxP, jax.random.key(seed),
        jnp.int32(-1 if eos_id is None else eos_id), model_config=cfg,
        max_new_tokens=max_new_tokens, num_ids=min(num_ids or cfg.vocab_size, cfg.vocab_size),
        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    if mesh is None:
        out_BxN = np.asarray(run())
    else:
        with sharding.use_mesh(mesh):
            out_BxN = sharding.to_host(run())
    results = []
    for row in out_BxN[:rows].tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id) + 1]
        results.append(row)
    return results


def generate(model_config, params: dict, tokenizer, prompt: str | Sequence[str],
             max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
             mesh: jax.sharding.Mesh | None = None) -> str | list[str]:
    """`jaxllm.generate`: a prompt (or a list of prompts) in, its continuation out (without
    the prompt and without the EOS token). Greedy unless `temperature` > 0. Embedding rows
    past the tokenizer's ids (Qwen2 pads 151,646 ids to 151,936 rows) are never sampled."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    eos_id = tokenizer.eos_id if stop_at_eos else None
    ids = generate_ids(model_config, params, tokenizer.encode_batch(prompts), max_new_tokens,
                       eos_id=eos_id, num_ids=tokenizer.vocab_size, temperature=temperature,
                       top_k=top_k, top_p=top_p, seed=seed, mesh=mesh)
    texts = [tokenizer.decode(row[:-1] if row and row[-1] == eos_id else row) for row in ids]
    return texts[0] if isinstance(prompt, str) else texts


def mesh_of(params: dict) -> jax.sharding.Mesh | None:
    """The mesh params were placed on by `load_model(mesh=...)` (or training), if any."""
    placed = getattr(params["embed"]["embedding"], "sharding", None)
    if isinstance(placed, jax.sharding.NamedSharding) and placed.mesh.size > 1 and \
            tuple(placed.mesh.axis_names) == sharding.MESH_AXES:
        return placed.mesh
    return None

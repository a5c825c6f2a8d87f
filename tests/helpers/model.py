"""One small model config for the model and attention tests, and a check that decoding
through a KV cache equals full forward passes."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config.schema import model_defaults
from jaxllm.model import apply, forward, init_cache


def small_config(**overrides):
    c = model_defaults()
    c.update(dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=96, dtype="float32", remat="none",
                  rope_theta=1e4, init_std=0.2))
    c.update(overrides)
    return c


def assert_cached_decoding_equals_forward(cfg, params, tokens_BxT, prefill: int) -> np.ndarray:
    """Prefill `prefill` tokens into a KV cache, then feed the rest one at a time: every
    step's last-position logits equal the full forward pass's there (1e-4). Returns those."""
    B, T = tokens_BxT.shape
    step = jax.jit(lambda p, t, pos, c: apply(cfg, p, t, pos, jnp.ones_like(t), c))
    logits, cache = step(params, tokens_BxT[:, :prefill],
                         np.broadcast_to(np.arange(prefill), (B, prefill)), init_cache(cfg, B, T))
    cached = [np.asarray(logits)]
    for i in range(prefill, T - 1):
        logits, cache = step(params, tokens_BxT[:, i:i + 1], np.full((B, 1), i, np.int32), cache)
        cached.append(np.asarray(logits))
    full = np.asarray(forward(cfg, params, tokens_BxT))
    np.testing.assert_allclose(np.stack(cached, 1), full[:, prefill - 1:T - 1], atol=1e-4,
                               rtol=1e-4)
    return full

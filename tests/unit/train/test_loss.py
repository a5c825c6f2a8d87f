"""The chunked next-token loss (jaxllm/train/loss.py) against the plain one, and what it
saves: Qwen2-0.5B's compiled train step at 4,096 tokens holds no row of whole logits.

Dimension letters: B batch, T length, D model dim, V vocab.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config.load import load_config
from jaxllm.config.schema import base_config
from jaxllm.model.transformer import frozen
from jaxllm.parallel import sharding
from jaxllm.train.loss import num_chunks, summed_losses
from jaxllm.train.optim import make_optimizer, make_schedule
from jaxllm.train.stages import init_train_state, stage_model_config
from jaxllm.train.step import make_train_step
from tests.helpers.runs import ROOT


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_loss_and_gradients_equal_the_plain_loss(tied, z_loss):
    """The objective Σ nll + z_loss·Σ logz², Σ nll and Σ logz² over masked tokens, and the
    objective's gradients with respect to the hidden states and the head: the fused loss in 1,
    4 and 5 (uneven → 6) chunks per row against the plain one (chunk_size 0), which is
    checked against its definition."""
    cfg = base_config().model
    cfg.update(vocab_size=96, hidden_size=32, tie_embeddings=tied, dtype="float32")
    cfg = frozen(cfg)
    B, T, D, V = 2, 60, 32, 96
    k = jax.random.split(jax.random.key(0), 4)
    x_BxTxD = jax.random.normal(k[0], (B, T, D))
    head = jax.random.normal(k[1], (V, D) if tied else (D, V))
    targets_BxT = jax.random.randint(k[2], (B, T), 0, V)
    mask_BxT = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)

    def objective(x, head, chunk):
        objective, nll, logz2, _ = summed_losses(cfg, head, x, targets_BxT, mask_BxT, chunk,
                                                 z_loss)
        return objective, (nll, logz2)

    grad = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True), static_argnums=2)
    (gx, gh), (nll, logz2) = grad(x_BxTxD, head, 0)
    logits = jnp.einsum("btd,vd->btv" if tied else "btd,dv->btv", x_BxTxD, head)
    logz = jax.nn.logsumexp(logits, -1)
    want = jnp.sum((logz - jnp.take_along_axis(logits, targets_BxT[..., None], -1)[..., 0])
                   * mask_BxT)
    np.testing.assert_allclose(nll, want, rtol=1e-6)
    np.testing.assert_allclose(logz2, jnp.sum(logz ** 2 * mask_BxT), rtol=1e-6)
    for chunk, n in ((60, 1), (15, 4), (12, 5), (11, 6)):
        assert num_chunks(T, chunk) == n
        (cx, ch), (c_nll, c_logz2) = grad(x_BxTxD, head, chunk)
        np.testing.assert_allclose(c_nll, nll, rtol=1e-6)
        np.testing.assert_allclose(c_logz2, logz2, rtol=1e-6)
        value = jax.jit(objective, static_argnums=2)(x_BxTxD, head, chunk)[0]
        np.testing.assert_allclose(value, nll + z_loss * logz2, rtol=1e-6)
        # Gradients: float32 sums in another order, so 1e-6 of the largest entry.
        np.testing.assert_allclose(cx, gx, rtol=0, atol=1e-6 * np.abs(gx).max())
        np.testing.assert_allclose(ch, gh, rtol=0, atol=1e-6 * np.abs(gh).max())


def _compiled_step(chunk: int):
    """configs/qwen2_0_5b.py's train step at batch 1 × 4,096, remat full, float32 params,
    compiled on one CPU device from abstract arrays (nothing allocated)."""
    config = load_config(os.path.join(ROOT, "jaxllm", "configs", "qwen2_0_5b.py"), [
        "mesh.data=1", "mesh.fsdp=1", "model.remat=full", "model.attention_impl=chunked",
        "stages.pretrain.batch_size=1", "stages.pretrain.seq_len=4096",
        "optimizer.grad_accum=1"])
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    step = make_train_step(stage_model_config(config, "pretrain"),
                           make_optimizer(config.optimizer), make_schedule(
                               config.stages.pretrain.lr, 10), 0, 1, 0.0, 0.0, chunk)
    with sharding.use_mesh(mesh):
        state = jax.eval_shape(lambda: init_train_state(config, mesh)[0])
        batch = {k: jax.ShapeDtypeStruct((1, 4096), jnp.float32 if k == "loss_mask"
                                         else jnp.int32)
                 for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
        return jax.jit(step).lower(state, batch).compile()


def _largest_buffer_bytes(hlo: str) -> int:
    sizes = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}
    largest = 0
    for dtype, dims in re.findall(r"\b(f32|s32|u32|bf16|f16|pred|s8|u8)\[([\d,]+)\]", hlo):
        largest = max(largest, sizes[dtype] * int(np.prod([int(d) for d in dims.split(",")])))
    return largest


def test_qwen2_0_5b_step_holds_no_row_of_whole_logits():
    T, V = 4096, 151936
    plain, chunked = _compiled_step(0), _compiled_step(1024)
    assert _largest_buffer_bytes(plain.as_text()) >= T * V * 4  # the check can see logits
    assert _largest_buffer_bytes(chunked.as_text()) < T * V * 4
    saved = (plain.memory_analysis().temp_size_in_bytes
             - chunked.memory_analysis().temp_size_in_bytes)
    assert saved >= 2.5e9, saved / 1e9

"""Schedules, weight-decay mask, and gradient accumulation against one big batch."""

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
import pytest

from jaxllm.config.schema import base_config
from jaxllm.train.optim import decay_mask, make_optimizer, make_schedule


def lr_config(schedule, warmup=10, peak=1.0, end=0.1):
    return mc.ConfigDict(dict(peak=peak, end=end, warmup_steps=warmup, schedule=schedule,
                              decay_fraction=0.2))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_schedules(schedule):
    fn = make_schedule(lr_config(schedule), 100)
    lrs = np.asarray([float(fn(s)) for s in range(100)])
    np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10, rtol=1e-6)  # linear warmup
    assert lrs[10] == pytest.approx(1.0, abs=1e-2)
    if schedule == "constant":
        np.testing.assert_allclose(lrs[10:], 1.0)
    else:
        assert lrs[-1] == pytest.approx(0.1, abs=1e-6) and np.all(np.diff(lrs[10:]) <= 1e-7)
    if schedule == "wsd":
        np.testing.assert_allclose(lrs[10:80], 1.0)  # stable until the last 20 %
        assert lrs[90] < 1.0


def test_cosine_midpoint():
    fn = make_schedule(lr_config("cosine", warmup=0), 101)  # steps 0..100, midpoint 50
    assert float(fn(50)) == pytest.approx(0.55, abs=1e-2)


def test_decay_mask_skips_norms_and_biases():
    params = {"layers": {"attn": {"q_proj": {"kernel": 1, "bias": 2}},
                         "attn_norm": {"scale": 3}}, "embed": {"embedding": 4}}
    mask = decay_mask(params)
    assert mask["layers"]["attn"]["q_proj"] == {"kernel": True, "bias": False}
    assert mask["layers"]["attn_norm"]["scale"] is False and mask["embed"]["embedding"] is True


def test_grad_accumulation_equals_one_big_batch():
    import optax

    from jaxllm.config.schema import base_config
    from jaxllm.model import frozen, init_params
    from jaxllm.train.step import TrainState, make_train_step

    cfg = base_config()
    cfg.model.update(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                     head_dim=16, intermediate_size=64, dtype="float32", remat="none")
    params = init_params(cfg.model, jax.random.key(0))
    tx = optax.identity()  # plain SGD: Adam's g/|g| would amplify roundoff in tiny gradients
    keys = jax.random.split(jax.random.key(1), 2)
    batch = {"inputs": jax.random.randint(keys[0], (4, 8), 0, 64),
             "targets": jax.random.randint(keys[1], (4, 8), 0, 64),
             "positions": jnp.broadcast_to(jnp.arange(8), (4, 8)),
             "segment_ids": jnp.ones((4, 8), jnp.int32),
             # uneven masks: accumulation must weight micro-batches by their token counts
             "loss_mask": jnp.asarray(np.random.default_rng(0).random((4, 8)) < 0.6, jnp.float32)}
    sched = make_schedule(lr_config("constant", warmup=0, peak=1e-2), 10)
    results = []
    for accum in (1, 2, 4):
        state = TrainState.create(params, tx.init(params))
        step = jax.jit(make_train_step(frozen(cfg.model), tx, sched, 0, accum, 0.0))
        new_state, metrics = step(state, batch)
        results.append((new_state.params, metrics))
    for params_i, metrics_i in results[1:]:
        np.testing.assert_allclose(metrics_i["loss"], results[0][1]["loss"], rtol=1e-5)
        np.testing.assert_allclose(metrics_i["grad_norm"], results[0][1]["grad_norm"], rtol=1e-4)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
                     params_i, results[0][0])


@pytest.mark.parametrize("clip_norm, scale", [(0.0, 1.0), (1.0, 0.1)], ids=["off", "on"])
def test_clip_norm_zero_turns_clipping_off(clip_norm, scale):
    opt = base_config().optimizer
    opt.update(clip_norm=clip_norm, b1=0.0, weight_decay=0.0)
    tx = make_optimizer(opt)
    grads = {"w": jnp.full((100,), 1.0)}  # global norm 10
    state = tx.init(grads)
    assert jax.tree.structure(state) == jax.tree.structure(
        make_optimizer(base_config().optimizer).init(grads))  # a resumed run may switch it
    _, state = tx.update(grads, state, grads)
    # Adam's second moment sees the gradient after clipping: (1 - b2) * g².
    np.testing.assert_allclose(state[1].nu["w"], (1 - opt.b2) * scale ** 2, rtol=1e-6)

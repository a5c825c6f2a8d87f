"""The distillation loss (jaxllm/train/loss.py with a `Teacher`): chunk by chunk against whole
softmaxes written out by hand, for a teacher of another width and other vocabulary padding.

Dimension letters: B batch, T length, D model dim, V vocab.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config.schema import base_config
from jaxllm.model.transformer import frozen
from jaxllm.train.loss import Teacher, summed_losses

B, T, D, V = 2, 24, 16, 40


def head_config(tied: bool, vocab: int, width: int):
    cfg = base_config().model
    cfg.update(vocab_size=vocab, hidden_size=width, tie_embeddings=tied, dtype="float32")
    return frozen(cfg)


def inputs(seed: int, tied: bool, vocab: int, width: int):
    """Hidden states [B, T, width] and a head at a trained model's logit scale (logits of
    std ~3, so the distributions are far from uniform and far from one-hot)."""
    k = jax.random.split(jax.random.key(seed), 2)
    x_BxTxD = jax.random.normal(k[0], (B, T, width))
    shape = (vocab, width) if tied else (width, vocab)
    return x_BxTxD, 3.0 * jax.random.normal(k[1], shape) / np.sqrt(width)


def by_hand(s_logits, t_logits, targets, mask, tau, alpha, z_loss):
    """Whole softmaxes, no chunks: the objective of the docstring, term by term."""
    Vs, Vt = s_logits.shape[-1], t_logits.shape[-1]
    t_logits = (t_logits[..., :Vs] if Vt >= Vs else
                jnp.concatenate([t_logits, jnp.full((*t_logits.shape[:-1], Vs - Vt), -1e30)], -1))
    p = jax.nn.softmax(t_logits / tau, -1)
    q = jax.nn.softmax(s_logits / tau, -1)
    kl = jnp.sum(jnp.sum(jax.scipy.special.xlogy(p, p) - p * jnp.log(q), -1) * mask)
    logz = jax.nn.logsumexp(s_logits, -1)
    nll = jnp.sum((logz - jnp.take_along_axis(s_logits, targets[..., None], -1)[..., 0]) * mask)
    return (1 - alpha) * nll + alpha * tau ** 2 * kl + z_loss * jnp.sum(logz ** 2 * mask), kl


def logits_of(cfg, head, x):
    return jnp.einsum("btd,vd->btv" if cfg.tie_embeddings else "btd,dv->btv", x, head)


@pytest.mark.parametrize("tied,teacher_tied,teacher_vocab", [
    (True, False, V + 8),  # the teacher pads its vocabulary further (Qwen2-7B over 0.5B)
    (False, True, V - 6),  # the student does: rows the teacher has no probability for
    (False, False, V)])
@pytest.mark.parametrize("tau,alpha,z_loss", [(1.0, 1.0, 0.0), (2.0, 0.5, 1e-2)])
def test_distillation_loss_and_gradients_equal_whole_softmaxes(tied, teacher_tied,
                                                               teacher_vocab, tau, alpha, z_loss):
    """The objective (1 − α)·Σ nll + α·τ²·Σ KL + z_loss·Σ logz² and Σ KL over masked tokens,
    and the objective's gradients by the student's hidden states and head: the plain path
    (chunk_size 0) and 1, 4 and 6 chunks per row against softmaxes written out by hand,
    1e-5. The teacher is 24 wide, the student 16."""
    cfg, t_cfg = head_config(tied, V, D), head_config(teacher_tied, teacher_vocab, 24)
    x, head = inputs(0, tied, V, D)
    t_x, t_head = inputs(1, teacher_tied, teacher_vocab, 24)
    k = jax.random.split(jax.random.key(2), 2)
    targets = jax.random.randint(k[0], (B, T), 0, min(V, teacher_vocab))
    mask = (jax.random.uniform(k[1], (B, T)) > 0.3).astype(jnp.float32)

    def reference(x, head):
        return by_hand(logits_of(cfg, head, x), logits_of(t_cfg, t_head, t_x), targets, mask,
                       tau, alpha, z_loss)

    def ours(x, head, chunk):
        objective, _, _, kl = summed_losses(cfg, head, x, targets, mask, chunk, z_loss,
                                            Teacher(t_cfg, t_head, t_x, tau, alpha))
        return objective, kl

    (gx, gh), want_kl = jax.grad(reference, argnums=(0, 1), has_aux=True)(x, head)
    want = reference(x, head)[0]
    assert float(want_kl) > 1.0  # the two distributions are far apart: the test can see a slip
    grad = jax.jit(jax.grad(ours, argnums=(0, 1), has_aux=True), static_argnums=2)
    for chunk in (0, T, 6, 4):
        (cx, ch), kl = grad(x, head, chunk)
        np.testing.assert_allclose(kl, want_kl, rtol=1e-5)
        np.testing.assert_allclose(jax.jit(ours, static_argnums=2)(x, head, chunk)[0], want,
                                   rtol=1e-5)
        np.testing.assert_allclose(cx, gx, rtol=0, atol=1e-5 * np.abs(gx).max())
        np.testing.assert_allclose(ch, gh, rtol=0, atol=1e-5 * np.abs(gh).max())


@pytest.mark.parametrize("chunk", [0, 6])
def test_a_teacher_equal_to_the_student_gives_zero_kl_and_no_gradient(chunk):
    """With the teacher's weights and hidden states the student's own, Σ KL is 0 and the
    pure distillation objective (α = 1) has a zero gradient, at any temperature."""
    cfg = head_config(False, V, D)
    x, head = inputs(0, False, V, D)
    targets = jnp.zeros((B, T), jnp.int32)
    mask = jnp.ones((B, T))

    def objective(x, head):
        out = summed_losses(cfg, head, x, targets, mask, chunk, 0.0,
                            Teacher(cfg, head, x, 3.0, 1.0))
        return out[0], out[3]

    (gx, gh), kl = jax.grad(objective, argnums=(0, 1), has_aux=True)(x, head)
    assert abs(float(kl)) < 1e-5
    assert float(jnp.abs(gx).max()) < 1e-6 and float(jnp.abs(gh).max()) < 1e-6


# ----------------------------------------------------------------------------- through the pipeline

def one_stage(*overrides: str):
    """The smoke model, pretrain only, 8 steps, every step logged, no evaluation."""
    from tests.helpers.runs import pretrain_smoke

    return pretrain_smoke("stages.pretrain.steps=8", *overrides)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A smoke model trained 8 steps: the teacher."""
    from jaxllm.train import stages

    workdir = str(tmp_path_factory.mktemp("teacher") / "run")
    stages.run(one_stage(), workdir)
    return workdir


def test_a_distill_stage_learns_the_teachers_distribution(teacher_run, tmp_path):
    """A narrower student (32 wide, one layer) distils from the teacher run at τ = 2, half
    and half with the cross entropy: the KL per token is logged at every step and falls."""
    from jaxllm.train import stages
    from tests.helpers.runs import train_records

    config = one_stage("model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=64",
                       "stages.pretrain.objective=distill", f"distill.teacher={teacher_run}",
                       "distill.temperature=2.0", "distill.alpha=0.5")
    stages.run(config, str(tmp_path / "student"))
    kl = [r["distill_kl"] for r in train_records(tmp_path / "student")]
    assert len(kl) == 8 and kl[-1] < kl[0], kl


def test_bad_distill_settings_stop_before_compiling_with_one_line(teacher_run, tmp_path):
    from jaxllm.config.schema import ConfigError
    from jaxllm.train import stages

    with pytest.raises(ConfigError, match="stages.pretrain.objective: distill needs a teacher"):
        stages.run(one_stage("stages.pretrain.objective=distill"), str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="stages.pretrain.objective: 'rl' is not one of"):
        stages.run(one_stage("stages.pretrain.objective=rl"), str(tmp_path / "b"))
    other_tokenizer = one_stage("tokenizer.max_rank=512", "stages.pretrain.objective=distill",
                                f"distill.teacher={teacher_run}")
    with pytest.raises(ConfigError, match="the teacher's tokenizer .* is not this run's"):
        stages.run(other_tokenizer, str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "c" / "checkpoints")
    with pytest.raises(ConfigError, match="distill.teacher=.*: no such directory"):
        stages.run(one_stage("stages.pretrain.objective=distill",
                             f"distill.teacher={tmp_path / 'nowhere'}"), str(tmp_path / "d"))


def test_a_distill_step_on_8_devices_equals_one_device(teacher_run):
    """The same distill step (student and teacher each sharded by their own axes) on one
    device and on data 2 × fsdp 2 × tensor 2: the same loss, KL and gradient norm."""
    from jaxllm.data import make_iterator
    from jaxllm.data.tokenizer import load_tokenizer
    from jaxllm.parallel import sharding
    from jaxllm.train.loop import stage_steps, to_global
    from jaxllm.train.stages import init_train_state, stage_model_config, stage_spans
    from jaxllm.train.teacher import load_teacher
    from tests.helpers.runs import mesh_of

    config = one_stage("model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=64",
                       "stages.pretrain.objective=distill", f"distill.teacher={teacher_run}",
                       "distill.temperature=2.0", "distill.alpha=0.5")
    tokenizer = load_tokenizer(config.tokenizer.name, max_rank=config.tokenizer.max_rank)
    data = make_iterator(config, "pretrain", tokenizer)
    batch = next(data)
    data.close()
    results = []
    for sizes in ({}, dict(data=2, fsdp=2, tensor=2)):
        mesh = mesh_of(**sizes)
        with sharding.use_mesh(mesh):
            state, state_sh = init_train_state(config, mesh)
            distill, teacher_params = load_teacher(config, mesh, tokenizer)
            train_step, _, order = stage_steps(config, stage_spans(config)[0],
                                               stage_model_config(config, "pretrain"), mesh,
                                               state_sh, distill)
            _, metrics = train_step(state, to_global(batch, sharding.batch_sharding(mesh), order),
                                    teacher_params)
            results.append(jax.device_get(metrics))
    one, eight = results
    for key in ("loss", "distill_kl", "grad_norm"):
        np.testing.assert_allclose(eight[key], one[key], rtol=2e-5, err_msg=key)


def test_a_hugging_face_teacher_is_the_run_it_was_exported_from(teacher_run, tmp_path):
    """The teacher run exported to HF (float32) loads as the same teacher: model, params."""
    from jaxllm.convert.to_hf import export_checkpoint
    from jaxllm.data.tokenizer import load_tokenizer
    from jaxllm.train.teacher import is_hf_dir, load_teacher
    from tests.helpers.runs import mesh_of

    export_checkpoint(teacher_run, str(tmp_path / "hf"), dtype="float32")
    assert is_hf_dir(str(tmp_path / "hf")) and not is_hf_dir(teacher_run)
    mesh = mesh_of(fsdp=2)
    loaded = []
    for teacher in (teacher_run, str(tmp_path / "hf")):
        config = one_stage("stages.pretrain.objective=distill", f"distill.teacher={teacher}")
        tokenizer = load_tokenizer(config.tokenizer.name, max_rank=config.tokenizer.max_rank)
        loaded.append(load_teacher(config, mesh, tokenizer))
    (run_distill, run_params), (hf_distill, hf_params) = loaded
    for key in ("hidden_size", "num_layers", "vocab_size", "rope_theta", "tie_embeddings"):
        assert run_distill.model_cfg[key] == hf_distill.model_cfg[key], key
    jax.tree.map(np.testing.assert_array_equal, run_params, hf_params)

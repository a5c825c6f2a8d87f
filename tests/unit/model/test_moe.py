"""The MoE model end to end: decoding with a cache, training on expert-parallel meshes equal to
one device, and `jaxllm.main` on configs/tiny_moe.py through its stages, killed and resumed.

Dispatch against a per-expert loop is tests/unit/parallel/test_experts.py; transformers parity is
tests/unit/convert/test_convert_moe.py; upcycling is tests/unit/convert/test_upcycle.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxllm.config.load import load_config
from jaxllm.model import init_params
from jaxllm.model.moe import router_losses
from tests.helpers.model import assert_cached_decoding_equals_forward
from tests.helpers.runs import ROOT, by_step, smoke_config, xla_flags
from tests.helpers.train import train

SMOKE = os.path.join(ROOT, "jaxllm", "configs", "tiny_moe.py:smoke")


def smoke(*overrides):
    """tiny_moe:smoke (2 layers, 4 experts of 32 top-2, shared expert 64) at 8 rows a step."""
    return smoke_config(*overrides, config=SMOKE)


@pytest.mark.parametrize("sparse_step", [1, 2])
def test_cache_decoding_equals_full_forward(sparse_step):
    """Prefill then one token at a time through the scanned groups (step 2: a dense and a
    sparse layer per group, the cache reshaped to [G, k, ...]) equals full forward passes."""
    cfg = smoke(f"model.decoder_sparse_step={sparse_step}", "model.init_std=0.2").model
    params = init_params(cfg, jax.random.key(sparse_step))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    full = assert_cached_decoding_equals_forward(cfg, params, tokens, prefill=8)
    assert np.std(full) > 0.1  # logits far from uniform: the check has teeth


@pytest.fixture(scope="module")
def one_device():
    return train(smoke(), jax.devices()[:1])[0]  # (tests/helpers/train.py: metrics, HLO, params)


@pytest.mark.parametrize("mesh", [{"data": 2, "expert": 4},
                                  {"data": 1, "expert": 2, "fsdp": 2, "tensor": 2}],
                         ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items() if v > 1))
def test_expert_parallel_training_equals_one_device(mesh, one_device):
    records, hlo, params = train(smoke(*(f"mesh.{k}={v}" for k, v in mesh.items())),
                                 jax.devices(), hlo=True)
    experts = params["layers"]["mlp"]["experts"]
    for key in ("loss", "aux_loss", "router_z_loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in records], [r[key] for r in one_device],
                                   rtol=1e-5, atol=1e-5, err_msg=key)
    assert records[-1]["loss"] < records[0]["loss"]
    assert 1.0 <= records[0]["expert_load"] <= 4.0 and records[0]["dropped_frac"] == 0
    # [L, E, D, F]: experts over `expert`, D over fsdp (FSDP), F over tensor.
    spec = experts["gate_proj"].sharding.spec
    assert spec == PartitionSpec(None, "expert", ("fsdp", "sequence"), "tensor"), spec
    assert experts["gate_proj"].addressable_shards[0].data.shape == (
        2, 4 // mesh["expert"], 64 // mesh.get("fsdp", 1), 32 // mesh.get("tensor", 1))
    assert "all-to-all" in hlo


def test_a_per_layer_balance_loss_sees_layers_collapsed_onto_different_experts():
    """Two layers of 4 tokens, 4 experts top-1, each layer sending every token to its own
    expert: pooled over layers the loss looks half balanced, each layer's own says collapsed."""
    cfg = smoke("model.num_experts_per_tok=1", "model.router_aux_loss_per_layer=False").model
    probs_GxE = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]]) * 4
    stats = {"counts": jnp.asarray([[4.0, 0, 0, 0], [0, 4.0, 0, 0]]),
             "probs": jnp.asarray(probs_GxE), "z": jnp.zeros(2), "tokens": jnp.full(2, 4.0),
             "dropped": jnp.zeros(2)}
    pooled = router_losses(stats, cfg)
    cfg.router_aux_loss_per_layer = True
    per_layer = router_losses(stats, cfg)
    # Pooled: shares (1/2, 1/2, 0, 0) · probs (0.4, 0.4, 0.1, 0.1) · E = 1.6.
    np.testing.assert_allclose(float(pooled["aux_loss"]), 4 * (0.5 * 0.4 * 2), rtol=1e-6)
    # Each layer: share 1 · prob 0.7 · E = 2.8, the same for both.
    np.testing.assert_allclose(float(per_layer["aux_loss"]), 4 * 0.7, rtol=1e-6)
    assert float(pooled["expert_load"]) == float(per_layer["expert_load"]) == 4.0


# ----------------------------------------------------------------------------- the CLI

# 10 steps: pretrain 0..5, long_context 6..7, anneal 8..9; a checkpoint every 3 steps.
ARGS = ["--config=configs/tiny_moe.py:smoke", "--config.log_every=1",
        "--config.eval_every=1000", "--config.checkpoint.every_steps=3"]


def command(workdir):
    return [sys.executable, "-m", "jaxllm.main", f"--workdir={workdir}", *ARGS]


def env():
    return {**os.environ, "XLA_FLAGS": xla_flags(1)}


def test_tiny_moe_trains_through_its_stages_and_resumes_exactly_after_a_kill(tmp_path):
    """One run that nothing stops (it also fills the compilation cache the others read), one
    killed once its first checkpoint is on disk and run again: every logged step, loss and MoE
    metric, is bitwise the same."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(command(whole), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(command(killed), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints").is_dir() or not [
            n for n in os.listdir(killed / "checkpoints") if n.isdigit()]:
        assert proc.poll() is None, "the run ended before it was killed"
        assert time.monotonic() < deadline, "no checkpoint was completed"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    resumed = subprocess.run(command(killed), cwd=ROOT, env=env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout
    a, b = by_step(whole), by_step(killed)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert [a[s]["stage"] for s in (6, 8, 10)] == ["pretrain", "long_context", "anneal"]
    assert a[10]["loss"] < a[1]["loss"]
    for step, record in a.items():
        for key in ("loss", "grad_norm", "aux_loss", "router_z_loss", "expert_load"):
            assert b[step][key] == record[key], (step, key)


def test_tiny_upcycled_into_tiny_moe_trains(tmp_path):
    """A dense tiny:smoke params checkpoint → `--config.init.upcycle_from` of tiny_moe:smoke:
    the run starts from it and trains (2 steps on 8 devices, data 4 × expert 2). After them
    the embeddings and attention are within two AdamW steps of the dense model's, where a
    fresh init would differ by about 0.1."""
    from jaxllm.checkpoint.run_dir import save_params
    from jaxllm.train.stages import run

    dense_cfg = load_config(os.path.join(ROOT, "jaxllm", "configs", "tiny.py:smoke")).model
    dense = init_params(dense_cfg, jax.random.key(7))
    save_params(str(tmp_path / "dense"), dense_cfg, dense)
    config = load_config(SMOKE, [f"init.upcycle_from={tmp_path / 'dense'}", "mesh.data=4",
                                 "mesh.expert=2", "stages.pretrain.steps=2",
                                 "stages.pretrain.batch_size=8", "stages.long_context.steps=0",
                                 "stages.anneal.steps=0"])
    state = run(config, str(tmp_path / "moe"))
    records = by_step(tmp_path / "moe")
    assert sorted(records) == [1, 2] and np.isfinite(records[2]["loss"])
    params = jax.device_get(state.params)
    for path in (("embed", "embedding"), ("layers", "attn", "q_proj", "kernel")):
        got, want = params, dense
        for key in path:
            got, want = got[key], want[key]
        assert np.abs(np.asarray(got) - np.asarray(want)).max() < 0.01, path

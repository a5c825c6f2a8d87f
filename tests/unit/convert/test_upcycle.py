"""Upcycling a dense model into a Qwen2-MoE (jaxllm/convert/upcycle.py), checked unit by unit.

Dimension letters: L layers, G sparse layers, D model dim, F dense ffn dim, E experts, M an
expert's size, S the shared expert's size, X test inputs.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from jaxllm.config.load import load_config
from jaxllm.config.schema import ConfigError, base_config, model_defaults
from jaxllm.convert.upcycle import permutations, upcycle, upcycle_plan, upcycled_params
from jaxllm.model import abstract_params
from tests.helpers.runs import ROOT

SEED = 7
CONFIGS = os.path.join(ROOT, "jaxllm", "configs")


def dense_config(**overrides):
    c = model_defaults()
    c.update(dict(vocab_size=72, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48, dtype="float32", param_dtype="float32",
                  remat="none", attention_impl="xla", rope_theta=1e4))
    c.update(overrides)
    return c


def moe_config(dense, **overrides):
    """4 experts of 16 from F = 48 (2 copies, 32 units discarded), shared expert 56 > F, and
    8 fewer vocab rows than the dense model."""
    c = model_defaults()
    c.update(dense.to_dict())
    c.update(dict(family="qwen2_moe", vocab_size=64, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=16, shared_expert_intermediate_size=56))
    c.update(overrides)
    return c


def random_params(cfg, seed=0):
    """Params of `cfg` with every leaf random (norm scales too), without compiling an init."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(abstract_params(cfg))
    return jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32), shapes)


def swiglu(x_XxD, gate_DxF, up_DxF, down_FxD):
    x, gate, up, down = (np.asarray(a, np.float64) for a in (x_XxD, gate_DxF, up_DxF, down_FxD))
    g = x @ gate
    return (g / (1 + np.exp(-g)) * (x @ up)) @ down


def mlp(params, layer):
    return [np.asarray(params["layers"]["mlp"][p]["kernel"][layer])
            for p in ("gate_proj", "up_proj", "down_proj")]


def experts(params, layer, e=None):
    ex = params["layers"]["mlp"]["experts"]
    sl = np.s_[layer] if e is None else np.s_[layer, e]
    return [np.asarray(ex[p][sl]) for p in ("gate_proj", "up_proj", "down_proj")]


@pytest.fixture(scope="module")
def upcycled():
    dense_cfg = dense_config()
    moe_cfg = moe_config(dense_cfg)
    dense = random_params(dense_cfg)
    by_fraction = {f: upcycle(dense, dense_cfg, moe_cfg, seed=SEED, reinit_fraction=f)
                   for f in (0.0, 0.5, 0.25)}
    return dense_cfg, moe_cfg, dense, by_fraction


def test_experts_are_a_partition_of_shuffled_copies(upcycled):
    """Fraction 0: unit m of expert e is unit perm[c, j] of the dense FFN, where e·M + m =
    c·F + j in the concatenated shuffled copies: its gate and up columns and down row, bitwise."""
    dense_cfg, moe_cfg, dense, by_fraction = upcycled
    F, E, M = 48, 4, 16
    plan = upcycle_plan(dense_cfg, moe_cfg)
    assert (plan.copies, plan.discarded) == (math.ceil(E * M / F), 2 * F - E * M)
    for layer in range(4):
        perms = permutations(SEED, layer, F, plan.copies)
        assert all(sorted(p) == list(range(F)) for p in perms)
        assert not np.array_equal(perms[0], perms[1])  # a permutation per copy
        concat = perms.reshape(-1)
        gate, up, down = mlp(dense, layer)
        eg, eu, ed = experts(by_fraction[0.0], layer)
        for e in range(E):
            for m in range(M):
                unit = concat[e * M + m]
                np.testing.assert_array_equal(eg[e][:, m], gate[:, unit])
                np.testing.assert_array_equal(eu[e][:, m], up[:, unit])
                np.testing.assert_array_equal(ed[e][m], down[unit])
    assert not np.array_equal(permutations(SEED, 0, F, 2), permutations(SEED, 1, F, 2))


@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_reinit_fraction_is_as_configured(upcycled, fraction):
    """Exactly round(fraction·M) units of each expert differ from their dense unit, the same
    units in gate, up and down, every number of them re-drawn from normal(init_std); the other
    units are their dense units bitwise."""
    _, moe_cfg, dense, by_fraction = upcycled
    M, want = 16, round(fraction * 16)
    redrawn, chosen = [], set()
    for layer in range(4):
        units = permutations(SEED, layer, 48, 2).reshape(-1)
        gate, up, down = mlp(dense, layer)
        for e in range(4):
            g, u, d = experts(by_fraction[fraction], layer, e)
            g0, u0, d0 = (gate[:, units[e * M:(e + 1) * M]], up[:, units[e * M:(e + 1) * M]],
                          down[units[e * M:(e + 1) * M]])
            changed = np.flatnonzero(np.any(g != g0, axis=0))
            assert len(changed) == want, (layer, e, len(changed))
            np.testing.assert_array_equal(np.flatnonzero(np.any(u != u0, axis=0)), changed)
            np.testing.assert_array_equal(np.flatnonzero(np.any(d != d0, axis=1)), changed)
            for new, old in ((g[:, changed], g0[:, changed]), (u[:, changed], u0[:, changed]),
                             (d[changed], d0[changed])):
                assert np.all(new != old)  # whole units, not some of their numbers
                redrawn.append(new.ravel())
            kept = np.setdiff1d(np.arange(M), changed)
            np.testing.assert_array_equal(g[:, kept], g0[:, kept])
            chosen.add(tuple(changed))
    assert len(chosen) > 8  # a fresh random choice per expert and layer
    redrawn = np.concatenate(redrawn)
    assert abs(redrawn.std() / moe_cfg.init_std - 1) < 0.1 and abs(redrawn.mean()) < 0.002


def test_experts_sum_to_the_dense_ffn():
    """E·M = F and no re-init: the unweighted sum of the experts' SwiGLUs is the dense FFN's
    output (the shuffle only permutes the intermediate dimension); the shared expert (S = F)
    gated by sigmoid(0) = 0.5 is the dense FFN too."""
    dense_cfg = dense_config()
    moe_cfg = moe_config(dense_cfg, moe_intermediate_size=12, shared_expert_intermediate_size=48)
    plan = upcycle_plan(dense_cfg, moe_cfg)
    assert (plan.copies, plan.discarded) == (1, 0)
    dense = random_params(dense_cfg, seed=1)
    moe = upcycle(dense, dense_cfg, moe_cfg, seed=SEED, reinit_fraction=0.0)
    x_XxD = np.random.default_rng(2).normal(size=(5, 32)).astype(np.float32)
    shared = moe["layers"]["mlp"]["shared_expert"]
    for layer in range(4):
        want = swiglu(x_XxD, *mlp(dense, layer))
        total = sum(swiglu(x_XxD, *experts(moe, layer, e)) for e in range(4))
        np.testing.assert_allclose(total, want, rtol=1e-5, atol=1e-5)
        s = [np.asarray(shared[p]["kernel"][layer]) for p in ("gate_proj", "up_proj", "down_proj")]
        np.testing.assert_allclose(0.5 * swiglu(x_XxD, *s), want, rtol=1e-5, atol=1e-5)


def test_shared_expert_router_and_gate_start(upcycled):
    """S = 56 > F = 48: the dense units in order (gate, up bitwise; down ×2) and 8 duplicates
    with zero down rows, so 0.5·shared = dense; the gate is zero; the router normal(init_std)."""
    _, moe_cfg, dense, by_fraction = upcycled
    moe = by_fraction[0.5]
    mix = moe["layers"]["mlp"]
    x_XxD = np.random.default_rng(3).normal(size=(5, 32)).astype(np.float32)
    for layer in range(4):
        gate, up, down = mlp(dense, layer)
        s_gate, s_up, s_down = (np.asarray(mix["shared_expert"][p]["kernel"][layer])
                                for p in ("gate_proj", "up_proj", "down_proj"))
        np.testing.assert_array_equal(s_gate[:, :48], gate)
        np.testing.assert_array_equal(s_up[:, :48], up)
        np.testing.assert_array_equal(s_down[:48], 2 * down)
        assert not np.any(s_down[48:])
        np.testing.assert_allclose(0.5 * swiglu(x_XxD, s_gate, s_up, s_down),
                                   swiglu(x_XxD, gate, up, down), rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(mix["shared_expert_gate"]["kernel"]))
    router = np.asarray(mix["router"]["kernel"])
    assert router.shape == (4, 32, 4)
    assert abs(router.std() / moe_cfg.init_std - 1) < 0.15


def test_attention_embeddings_norms_copied_bitwise(upcycled):
    """Everything but the FFN is the dense model's; the 8 padding vocab rows are dropped."""
    _, _, dense, by_fraction = upcycled
    moe = traverse_util.flatten_dict(by_fraction[0.5])
    flat = traverse_util.flatten_dict(dense)
    copied = [p for p in flat if p[:2] != ("layers", "mlp")]
    assert len(copied) >= 12
    for path in copied:
        want = flat[path]
        if path == ("embed", "embedding"):
            want = want[:64]
        elif path == ("lm_head", "kernel"):
            want = want[:, :64]
        np.testing.assert_array_equal(np.asarray(moe[path]), want, err_msg=str(path))


def test_sparse_step_2_copies_dense_layers():
    """decoder_sparse_step 2: layer_0 of each group is dense layer 2g, FFN copied; layer_1 is
    dense layer 2g + 1 upcycled with that layer's permutations."""
    dense_cfg = dense_config()
    moe_cfg = moe_config(dense_cfg, decoder_sparse_step=2)
    dense = random_params(dense_cfg, seed=4)
    moe = upcycle(dense, dense_cfg, moe_cfg, seed=SEED, reinit_fraction=0.0)["layers"]
    for j in (0, 1):
        for name in ("attn_norm", "mlp_norm"):
            np.testing.assert_array_equal(moe[f"layer_{j}"][name]["scale"],
                                          dense["layers"][name]["scale"][j::2])
        np.testing.assert_array_equal(moe[f"layer_{j}"]["attn"]["q_proj"]["kernel"],
                                      dense["layers"]["attn"]["q_proj"]["kernel"][j::2])
    for p in ("gate_proj", "up_proj", "down_proj"):
        np.testing.assert_array_equal(moe["layer_0"]["mlp"][p]["kernel"],
                                      dense["layers"]["mlp"][p]["kernel"][0::2])
    for g in range(2):
        concat = permutations(SEED, 2 * g + 1, 48, 2).reshape(-1)
        gate = dense["layers"]["mlp"]["gate_proj"]["kernel"][2 * g + 1]
        got = np.asarray(moe["layer_1"]["mlp"]["experts"]["gate_proj"][g])
        np.testing.assert_array_equal(got, gate[:, concat[:64]].reshape(32, 4, 16)
                                      .transpose(1, 0, 2))


@pytest.mark.parametrize("key,value", [
    ("hidden_size", 64), ("num_layers", 2), ("num_heads", 8), ("num_kv_heads", 4),
    ("head_dim", 16), ("qkv_bias", False), ("tie_embeddings", True), ("rms_norm_eps", 1e-5),
    ("vocab_size", 80)])
def test_config_mismatch_names_the_key(key, value):
    dense_cfg = dense_config()
    with pytest.raises(ConfigError, match=f"config.model.{key}="):
        upcycle_plan(dense_cfg, moe_config(dense_cfg, **{key: value}))


def test_other_refusals():
    dense_cfg = dense_config()
    moe_cfg = moe_config(dense_cfg)
    with pytest.raises(ConfigError, match="upcycling starts from a dense model"):
        upcycle_plan(moe_cfg, moe_cfg)
    with pytest.raises(ConfigError, match="config.model.family='qwen2'"):
        upcycle_plan(dense_cfg, dense_cfg)
    with pytest.raises(ConfigError, match="config.init.upcycle_reinit"):
        upcycle_plan(dense_cfg, moe_cfg, reinit_fraction=1.5)
    dense = random_params(dense_cfg)
    dense["layers"]["mlp"]["up_proj"]["kernel"] = np.zeros((4, 32, 40), np.float32)
    with pytest.raises(ValueError, match="layers/mlp/up_proj/kernel has shape"):
        upcycle(dense, dense_cfg, moe_cfg, seed=0)


def test_qwen2_7b_to_57b_a14b_on_abstract_shapes():
    """The published pair: 9 shuffled copies of the 18,944-unit FFN make 64 experts of 2,560;
    the 152,064 vocab rows of the 7B are cut to 151,936. Shapes only, nothing allocated."""
    dense_cfg = load_config(os.path.join(CONFIGS, "qwen2_7b.py")).model
    moe_cfg = load_config(os.path.join(CONFIGS, "qwen2_57b_a14b.py")).model
    plan = upcycle_plan(dense_cfg, moe_cfg)
    assert plan.copies == math.ceil(64 * 2560 / 18944) == 9
    assert (plan.discarded, plan.reinit_units, plan.vocab_rows_dropped) == (6656, 1280, 128)
    assert plan.sparse_layers == tuple(range(28))
    dense = nn.unbox(abstract_params(dense_cfg))
    got = jax.eval_shape(lambda p: upcycle(p, dense_cfg, moe_cfg, seed=0), dense)
    want = nn.unbox(abstract_params(moe_cfg))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    assert got["layers"]["mlp"]["experts"]["gate_proj"].shape == (28, 64, 3584, 2560)


def test_upcycled_params_from_checkpoint_and_hf_onto_mesh(tmp_path):
    """`config.init.upcycle_from` as a params checkpoint or a Hugging Face directory, read in
    the pipeline's mesh and logical-rules context: the params land on the train state's
    shardings (expert, tensor, fsdp axes of 8 devices) and equal the unsharded upcycle
    (bitwise but for the random draws' last bit)."""
    from jaxllm.checkpoint.run_dir import save_params
    from jaxllm.convert.hf import save_hf
    from jaxllm.parallel import sharding

    dense_cfg = dense_config()
    dense = random_params(dense_cfg, seed=5)
    save_params(str(tmp_path / "ckpt"), dense_cfg, jax.tree.map(jnp.asarray, dense))
    save_hf(dense_cfg, dense, str(tmp_path / "hf"))
    config = base_config()
    config.model = moe_config(dense_cfg)
    config.init.upcycle_reinit = 0.5  # the key this module proposes; absent means 0.5
    config.seed = SEED
    config.mesh.update(data=1, fsdp=2, tensor=2, expert=2)
    mesh = sharding.make_mesh(config)
    shardings = sharding.param_shardings(abstract_params(config.model), mesh)
    want = traverse_util.flatten_dict(upcycle(dense, dense_cfg, config.model, seed=SEED))
    for source in ("ckpt", "hf"):
        config.init.upcycle_from = str(tmp_path / source)
        with sharding.use_mesh(mesh):  # as in the pipeline
            got = traverse_util.flatten_dict(upcycled_params(config, shardings))
        for path, sh in traverse_util.flatten_dict(shardings).items():
            assert got[path].sharding.is_equivalent_to(sh, got[path].ndim), (source, path)
            if path[2:3] in (("router",), ("experts",)):  # the same random bits; the sharded
                # program's normal transform may round the last bit differently
                np.testing.assert_allclose(got[path], want[path], rtol=1e-6, atol=1e-9)
            else:
                np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]))
    config.init.upcycle_from = str(tmp_path)
    with pytest.raises(ConfigError, match="config.init.upcycle_from="):
        upcycled_params(config, shardings)


def test_upcycled_moe_without_routed_experts_is_the_dense_model(upcycled):
    """The whole model: with the routed experts' down_proj zeroed, the upcycled MoE's logits
    are the dense model's (attention, norms, embeddings copied; shared expert = dense FFN)."""
    from jaxllm.model import forward

    dense_cfg, moe_cfg, dense, by_fraction = upcycled
    moe = jax.tree.map(lambda x: x, by_fraction[0.5])
    down = moe["layers"]["mlp"]["experts"]["down_proj"]
    moe["layers"]["mlp"]["experts"]["down_proj"] = jnp.zeros_like(down)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
    want = forward(dense_cfg, jax.tree.map(jnp.asarray, dense), tokens)[..., :64]
    np.testing.assert_allclose(forward(moe_cfg, moe, tokens), want, rtol=1e-5, atol=1e-5)

"""Qwen2-MoE conversion against transformers' `Qwen2MoeForCausalLM`, both ways, tiny models.

Weights are drawn at a trained model's scale as in test_hf.py (std 1/sqrt(fan_in), sharper
q/k), and the router sharper still, so routing is far from uniform: with a near-uniform router
a swapped expert or a missing top-k renormalisation would barely move the logits. Every layer
is sparse (decoder_sparse_step 1) or every second one (step 2, where jaxllm scans over groups
of two layers and Hugging Face layer i is group i // 2, position i % 2).
Dimension letters: B batch, T length, V vocab, E experts.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from jaxllm.convert import load_hf, save_hf
from jaxllm.convert.__main__ import main as convert_main
from jaxllm.convert.hf import config_from_hf
from tests.helpers.hf import assert_bitwise_equal, hf_greedy, tensors, trained_scale

B, T = 2, 32
CASES = {
    # name: (decoder_sparse_step, norm_topk_prob)
    "every_layer": (1, False),
    "every_layer_normalised": (1, True),
    "every_second_layer": (2, False),
    "every_second_layer_normalised": (2, True),
}


def _hf_config(step: int, norm: bool, shared: int = 48) -> transformers.Qwen2MoeConfig:
    return transformers.Qwen2MoeConfig(
        vocab_size=384, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=96, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=shared,
        decoder_sparse_step=step, norm_topk_prob=norm, rope_parameters=dict(
            rope_type="default", rope_theta=1e4), rms_norm_eps=1e-6, max_position_embeddings=256,
        tie_word_embeddings=False)


def _make_hf(path, step: int, norm: bool, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = transformers.Qwen2MoeForCausalLM(_hf_config(step, norm, **kwargs)).eval()
    model.config._attn_implementation = "eager"
    trained_scale(model, seed)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """case -> (directory, transformers model), saved as transformers 5.24 saves."""
    out = {}
    for case, (step, norm) in CASES.items():
        path = str(tmp_path_factory.mktemp(case))
        out[case] = path, _make_hf(path, step, norm)
    return out


def _tokens(vocab: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, vocab, (B, T), dtype=np.int32)


@torch.no_grad()
def _hf_outputs(model, tokens_BxT: np.ndarray):
    out = model(torch.tensor(tokens_BxT, dtype=torch.long), output_router_logits=True)
    return out.logits.float().numpy(), float(out.aux_loss), out.router_logits


def _jax_outputs(m, params, tokens_BxT: np.ndarray):
    from jaxllm.model import apply

    positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits_BxTxV, aux = jax.jit(lambda p, t: apply(m, p, t, positions_BxT, jnp.ones_like(t),
                                                   with_aux=True))(params, jnp.asarray(tokens_BxT))
    return np.asarray(logits_BxTxV), float(aux["aux_loss"])


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_aux_loss_match_transformers(sources, case):
    from jaxllm.model import abstract_params

    src, hf_model = sources[case]
    m, params = load_hf(src)
    step, norm = CASES[case]
    assert (m.family, m.decoder_sparse_step, m.norm_topk_prob, m.qkv_bias) == \
        ("qwen2_moe", step, norm, True)
    assert (m.num_experts, m.num_experts_per_tok, m.shared_expert_intermediate_size) == (4, 2, 48)
    shape_dtype = lambda x: (x.shape, x.dtype)
    assert jax.tree.map(shape_dtype, nn.unbox(abstract_params(m))) == \
        jax.tree.map(shape_dtype, params)
    tokens_BxT = _tokens(m.vocab_size)
    want_BxTxV, want_aux, router_logits = _hf_outputs(hf_model, tokens_BxT)
    assert len(router_logits) == 4 // step  # one per sparse layer
    top1 = torch.softmax(torch.cat(router_logits).float(), -1).max(-1).values.mean()
    assert top1 > 0.6 and want_BxTxV.std() > 0.5  # sharp routing, trained-scale logits
    got_BxTxV, got_aux = _jax_outputs(m, params, tokens_BxT)
    np.testing.assert_allclose(got_BxTxV, want_BxTxV, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_aux, want_aux, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers_bitwise(sources, tmp_path, case):
    src, hf_model = sources[case]
    m, params = load_hf(src)
    save_hf(m, params, str(tmp_path), max_shard_bytes=100_000)
    assert len(set(json.load(open(tmp_path / "model.safetensors.index.json"))[
        "weight_map"].values())) > 1
    assert_bitwise_equal(tensors(src), tensors(str(tmp_path)))  # the per-expert layout
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(reloaded) is transformers.Qwen2MoeForCausalLM
    tokens_BxT = _tokens(m.vocab_size)
    want = _hf_outputs(hf_model, tokens_BxT)
    got = _hf_outputs(reloaded.eval(), tokens_BxT)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == want[1]
    m2, _ = load_hf(str(tmp_path))
    assert m2.to_dict() == m.to_dict()


def test_fused_layout_imports_the_same(sources, tmp_path):
    # transformers' in-memory layout: experts.gate_up_proj [E, 2F, D], experts.down_proj
    # [E, D, F] per layer, as save_pretrained(save_original_format=False) writes it.
    from jaxllm.convert.from_hf import import_shardings
    from jaxllm.convert.hf import read_hf_params

    src, hf_model = sources["every_second_layer"]
    hf_model.save_pretrained(str(tmp_path), save_original_format=False)
    names = tensors(str(tmp_path))
    assert "model.layers.1.mlp.experts.gate_up_proj" in names
    assert not any(".experts.0." in name for name in names)
    _, want = load_hf(src)
    m, got = load_hf(str(tmp_path))
    # Also sharded over 8 devices (FSDP over D), as `convert import` reads: each device's block.
    sharded = read_hf_params(str(tmp_path), m, import_shardings(m))
    assert len(sharded["layers"]["layer_1"]["mlp"]["experts"]["gate_proj"].sharding
               .device_set) == 8
    for tree in (got, sharded):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     tree, want)
    save_hf(m, got, str(tmp_path / "out"))
    assert_bitwise_equal(tensors(src), tensors(str(tmp_path / "out")))


def test_cli_round_trip_is_bitwise(sources, tmp_path):
    from jaxllm.checkpoint.run_dir import load_model_config, load_params
    from jaxllm.convert.to_hf import export_checkpoint
    from jaxllm.model import abstract_params

    src = sources["every_second_layer"][0]
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    convert_main(["import", f"--hf={src}", f"--out={ckpt}"])
    m = load_model_config(ckpt)
    assert (m.family, m.decoder_sparse_step, m.num_experts) == ("qwen2_moe", 2, 4)
    restored = load_params(ckpt, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(abstract_params(m))))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored, load_hf(src)[1])
    # One layer group per read: the exporter's blocks of [G, E, ...] params.
    export_checkpoint(ckpt, out, dtype="float32", read_bytes=1)
    assert_bitwise_equal(tensors(src), tensors(out))
    got, want = (json.load(open(os.path.join(d, "config.json"))) for d in (out, src))
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "shared_expert_intermediate_size", "decoder_sparse_step", "norm_topk_prob",
                "router_aux_loss_coef", "mlp_only_layers", "qkv_bias", "intermediate_size"):
        assert got[key] == want[key], key


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_no_shared_expert_and_no_qkv_bias_export(tmp_path):
    # transformers builds both anyway: export writes empty shared experts and zero biases.
    from jaxllm.model import init_params

    m = config_from_hf(_hf_config(1, False, shared=0).to_dict())
    m.update(qkv_bias=False, remat="none", dtype="float32", param_dtype="float32")
    params = init_params(m, jax.random.key(0))
    assert "shared_expert" not in params["layers"]["mlp"]
    save_hf(m, params, str(tmp_path))
    saved = tensors(str(tmp_path))
    assert saved["model.layers.3.mlp.shared_expert.down_proj.weight"].shape == (64, 0)
    assert not saved["model.layers.0.self_attn.q_proj.bias"].any()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens_BxT = _tokens(m.vocab_size)
    want_BxTxV, want_aux, _ = _hf_outputs(model.eval(), tokens_BxT)
    got_BxTxV, got_aux = _jax_outputs(m, params, tokens_BxT)
    np.testing.assert_allclose(got_BxTxV, want_BxTxV, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_aux, want_aux, atol=1e-5, rtol=0)
    m2, params2 = load_hf(str(tmp_path))  # back: zero biases, no shared expert
    assert m2.qkv_bias and m2.shared_expert_intermediate_size == 0
    assert not np.asarray(params2["layers"]["attn"]["q_proj"]["bias"]).any()


def test_generate_from_hf_equals_transformers(sources, tmp_path):
    # KV-cache decoding over layer groups, from what `python -m jaxllm.generate --hf` loads.
    from jaxllm.convert.load import load_model
    from jaxllm.data.tokenizer import load_tokenizer
    from jaxllm.model.decode import generate_ids

    src, hf_model = sources["every_second_layer"]
    save_hf(*load_hf(src), str(tmp_path), tokenizer=load_tokenizer("qwen2", max_rank=256))
    m, params, tokenizer = load_model(hf=str(tmp_path))
    prompt = tokenizer.encode("def main(argv):")
    assert generate_ids(m, params, [prompt], 16)[0] == hf_greedy(hf_model, prompt, 16)


# ----------------------------------------------------------------------------- configs


def test_mlp_only_layers_and_missing_keys_are_refused(sources, tmp_path):
    hf = json.load(open(os.path.join(sources["every_layer_normalised"][0], "config.json")))
    assert hf["mlp_only_layers"] == [] and config_from_hf(hf).num_experts == 4
    os.makedirs(tmp_path / "src")
    with pytest.raises(ValueError, match=r"mlp_only_layers=\[1\] is not supported"):
        config_from_hf(dict(hf, mlp_only_layers=[1]))
    json.dump(dict(hf, mlp_only_layers=[0, 2]), open(tmp_path / "src" / "config.json", "w"))
    with pytest.raises(ValueError, match="config.json: mlp_only_layers="):
        load_hf(str(tmp_path / "src"))
    with pytest.raises(ValueError, match="lacks the key 'moe_intermediate_size'"):
        json.dump({k: v for k, v in hf.items() if k != "moe_intermediate_size"},
                  open(tmp_path / "src" / "config.json", "w"))
        load_hf(str(tmp_path / "src"))


@pytest.mark.parametrize("name", ["qwen2_57b_a14b", "qwen1_5_moe_a2_7b"])
def test_shipped_moe_configs_round_trip(name):
    # What export writes for the published shapes builds a Qwen2MoeConfig and reads back.
    from jaxllm import load_config
    from jaxllm.convert.hf_config import config_to_hf

    m = load_config(f"configs/{name}.py").model
    hf = config_to_hf(m, "bfloat16")
    config = transformers.Qwen2MoeConfig(**hf)
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob,
            config.mlp_only_layers, config.qkv_bias) == \
        (m.num_experts, m.num_experts_per_tok, False, [], True)
    back = config_from_hf(config.to_dict())
    for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                "intermediate_size", "num_experts", "num_experts_per_tok",
                "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
                "router_aux_loss_coef", "decoder_sparse_step", "rope_theta", "vocab_size"):
        assert back[key] == m[key], key


def test_missing_expert_is_named(sources, tmp_path):
    from safetensors.numpy import save_file

    src = sources["every_second_layer"][0]
    saved = tensors(src)
    del saved["model.layers.3.mlp.experts.2.down_proj.weight"]
    save_file(saved, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    json.dump(json.load(open(os.path.join(src, "config.json"))),
              open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.3\.mlp\.experts\.2\."
                       r"down_proj\.weight' \(or 'model\.layers\.3\.mlp\.experts\.down_proj'\)"):
        load_hf(str(tmp_path))

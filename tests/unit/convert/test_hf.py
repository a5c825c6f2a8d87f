"""Hugging Face conversion: transformers parity and bitwise round trips, on tiny random models.

Weights are drawn at a trained model's scale (std 1/sqrt(fan_in), q/k scaled up so attention
is sharp): at transformers' default init std 0.02 attention is near uniform and a wrong rope
base or a swapped head layout moves the logits by only ~1e-6, so parity would prove nothing.
Dimension letters: B batch, T length, V vocab.
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
from safetensors.numpy import save_file

from jaxllm.convert import load_hf, save_hf
from jaxllm.convert.hf import config_from_hf
from tests.helpers.hf import CASES, assert_bitwise_equal, hf_logits, make_hf, tensors, trained_scale

T = 80


def _tokens(vocab: int, B: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (B, T), dtype=np.int32)


def _forward():
    model = pytest.importorskip("jaxllm.model", reason="jaxllm.model is not built yet")
    if not hasattr(model, "forward"):
        pytest.skip("jaxllm.model.forward is not built yet")
    return model.forward


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    forward = _forward()
    hf_model = make_hf(tmp_path, case)
    m, params = load_hf(str(tmp_path))
    tokens_BxT = _tokens(m.vocab_size)
    want_BxTxV = hf_logits(hf_model, tokens_BxT)
    assert want_BxTxV.std() > 0.5  # trained-scale logits, not near-uniform ones
    got_BxTxV = forward(m, params, jnp.asarray(tokens_BxT))
    assert got_BxTxV.dtype == jnp.float32 and got_BxTxV.shape == want_BxTxV.shape
    np.testing.assert_allclose(np.asarray(got_BxTxV), want_BxTxV, atol=1e-4, rtol=1e-4)
    positions_BxT = np.broadcast_to(np.arange(T, dtype=np.int32), tokens_BxT.shape)
    explicit_BxTxV = forward(m, params, jnp.asarray(tokens_BxT), positions=jnp.asarray(
        positions_BxT), segment_ids=jnp.ones_like(jnp.asarray(tokens_BxT)))
    np.testing.assert_allclose(np.asarray(explicit_BxTxV), want_BxTxV, atol=1e-4, rtol=1e-4)


def test_packed_documents_match_transformers_per_document(tmp_path):
    # Positions restart and attention stops at the document boundary, as HF sees each alone.
    forward = _forward()
    hf_model = make_hf(tmp_path, "qwen2_untied")
    m, params = load_hf(str(tmp_path))
    tokens_1xT, cut = _tokens(m.vocab_size, B=1), 37
    positions_1xT = np.concatenate([np.arange(cut), np.arange(T - cut)])[None].astype(np.int32)
    segments_1xT = np.where(np.arange(T) < cut, 1, 2)[None].astype(np.int32)
    got_1xTxV = np.asarray(forward(m, params, jnp.asarray(tokens_1xT), jnp.asarray(positions_1xT),
                                   jnp.asarray(segments_1xT)))
    np.testing.assert_allclose(got_1xTxV[:, :cut], hf_logits(hf_model, tokens_1xT[:, :cut]),
                               atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_1xTxV[:, cut:], hf_logits(hf_model, tokens_1xT[:, cut:]),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_layout_matches_the_model(tmp_path, case):
    # The table's paths and shapes are exactly what the model creates, and its init exports.
    _forward()
    from flax import linen as nn

    from jaxllm.model import abstract_params, init_params

    make_hf(tmp_path / "src", case)
    m, params = load_hf(str(tmp_path / "src"))
    shape_dtype = lambda x: (x.shape, x.dtype)
    assert jax.tree.map(shape_dtype, nn.unbox(abstract_params(m))) == \
        jax.tree.map(shape_dtype, params)
    if case != "qwen2_tied":
        return  # an eager init takes seconds; one case shows a fresh model exports
    save_hf(m, init_params(m, jax.random.key(0)), str(tmp_path / "out"))
    _, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers_bitwise(tmp_path, case):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    hf_model = make_hf(src, case)
    m, params = load_hf(src)
    assert (m.family, m.tie_embeddings, m.rope_theta) == (CASES[case][0], *CASES[case][1:3])
    assert params["embed"]["embedding"].dtype == jnp.float32
    assert ("lm_head" in params) != m.tie_embeddings
    assert params["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 64, 4, m.head_dim)
    save_hf(m, params, out)
    assert_bitwise_equal(tensors(src), tensors(out))
    hf_config = json.load(open(os.path.join(out, "config.json")))
    assert hf_config["rope_parameters"]["rope_theta"] == hf_config["rope_theta"] == m.rope_theta
    assert hf_config["architectures"] == [type(hf_model).__name__]
    assert hf_config["dtype"] == hf_config["torch_dtype"] == "float32"
    assert hf_config["bos_token_id"] == hf_config["eos_token_id"] == 151643
    assert hf_config.get("use_sliding_window", False) is False
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(reloaded) is type(hf_model) and reloaded.config.head_dim == m.head_dim
    tokens_BxT = _tokens(m.vocab_size)
    np.testing.assert_array_equal(hf_logits(reloaded.eval(), tokens_BxT),
                                  hf_logits(hf_model, tokens_BxT))
    m2, _ = load_hf(out)
    assert m2.to_dict() == m.to_dict()


def test_bfloat16_stays_bfloat16_and_save_casts(tmp_path):
    src, out, cast = (str(tmp_path / d) for d in ("src", "out", "cast"))
    make_hf(str(tmp_path / "f32"), "qwen2_untied").to(torch.bfloat16).save_pretrained(src)
    m, params = load_hf(src)
    assert params["layers"]["mlp"]["down_proj"]["kernel"].dtype == jnp.bfloat16
    assert m.dtype == m.param_dtype == "bfloat16"
    save_hf(m, params, out)
    assert_bitwise_equal(tensors(src), tensors(out))
    save_hf(m, params, cast, dtype="float32")
    assert json.load(open(os.path.join(cast, "config.json")))["dtype"] == "float32"
    assert all(t.dtype == np.float32 for t in tensors(cast).values())
    assert load_hf(cast)[1]["embed"]["embedding"].dtype == jnp.float32


def test_dtype_asked_for_is_the_compute_dtype(tmp_path):
    # A default export: bfloat16 weights and config.json. Asked for float32, jaxllm computes in
    # float32 as transformers does: 8e-6 apart at most; in bfloat16 it was 0.15 apart.
    forward = _forward()
    src = str(tmp_path / "src")
    make_hf(str(tmp_path / "f32"), "qwen2_untied").to(torch.bfloat16).save_pretrained(src)
    assert json.load(open(os.path.join(src, "config.json")))["dtype"] == "bfloat16"
    m, params = load_hf(src, dtype="float32")
    assert m.dtype == m.param_dtype == "float32"
    assert params["embed"]["embedding"].dtype == jnp.float32
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, attn_implementation="eager").eval()
    tokens_BxT = _tokens(m.vocab_size)
    want_BxTxV = hf_logits(hf_model, tokens_BxT)
    got_BxTxV = np.asarray(forward(m, params, jnp.asarray(tokens_BxT)))
    np.testing.assert_allclose(got_BxTxV, want_BxTxV, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="'float64' is not one of"):
        load_hf(src, dtype="float64")


def test_tokenizer_files_are_written(tmp_path):
    from jaxllm.data.tokenizer import load_tokenizer

    make_hf(tmp_path / "src", "llama")
    tokenizer = load_tokenizer("qwen2", max_rank=300)  # 303 ids fit the 384-row test vocab
    save_hf(*load_hf(str(tmp_path / "src")), str(tmp_path / "out"), tokenizer=tokenizer)
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config["eos_token_id"] == config["bos_token_id"] == tokenizer.eos_id == 300
    text = "def f(x):\n    return x + 1<|endoftext|>"
    assert load_tokenizer(str(tmp_path / "out")).encode(text) == tokenizer.encode(text)


def test_sharded_both_ways(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    hf_model = make_hf(str(tmp_path / "single"), "qwen2_untied")
    hf_model.save_pretrained(src, max_shard_size="100KB")
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    m, params = load_hf(src)
    save_hf(m, params, out, max_shard_bytes=100_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    assert_bitwise_equal(tensors(src), tensors(out))
    _, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_llama_attention_bias_needs_a_zero_o_proj_bias(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    hf_model = make_hf(src, "llama")
    hf_model.config.attention_bias = True
    model = transformers.LlamaForCausalLM(hf_model.config)
    trained_scale(model, 0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    model.save_pretrained(src)
    m, params = load_hf(src)
    assert m.qkv_bias and "bias" in params["layers"]["attn"]["k_proj"]
    save_hf(m, params, out)
    assert_bitwise_equal(tensors(src), tensors(out))
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.bias[3] = 0.5
    model.save_pretrained(src)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.bias"):
        load_hf(src)


# ----------------------------------------------------------------------------- config and errors


def test_older_config_format():
    hf = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
              rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=True,
              torch_dtype="bfloat16", rms_norm_eps=1e-6, max_position_embeddings=32768,
              use_sliding_window=False, sliding_window=32768)
    m = config_from_hf(hf)
    assert (m.head_dim, m.rope_theta, m.qkv_bias, m.tie_embeddings, m.dtype) == \
        (64, 1e6, True, True, "bfloat16")
    yarn = config_from_hf(dict(hf, rope_scaling=dict(type="yarn", factor=4.0,
                                                     original_max_position_embeddings=32768)))
    assert (yarn.rope_scaling.type, yarn.rope_scaling.factor) == ("yarn", 4.0)


def _edit_config(directory: str, **changes) -> None:
    path = os.path.join(directory, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))


def test_clear_config_errors(tmp_path):
    make_hf(tmp_path, "llama")
    _edit_config(tmp_path, model_type="gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load_hf(str(tmp_path))
    _edit_config(tmp_path, model_type="llama",
                 rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0))
    with pytest.raises(ValueError, match="rope scaling 'llama3' is not supported"):
        load_hf(str(tmp_path))


def test_missing_and_extra_tensors_are_named(tmp_path):
    make_hf(tmp_path, "qwen2_untied")
    saved = tensors(str(tmp_path))
    path = os.path.join(tmp_path, "model.safetensors")
    save_file({k: v for k, v in saved.items() if k != "model.layers.1.self_attn.v_proj.bias"},
              path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.self_attn\.v_proj"):
        load_hf(str(tmp_path))
    save_file({**saved, "model.layers.0.mlp.gate.weight": np.zeros((4, 64), np.float32)},
              path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not use: 'model\.layers\.0\.mlp\.gate\.weight'"):
        load_hf(str(tmp_path))

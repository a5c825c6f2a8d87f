"""Rope scaling: YaRN and dynamic NTK against transformers' Qwen2, LogN against its
definition, export and import of the settings, and bad settings refused.

The models are tiny Qwen2s trained to nothing but at a trained model's weight scale (sharp q/k,
see tests/unit/convert/test_hf.py), with an original length of 64 and rows of 256 tokens: four
times past it, where the scaled and plain rotations differ most.
Dimension letters: B batch, T length, N heads, H head dim.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxllm.config.schema import ConfigError, base_config
from jaxllm.config.validate import validate
from jaxllm.convert import load_hf, save_hf
from jaxllm.convert.hf_config import config_to_hf
from jaxllm.model import forward
from jaxllm.model.layers import apply_rope, rope, rope_inverse_frequencies
from jaxllm.model.transformer import frozen
from tests.helpers.hf import hf_logits, trained_scale

ORIGINAL, FACTOR, T = 64, 4.0, 256


def _make_hf(path, rope_parameters: dict, max_positions: int) -> transformers.PreTrainedModel:
    config = transformers.Qwen2Config(
        vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, tie_word_embeddings=True,
        rms_norm_eps=1e-6, max_position_embeddings=max_positions,
        rope_parameters={"rope_theta": 1e4, **rope_parameters})
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.config._attn_implementation = "eager"
    trained_scale(model, 0)
    model.save_pretrained(path)
    return model


SETTINGS = {
    # name: (rope_parameters, HF max_position_embeddings, jaxllm rope_scaling.type)
    "yarn": ({"rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": ORIGINAL},
             int(ORIGINAL * FACTOR), "yarn"),
    "yarn_betas": ({"rope_type": "yarn", "factor": FACTOR, "beta_fast": 16.0, "beta_slow": 2.0,
                    "attention_factor": 1.2, "original_max_position_embeddings": ORIGINAL},
                   int(ORIGINAL * FACTOR), "yarn"),
    # transformers' dynamic NTK takes max_position_embeddings as the original length.
    "dynamic": ({"rope_type": "dynamic", "factor": FACTOR}, ORIGINAL, "dynamic_ntk"),
}


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    parameters, max_positions, kind = SETTINGS[request.param]
    hf_model = _make_hf(path, parameters, max_positions)
    m, params = load_hf(str(path))
    assert (m.rope_scaling.type, m.rope_scaling.factor) == (kind, FACTOR)
    assert m.rope_scaling.original_max_position_embeddings == ORIGINAL
    return request.param, str(path), hf_model, m, params


def _tokens(B: int = 2) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 384, (B, T), dtype=np.int32)


def test_logits_equal_transformers_past_the_original_length(model):
    name, _, hf_model, m, params = model
    tokens = _tokens()
    want = hf_logits(hf_model, tokens)
    got = np.asarray(forward(m, params, tokens))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # The scaling matters here: plain rope on the same weights is far off.
    plain = m.copy_and_resolve_references()
    plain.rope_scaling.type = "none"
    assert np.abs(np.asarray(forward(plain, params, tokens)) - want).max() > 0.05, name


def test_export_loads_in_transformers_with_the_same_logits(model, tmp_path):
    name, _, hf_model, m, params = model
    save_hf(m, params, str(tmp_path))
    config = json.load(open(tmp_path / "config.json"))
    assert config["rope_parameters"]["rope_type"] == SETTINGS[name][0]["rope_type"]
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    exported.config._attn_implementation = "eager"
    tokens = _tokens(1)
    np.testing.assert_allclose(hf_logits(exported, tokens), hf_logits(hf_model, tokens),
                               atol=1e-5, rtol=1e-5)
    m2, _ = load_hf(str(tmp_path))
    assert m2.rope_scaling.to_dict() == m.rope_scaling.to_dict()


def test_dynamic_ntk_keeps_plain_rope_within_the_original_length():
    cfg = base_config().model
    cfg.update(head_dim=16, rope_theta=1e4)
    cfg.rope_scaling.update(type="dynamic_ntk", factor=4.0, original_max_position_embeddings=64)
    x = jax.random.normal(jax.random.key(0), (1, 64, 2, 16))
    positions = jnp.arange(64)[None]
    np.testing.assert_array_equal(
        rope(frozen(cfg))(x, positions),
        apply_rope(x, positions, rope_inverse_frequencies(16, 1e4)))


def test_logn_scales_queries_past_the_original_length_only():
    """Qwen-7B's LogN: the query at position p (0-based) is multiplied by log_L(p + 1) when
    p + 1 > L, the original length; keys are not."""
    cfg = base_config().model
    cfg.update(head_dim=16, rope_theta=1e4)
    cfg.rope_scaling.update(type="dynamic_ntk", factor=2.0, original_max_position_embeddings=8,
                            logn=True)
    x = jax.random.normal(jax.random.key(0), (2, 24, 3, 16))
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
    rotate = rope(frozen(cfg))
    keys = rotate(x, positions)
    expected = np.array([math.log(p + 1, 8) if p + 1 > 8 else 1.0 for p in range(24)])
    np.testing.assert_allclose(np.asarray(rotate(x, positions, query=True)),
                               np.asarray(keys) * expected[None, :, None, None], rtol=1e-6)
    cfg.rope_scaling.logn = False
    np.testing.assert_array_equal(rope(frozen(cfg))(x, positions, query=True), keys)


@pytest.mark.parametrize("overrides, key", [
    ({"factor": 0.5}, "rope_scaling.factor"),
    ({"type": "yarn", "factor": 4.0, "beta_fast": 1.0, "beta_slow": 2.0}, "rope_scaling.beta_fast"),
    ({"beta_slow": 0.0}, "rope_scaling.beta_slow"),
    ({"attention_factor": -1.0}, "rope_scaling.attention_factor"),
    ({"type": "ntk"}, "rope_scaling.type"),
])
def test_bad_settings_name_the_key(overrides, key):
    config = base_config()
    config.model.rope_scaling.update(overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(config)


def test_logn_is_not_exported():
    cfg = base_config().model
    cfg.update(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
               head_dim=16, intermediate_size=32, dtype="float32")
    cfg.rope_scaling.logn = True
    with pytest.raises(ValueError, match=r"rope_scaling\.logn"):
        config_to_hf(cfg, "float32")


def test_greedy_generation_equals_transformers(model):
    """A 48-token prompt continued by 48 tokens, past the original length of 64: the KV cache
    keeps keys rotated at their own positions (dynamic NTK: by the base of the step that
    wrote them, as transformers' generate does)."""
    from jaxllm.model.decode import generate_ids

    _, _, hf_model, m, params = model
    prompt = _tokens(1)[0, :48].tolist()
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)[0, 48:].tolist()
    assert generate_ids(m, params, [prompt], 48)[0] == want

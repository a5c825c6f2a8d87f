"""Hugging Face `config.json` <-> jaxllm model config (Qwen2, Qwen2-MoE, Llama).

Written in the current transformers format (`rope_parameters`, `dtype`) plus the older keys
(`rope_theta`, `torch_dtype`) that transformers 4.x and vLLM still read; read from either.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections as mc

from jaxllm.config.rules import DTYPES
from jaxllm.config.schema import ConfigError, model_defaults
from jaxllm.config.validate import validate_model

QWEN_ENDOFTEXT = 151643  # bos and eos of the Qwen2 base models
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "llama": "LlamaForCausalLM"}
# Qwen2MoeConfig keys with the same name and meaning in jaxllm's model config.
MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
            "shared_expert_intermediate_size", "decoder_sparse_step", "norm_topk_prob",
            "router_aux_loss_coef")


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, jaxllm rope_scaling) from the new `rope_parameters` or the older keys.
    transformers' "dynamic" takes max_position_embeddings as the original length."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = dict(model_defaults().rope_scaling)
    if kind == "yarn":
        if rope.get("mscale") or rope.get("mscale_all_dim"):
            raise ValueError("yarn with mscale / mscale_all_dim (DeepSeek's variant) is not "
                             "supported")
        scaling.update(type="yarn", factor=float(rope["factor"]),
                       original_max_position_embeddings=int(rope.get(
                           "original_max_position_embeddings",
                           hf.get("max_position_embeddings", 32768))),
                       beta_fast=float(rope.get("beta_fast") or 32.0),
                       beta_slow=float(rope.get("beta_slow") or 1.0),
                       attention_factor=float(rope.get("attention_factor") or 0.0),
                       truncate=bool(rope.get("truncate", True)))
    elif kind == "dynamic":
        scaling.update(type="dynamic_ntk", factor=float(rope["factor"]),
                       original_max_position_embeddings=int(hf.get(
                           "max_position_embeddings", 32768)))
    elif kind != "default":
        raise ValueError(f"rope scaling {kind!r} is not supported; jaxllm reads 'default', "
                         "'yarn' and 'dynamic'")
    return theta, scaling


def config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> mc.ConfigDict:
    """jaxllm model config from a Hugging Face config.json dict (raises ValueError if unusable)."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise ValueError(f"model_type {family!r} is not supported; jaxllm converts "
                         f"{', '.join(map(repr, ARCHITECTURES))}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (SwiGLU needs silu)")
    if hf.get("use_sliding_window") or hf.get("mlp_bias"):
        raise ValueError("sliding-window attention and MLP biases are not supported")
    m = model_defaults()
    m.family = family
    m.vocab_size = hf["vocab_size"]
    m.hidden_size = hf["hidden_size"]
    m.num_layers = hf["num_hidden_layers"]
    m.num_heads = hf["num_attention_heads"]
    m.num_kv_heads = hf.get("num_key_value_heads") or m.num_heads
    m.head_dim = hf.get("head_dim") or m.hidden_size // m.num_heads
    m.intermediate_size = hf["intermediate_size"]
    # Qwen2 always has q/k/v biases, Qwen2-MoE unless transformers 5's qkv_bias says not;
    # Llama has them (and an o_proj bias) with attention_bias.
    m.qkv_bias = family == "qwen2" or bool(hf.get(
        "qkv_bias" if family == "qwen2_moe" else "attention_bias", family == "qwen2_moe"))
    if family == "qwen2_moe":
        _moe_from_hf(hf, m)
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.rms_norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    m.rope_theta, rope_scaling = _rope_from_hf(hf)
    m.rope_scaling.update(rope_scaling)
    m.max_position_embeddings = hf.get("max_position_embeddings", m.max_position_embeddings)
    if dca := hf.get("dual_chunk_attention_config"):
        m.dca.update(enabled=True, chunk_size=dca["chunk_size"], local_size=dca["local_size"])
    m.init_std = float(hf.get("initializer_range", m.init_std))
    dtype = dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype in DTYPES:
        # Compute in the dtype the weights were published in, as transformers does.
        m.dtype = m.param_dtype = dtype
    return m


def _moe_from_hf(hf: dict[str, Any], m: mc.ConfigDict) -> None:
    if hf.get("mlp_only_layers"):
        raise ValueError(f"mlp_only_layers={hf['mlp_only_layers']} is not supported: jaxllm's "
                         "sparse layers are those with (i + 1) % decoder_sparse_step == 0, "
                         "so mlp_only_layers must be empty")
    # Shapes and routing come from config.json: a missing key is an error, not a default.
    for key in MOE_KEYS[:4]:
        m[key] = int(hf[key])
    m.decoder_sparse_step = int(hf.get("decoder_sparse_step", 1))
    m.norm_topk_prob = bool(hf.get("norm_topk_prob", False))
    m.router_aux_loss_coef = float(hf.get("router_aux_loss_coef", 0.001))


def config_to_hf(m: mc.ConfigDict, dtype: str, eos_id: int = QWEN_ENDOFTEXT) -> dict[str, Any]:
    """config.json for `m`, in the current transformers format plus the older rope/dtype keys."""
    if m.family not in ARCHITECTURES:
        raise ValueError(f"model.family {m.family!r} cannot be exported yet; jaxllm exports "
                         f"{', '.join(map(repr, ARCHITECTURES))}")
    if m.rope_scaling.logn:
        raise ValueError("model.rope_scaling.logn: transformers' Qwen2 and Llama have no LogN "
                         "attention scaling, so the exported model would compute otherwise")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    scaling, max_positions = m.rope_scaling, m.max_position_embeddings
    if scaling.type == "yarn":
        rope.update(rope_type="yarn", factor=float(scaling.factor),
                    original_max_position_embeddings=scaling.original_max_position_embeddings,
                    beta_fast=float(scaling.beta_fast), beta_slow=float(scaling.beta_slow),
                    truncate=bool(scaling.truncate))
        if scaling.attention_factor:
            rope["attention_factor"] = float(scaling.attention_factor)
    elif scaling.type == "dynamic_ntk":  # transformers' original length is this key
        rope.update(rope_type="dynamic", factor=float(scaling.factor))
        max_positions = scaling.original_max_position_embeddings
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[m.family]],
        "model_type": m.family,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "intermediate_size": m.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": float(m.rope_theta),
        "rope_parameters": rope,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": bool(m.tie_embeddings),
        "attention_dropout": 0.0,
        "initializer_range": m.init_std,
        "bos_token_id": eos_id,  # Qwen2's bos and eos are both <|endoftext|>
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if m.family in ("qwen2", "qwen2_moe"):
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
    if m.family == "qwen2_moe":
        # q/k/v biases are always written (zeros if jaxllm trained none): transformers 4
        # builds them whatever qkv_bias says.
        hf.update({key: m[key] for key in MOE_KEYS}, qkv_bias=True, mlp_only_layers=[],
                  output_router_logits=False)
    elif m.family == "llama":
        hf.update(attention_bias=bool(m.qkv_bias), mlp_bias=False, pretraining_tp=1)
    if m.dca.enabled:
        hf["dual_chunk_attention_config"] = {
            "chunk_size": m.dca.chunk_size, "local_size": m.dca.local_size,
            "original_max_position_embeddings": m.max_position_embeddings}
    return hf



def read_hf_config(hf_dir: str) -> tuple[mc.ConfigDict, dict[str, Any]]:
    """(validated jaxllm model config, raw config.json) of a Hugging Face directory."""
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} does not exist (is {hf_dir} a Hugging Face "
                                "model directory?)")
    with open(config_path) as f:
        hf_config = json.load(f)
    try:
        m = config_from_hf(hf_config)
        validate_model(m)
    except KeyError as e:
        raise ValueError(f"{config_path} lacks the key {e}") from e
    except (ValueError, ConfigError) as e:
        raise ValueError(f"{config_path}: {e}") from e
    return m, hf_config

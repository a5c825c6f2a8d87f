"""Hugging Face checkpoints (Qwen2, Llama) <-> jaxllm params.

One table, `DENSE_RULES`, names every tensor: the Hugging Face name (`{i}` is the layer index),
the jaxllm param path and how the array changes between the two. Loading and saving both walk
that table, so a new architecture (MoE experts) is new rows, not new code paths.

Dimension letters: L layers, D model dim, N query heads, K kv heads, H head dim, F ffn dim,
V vocab. Hugging Face Linear weights are [out, in]; jaxllm kernels are [in..., out...]
(q_proj [D, N, H], o_proj [N, H, D]), so a Linear is a transpose plus a reshape. RoPE uses the
same rotate-half layout on both sides, so q/k need no permutation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mc
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxllm.config import DTYPES, ConfigError, model_defaults, validate_model

QWEN_ENDOFTEXT = 151643  # bos and eos of the Qwen2 base models
_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# Buffers some exporters write that carry no learned state.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Hugging Face tensors jaxllm has no parameter for; they load only when all zero.
_ZERO_ONLY = ("model.layers.{i}.self_attn.o_proj.bias",)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One Hugging Face tensor <-> one jaxllm param (stacked over L when `hf` has `{i}`)."""

    hf: str
    path: tuple[str, ...]
    kind: str  # "copy" as is; "linear" [out, in] <-> [in..., out...]; "bias" [out] <-> [...]
    n_in: int = 1  # linear: how many leading jaxllm axes are the input
    when: Callable[[mc.ConfigDict], bool] = lambda m: True

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


_L = "model.layers.{i}."
DENSE_RULES = (
    Rule("model.embed_tokens.weight", ("embed", "embedding"), "copy"),
    Rule(_L + "input_layernorm.weight", ("layers", "attn_norm", "scale"), "copy"),
    *(Rule(_L + f"self_attn.{p}.weight", ("layers", "attn", p, "kernel"), "linear")
      for p in ("q_proj", "k_proj", "v_proj")),
    *(Rule(_L + f"self_attn.{p}.bias", ("layers", "attn", p, "bias"), "bias",
           when=lambda m: m.qkv_bias) for p in ("q_proj", "k_proj", "v_proj")),
    Rule(_L + "self_attn.o_proj.weight", ("layers", "attn", "o_proj", "kernel"), "linear", n_in=2),
    Rule(_L + "post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), "copy"),
    *(Rule(_L + f"mlp.{p}.weight", ("layers", "mlp", p, "kernel"), "linear")
      for p in ("gate_proj", "up_proj", "down_proj")),
    Rule("model.norm.weight", ("final_norm", "scale"), "copy"),
    Rule("lm_head.weight", ("lm_head", "kernel"), "linear", when=lambda m: not m.tie_embeddings),
)


def param_shapes(m: mc.ConfigDict) -> dict[tuple[str, ...], tuple[int, ...]]:
    """jaxllm param path -> shape of one layer's slice (whole shape for non-layer params)."""
    D, N, K, H, F, V = (m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim,
                        m.intermediate_size, m.vocab_size)
    a, f = ("layers", "attn"), ("layers", "mlp")
    return {
        ("embed", "embedding"): (V, D), ("lm_head", "kernel"): (D, V),
        ("final_norm", "scale"): (D,), ("layers", "attn_norm", "scale"): (D,),
        ("layers", "mlp_norm", "scale"): (D,),
        (*a, "q_proj", "kernel"): (D, N, H), (*a, "q_proj", "bias"): (N, H),
        (*a, "k_proj", "kernel"): (D, K, H), (*a, "k_proj", "bias"): (K, H),
        (*a, "v_proj", "kernel"): (D, K, H), (*a, "v_proj", "bias"): (K, H),
        (*a, "o_proj", "kernel"): (N, H, D), (*f, "down_proj", "kernel"): (F, D),
        (*f, "gate_proj", "kernel"): (D, F), (*f, "up_proj", "kernel"): (D, F),
    }


def _hf_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
    if rule.kind == "linear":
        return (math.prod(shape[rule.n_in:]), math.prod(shape[:rule.n_in]))
    return (math.prod(shape),) if rule.kind == "bias" else shape


def _to_jax(rule: Rule, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return w.T.reshape(shape) if rule.kind == "linear" else w.reshape(shape)


def _to_hf(rule: Rule, x: np.ndarray) -> np.ndarray:
    if rule.kind == "linear":
        return np.ascontiguousarray(x.reshape(math.prod(x.shape[:rule.n_in]), -1).T)
    return x.reshape(-1) if rule.kind == "bias" else x


# ----------------------------------------------------------------------------- config.json

def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, jaxllm rope_scaling) from the new `rope_parameters` or the older keys."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = dict(model_defaults().rope_scaling)
    if kind in ("yarn", "dynamic"):
        scaling.update(type="yarn" if kind == "yarn" else "dynamic_ntk",
                       factor=float(rope["factor"]),
                       original_max_position_embeddings=int(rope.get(
                           "original_max_position_embeddings",
                           hf.get("max_position_embeddings", 32768))))
    elif kind != "default":
        raise ValueError(f"rope scaling {kind!r} is not supported; jaxllm reads 'default', "
                         "'yarn' and 'dynamic'")
    return theta, scaling


def config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> mc.ConfigDict:
    """jaxllm model config from a Hugging Face config.json dict (raises ValueError if unusable)."""
    family = hf.get("model_type")
    if family not in _ARCHITECTURES:
        raise ValueError(f"model_type {family!r} is not supported; jaxllm converts "
                         f"{', '.join(map(repr, _ARCHITECTURES))}")
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
    # Qwen2 always has q/k/v biases; Llama has them (and an o_proj bias) with attention_bias.
    m.qkv_bias = family == "qwen2" or bool(hf.get("attention_bias", False))
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


def config_to_hf(m: mc.ConfigDict, dtype: str, eos_id: int = QWEN_ENDOFTEXT) -> dict[str, Any]:
    """config.json for `m`, in the current transformers format plus the older rope/dtype keys."""
    if m.family not in _ARCHITECTURES:
        raise ValueError(f"model.family {m.family!r} cannot be exported yet; jaxllm exports "
                         f"{', '.join(map(repr, _ARCHITECTURES))}")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    if m.rope_scaling.type != "none":
        rope.update(rope_type="yarn" if m.rope_scaling.type == "yarn" else "dynamic",
                    factor=float(m.rope_scaling.factor),
                    original_max_position_embeddings=m.rope_scaling.original_max_position_embeddings)
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[m.family]],
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
        "max_position_embeddings": m.max_position_embeddings,
        "tie_word_embeddings": bool(m.tie_embeddings),
        "attention_dropout": 0.0,
        "initializer_range": m.init_std,
        "bos_token_id": eos_id,  # Qwen2's bos and eos are both <|endoftext|>
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if m.family == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
    else:
        hf.update(attention_bias=bool(m.qkv_bias), mlp_bias=False, pretraining_tp=1)
    if m.dca.enabled:
        hf["dual_chunk_attention_config"] = {
            "chunk_size": m.dca.chunk_size, "local_size": m.dca.local_size,
            "original_max_position_embeddings": m.max_position_embeddings}
    return hf


# ----------------------------------------------------------------------------- load

def _tensor_files(hf_dir: str) -> dict[str, str]:
    """HF tensor name -> safetensors file holding it."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
    single = os.path.join(hf_dir, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor "
                                "model.safetensors.index.json (only safetensors are read)")
    with safe_open(single, framework="np") as f:
        return {name: single for name in f.keys()}


def load_hf(hf_dir: str) -> tuple[mc.ConfigDict, dict[str, Any]]:
    """Reads a Hugging Face Qwen2 / Llama directory into (model config, params).

    Params are `jax.Array`s in the dtype on disk, layers stacked along a leading L axis.
    """
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} does not exist")
    with open(config_path) as f:
        hf_config = json.load(f)
    try:
        m = config_from_hf(hf_config)
        validate_model(m)
    except KeyError as e:
        raise ValueError(f"{config_path} lacks the key {e}") from e
    except (ValueError, ConfigError) as e:
        raise ValueError(f"{config_path}: {e}") from e
    files = _tensor_files(hf_dir)
    shapes = param_shapes(m)
    flat: dict[tuple[str, ...], jax.Array] = {}
    used: set[str] = set()
    with contextlib.ExitStack() as stack:
        handles = {p: stack.enter_context(safe_open(p, framework="np"))
                   for p in set(files.values())}

        def read(name: str, expected: tuple[int, ...]) -> np.ndarray:
            if name not in files:
                raise ValueError(f"{hf_dir} is missing tensor {name!r} (a {m.family} model with "
                                 f"qkv_bias={m.qkv_bias}, tie_embeddings={m.tie_embeddings})")
            used.add(name)
            w = handles[files[name]].get_tensor(name)
            if tuple(w.shape) != tuple(expected):
                raise ValueError(f"{hf_dir}: tensor {name!r} has shape {tuple(w.shape)}, "
                                 f"config.json implies {tuple(expected)}")
            return w

        for rule in DENSE_RULES:
            if not rule.when(m):
                continue
            shape = shapes[rule.path]
            if rule.per_layer:
                layers = [_to_jax(rule, read(rule.hf.format(i=i), _hf_shape(rule, shape)), shape)
                          for i in range(m.num_layers)]
                value = np.stack(layers)
            else:
                value = _to_jax(rule, read(rule.hf, _hf_shape(rule, shape)), shape)
            flat[rule.path] = jnp.asarray(value)

        leftover = sorted(set(files) - used)
        zero_only = {z.format(i=i) for z in _ZERO_ONLY for i in range(m.num_layers)}
        if m.tie_embeddings and "lm_head.weight" in leftover:
            # Some exporters write the tied head anyway; harmless when it is the embedding.
            head = handles[files["lm_head.weight"]].get_tensor("lm_head.weight")
            if not np.array_equal(head, np.asarray(flat[("embed", "embedding")])):
                raise ValueError(f"{hf_dir}: config.json ties the embeddings but lm_head.weight "
                                 "differs from model.embed_tokens.weight")
            leftover.remove("lm_head.weight")
        for name in [n for n in leftover if n in zero_only]:
            if np.any(handles[files[name]].get_tensor(name)):
                raise ValueError(f"{hf_dir}: tensor {name!r} is nonzero; jaxllm has no such "
                                 "parameter, so converting would change the model")
            leftover.remove(name)
    leftover = [n for n in leftover if not n.endswith(_IGNORED_SUFFIXES)]
    if leftover:
        more = f" and {len(leftover) - 5} more" if len(leftover) > 5 else ""
        raise ValueError(f"{hf_dir} has tensors a {m.family} model does not use: "
                         f"{', '.join(map(repr, leftover[:5]))}{more}")
    m.param_dtype = _dtype_name(flat[("embed", "embedding")].dtype, m.param_dtype)
    return m, traverse_util.unflatten_dict(flat)


def _dtype_name(dtype: Any, default: str) -> str:
    return np.dtype(dtype).name if np.dtype(dtype).name in DTYPES else default


# ----------------------------------------------------------------------------- save

def hf_tensors(m: mc.ConfigDict, params: dict[str, Any],
               dtype: str | None = None) -> dict[str, np.ndarray]:
    """Hugging Face name -> numpy array for `params` (cast to `dtype` when given)."""
    flat = traverse_util.flatten_dict(params)
    rules = [r for r in DENSE_RULES if r.when(m)]
    unknown = sorted(set(flat) - {r.path for r in rules})
    if unknown:
        raise ValueError(f"params hold {['/'.join(p) for p in unknown]}, which a {m.family} "
                         f"model with qkv_bias={m.qkv_bias}, tie_embeddings={m.tie_embeddings} "
                         "has no Hugging Face name for")
    cast, shapes = (_NP_DTYPES[dtype] if dtype else None), param_shapes(m)
    out: dict[str, np.ndarray] = {}
    for rule in rules:
        if rule.path not in flat:
            raise ValueError(f"params lack {'/'.join(rule.path)} (needed for {rule.hf!r})")
        x = np.asarray(jax.device_get(flat[rule.path]))
        shape = (m.num_layers, *shapes[rule.path]) if rule.per_layer else shapes[rule.path]
        if x.shape != shape:
            raise ValueError(f"param {'/'.join(rule.path)} has shape {x.shape}, the model "
                             f"config implies {shape}")
        if cast is not None:
            x = x.astype(cast)
        if rule.per_layer:
            for i in range(m.num_layers):
                out[rule.hf.format(i=i)] = _to_hf(rule, x[i])
        else:
            out[rule.hf] = _to_hf(rule, x)
    # Architecture tensors jaxllm lacks: zeros keep the function and let transformers load
    # with no missing keys (Qwen2 always has q/k/v biases, Llama's attention_bias adds o_proj's).
    like = out["model.embed_tokens.weight"]
    zeros: list[tuple[str, int]] = []
    if m.family == "qwen2" and not m.qkv_bias:
        zeros += [(f"self_attn.{p}.bias", math.prod(shapes[("layers", "attn", p, "bias")]))
                  for p in ("q_proj", "k_proj", "v_proj")]
    if m.family == "llama" and m.qkv_bias:
        zeros.append(("self_attn.o_proj.bias", m.hidden_size))
    for name, size in zeros:
        for i in range(m.num_layers):
            out[_L.format(i=i) + name] = np.zeros((size,), like.dtype)
    return out


def _write_tensors(tensors: dict[str, np.ndarray], out_dir: str, max_shard_bytes: int) -> None:
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    # A stale single file or shard set from an earlier export would shadow or mix with this one.
    for file in os.listdir(out_dir):
        if file == "model.safetensors.index.json" or re.fullmatch(
                r"model(-\d+-of-\d+)?\.safetensors", file):
            os.remove(os.path.join(out_dir, file))
    total = sum(t.nbytes for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata=metadata)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    for name, t in tensors.items():
        if shards[-1] and sum(x.nbytes for x in shards[-1].values()) + t.nbytes > max_shard_bytes:
            shards.append({})
        shards[-1][name] = t
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, file), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _save_tokenizer(tokenizer: Any, out_dir: str) -> None:
    try:
        from jaxllm.tokenizer import save_hf_tokenizer_files
    except ImportError as e:  # the weights are still worth writing without the tokenizer
        warnings.warn(f"tokenizer files not written: {e}", stacklevel=3)
        return
    save_hf_tokenizer_files(tokenizer, out_dir)


def save_hf(model_config: mc.ConfigDict, params: dict[str, Any], out_dir: str,
            tokenizer: Any = None, dtype: str | None = None,
            max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes a Hugging Face directory that `AutoModelForCausalLM.from_pretrained` loads.

    `dtype` ("float32", "bfloat16", "float16") casts the weights; by default they keep the
    dtype they have. Above `max_shard_bytes` the weights are sharded with an index file.
    """
    if dtype is not None and dtype not in _NP_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_NP_DTYPES)}")
    config_to_hf(model_config, "float32")  # refuses a family with no export before any work
    tensors = hf_tensors(model_config, params, dtype)
    disk_dtype = _dtype_name(tensors["model.embed_tokens.weight"].dtype, "float32")
    eos_id = int(getattr(tokenizer, "eos_id", QWEN_ENDOFTEXT))
    hf_config = config_to_hf(model_config, disk_dtype, eos_id)
    os.makedirs(out_dir, exist_ok=True)
    _write_tensors(tensors, out_dir, max_shard_bytes)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out_dir)

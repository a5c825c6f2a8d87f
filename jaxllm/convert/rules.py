"""The table that names every tensor: Hugging Face name <-> jaxllm param path <-> layout.

Loading, saving, export and import all walk `DENSE_RULES`, so a new architecture is new rows,
not new code paths. A rule's Hugging Face name may hold index placeholders: `{i}` is the layer
and indexes the param's leading L axis. Qwen2-MoE's expert weights slot in as rows whose name
holds `{i}` and `{e}` (leading [L, E] axes, `STACKED` gives their sizes) and whose `when`
tests `m.family == "qwen2_moe"`.

Dimension letters: L layers, E experts, D model dim, N query heads, K kv heads, H head dim,
F ffn dim, V vocab rows. Hugging Face Linear weights are [out, in]; jaxllm kernels are
[in..., out...] (q_proj [D, N, H], o_proj [N, H, D]), so a Linear is a transpose plus a
reshape. RoPE uses the same rotate-half layout on both sides: q/k need no permutation.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Iterator

import ml_collections as mc
import numpy as np

from jaxllm.convert.shards import TensorInfo

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One Hugging Face tensor (per index value) <-> one jaxllm param."""

    hf: str
    path: Path
    kind: str  # "copy" as is; "linear" [out, in] <-> [in..., out...]; "bias" [out] <-> [...]
    n_in: int = 1  # linear: how many leading (per-slice) jaxllm axes are the input
    when: Callable[[mc.ConfigDict], bool] = lambda m: True
    vocab: bool = False  # the Hugging Face tensor is [V, D]: the vocab-rows rule applies

    @property
    def placeholders(self) -> tuple[str, ...]:
        return tuple(re.findall(r"\{(\w)\}", self.hf))


_L = "model.layers.{i}."
DENSE_RULES = (
    Rule("model.embed_tokens.weight", ("embed", "embedding"), "copy", vocab=True),
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
    Rule("lm_head.weight", ("lm_head", "kernel"), "linear", vocab=True,
         when=lambda m: not m.tie_embeddings),
)
# Placeholder -> the model config key giving its size.
STACKED = {"i": "num_layers", "e": "num_experts"}


@dataclasses.dataclass(frozen=True)
class ZeroTensor:
    """A Hugging Face tensor with no jaxllm param: export writes zeros (the architecture
    requires it and zeros keep the function), import accepts it only when all zero."""

    hf: str
    size: Callable[[mc.ConfigDict], int]
    when: Callable[[mc.ConfigDict], bool]


ZERO_TENSORS = (
    # Qwen2 always has q/k/v biases; a jaxllm qwen2 model may be trained without them.
    *(ZeroTensor(_L + f"self_attn.{p}.bias", (lambda m, p=p: m.head_dim * (
        m.num_heads if p == "q_proj" else m.num_kv_heads)),
        lambda m: m.family == "qwen2" and not m.qkv_bias) for p in ("q_proj", "k_proj", "v_proj")),
    # Llama's attention_bias adds an o_proj bias, which jaxllm does not have.
    ZeroTensor(_L + "self_attn.o_proj.bias", lambda m: m.hidden_size,
               lambda m: m.family == "llama" and m.qkv_bias),
)


def active_rules(m: mc.ConfigDict) -> list[Rule]:
    return [r for r in DENSE_RULES if r.when(m)]


def param_shapes(m: mc.ConfigDict) -> dict[Path, tuple[int, ...]]:
    """jaxllm param path -> shape of one slice (without the stacked L/E axes)."""
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


def stacked_shape(m: mc.ConfigDict, rule: Rule) -> tuple[int, ...]:
    """The whole jaxllm param: stacked axes, then the slice."""
    return (*(m[STACKED[p]] for p in rule.placeholders), *param_shapes(m)[rule.path])


def indices(m: mc.ConfigDict, rule: Rule) -> Iterator[tuple[int, ...]]:
    """Every value of the rule's placeholders, in the order the stacked axes run."""
    return itertools.product(*(range(m[STACKED[p]]) for p in rule.placeholders))


def hf_name(rule: Rule | ZeroTensor, index: tuple[int, ...]) -> str:
    names = re.findall(r"\{(\w)\}", rule.hf)
    return rule.hf.format(**dict(zip(names, index, strict=True)))


def hf_shape(rule: Rule, shape: tuple[int, ...], rows: int | None = None) -> tuple[int, ...]:
    """Hugging Face shape of one slice of jaxllm `shape`; `rows` overrides V for vocab rules."""
    if rule.kind == "linear":
        out = (math.prod(shape[rule.n_in:]), math.prod(shape[:rule.n_in]))
    else:
        out = (math.prod(shape),) if rule.kind == "bias" else shape
    return (rows, *out[1:]) if rule.vocab and rows is not None else out


def to_jax(rule: Rule, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return w.T.reshape(shape) if rule.kind == "linear" else w.reshape(shape)


def to_hf(rule: Rule, x: np.ndarray, rows: int | None = None) -> np.ndarray:
    """One jaxllm slice in Hugging Face layout; vocab rules are trimmed / zero-padded to
    `rows` (see the vocab-rows rule in hf.py)."""
    if rule.kind == "linear":
        w = np.ascontiguousarray(x.reshape(math.prod(x.shape[:rule.n_in]), -1).T)
    else:
        w = x.reshape(-1) if rule.kind == "bias" else x
    if rule.vocab and rows is not None and rows != w.shape[0]:
        if rows < w.shape[0]:
            w = w[:rows]
        else:
            w = np.concatenate([w, np.zeros((rows - w.shape[0], *w.shape[1:]), w.dtype)])
    return np.ascontiguousarray(w)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor to write: from `rule` at `index`, or zeros when rule is None."""

    info: TensorInfo
    rule: Rule | None
    index: tuple[int, ...]


def export_plan(m: mc.ConfigDict, dtype: np.dtype, rows: int | None = None) -> list[Entry]:
    """Every Hugging Face tensor of `m`, rule by rule (each rule's slices in stacked order, so
    the exporter reads a param's layers in consecutive blocks)."""
    shapes, plan = param_shapes(m), []
    for rule in active_rules(m):
        shape = hf_shape(rule, shapes[rule.path], rows)
        plan += [Entry(TensorInfo(hf_name(rule, ix), shape, dtype), rule, ix)
                 for ix in indices(m, rule)]
    for zero in ZERO_TENSORS:
        if zero.when(m):
            plan += [Entry(TensorInfo(hf_name(zero, (i,)), (zero.size(m),), dtype), None, (i,))
                     for i in range(m.num_layers)]
    return plan

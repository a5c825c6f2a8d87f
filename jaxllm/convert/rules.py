"""The table that names every tensor: Hugging Face name <-> jaxllm param path <-> layout.

Loading, saving, export and import all walk `PARAM_RULES` (through `active_rules`), so a new
architecture is new rows, not new code paths. A rule's Hugging Face name may hold index
placeholders: `{i}` is the layer and indexes the param's leading L axis, `{e}` the expert
and its E axis (`stack_sizes` gives their sizes).

Qwen2-MoE: layer i is sparse when (i + 1) % decoder_sparse_step == 0, as in transformers.
With a step of 1 every layer is sparse and the MoE rows replace the dense MLP rows. With a
step > 1 jaxllm scans over Lg = L / step groups of `step` layers (jaxllm/model/transformer.py):
`active_rules` gives every layer rule once per position j in the group, its path under
`layers/layer_{j}` and Hugging Face layer i = step·g + j for the param's index g; the sparse
rows go to j = step - 1 and the dense MLP rows to the others. transformers 5 holds a layer's
experts fused in memory (`experts.gate_up_proj` [E, 2Fe, D], `experts.down_proj` [E, D, Fe]);
its `save_pretrained` writes the per-expert names published checkpoints use, and so does
export. Import reads either (`Rule.fused`).

Dimension letters (docs/glossary.md): L layers, Lg layer groups, E experts, D model dim, N
query heads, K kv heads, H head dim, F ffn dim, Fe an expert's, V vocab rows. Hugging Face
Linear weights are [out, in]; jaxllm kernels are [in..., out...] (q_proj [D, N, H], o_proj
[N, H, D]), so a Linear is a transpose plus a reshape. RoPE uses the same rotate-half layout
on both sides: q/k need no permutation.
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
    mlp: str = ""  # "dense" / "sparse": only in layers with that MLP (MoE models)
    # Import also reads the layer's experts from this fused [E, parts·out, in] tensor, slice
    # `part[0]` of `part[1]` along its out axis (transformers 5's in-memory layout).
    fused: str = ""
    part: tuple[int, int] = (0, 1)
    stride: int = 1  # Hugging Face layer = stride · (the param's layer index) + offset
    offset: int = 0
    shape_key: Path = ()  # the path `param_shapes` names; () means `path`

    @property
    def placeholders(self) -> tuple[str, ...]:
        return tuple(re.findall(r"\{(\w)\}", self.hf))


_L = "model.layers.{i}."
_X = _L + "mlp.experts.{e}."
_MOE = lambda m: m.family == "qwen2_moe"
_SHARED = lambda m: m.family == "qwen2_moe" and m.shared_expert_intermediate_size > 0
_MLP = ("gate_proj", "up_proj", "down_proj")
PARAM_RULES = (
    Rule("model.embed_tokens.weight", ("embed", "embedding"), "copy", vocab=True),
    Rule(_L + "input_layernorm.weight", ("layers", "attn_norm", "scale"), "copy"),
    *(Rule(_L + f"self_attn.{p}.weight", ("layers", "attn", p, "kernel"), "linear")
      for p in ("q_proj", "k_proj", "v_proj")),
    *(Rule(_L + f"self_attn.{p}.bias", ("layers", "attn", p, "bias"), "bias",
           when=lambda m: m.qkv_bias) for p in ("q_proj", "k_proj", "v_proj")),
    Rule(_L + "self_attn.o_proj.weight", ("layers", "attn", "o_proj", "kernel"), "linear", n_in=2),
    Rule(_L + "post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), "copy"),
    *(Rule(_L + f"mlp.{p}.weight", ("layers", "mlp", p, "kernel"), "linear", mlp="dense")
      for p in _MLP),
    # Qwen2-MoE's sparse layers.
    Rule(_L + "mlp.gate.weight", ("layers", "mlp", "router", "kernel"), "linear", when=_MOE,
         mlp="sparse"),
    *(Rule(_X + f"{p}.weight", ("layers", "mlp", "experts", p), "linear", when=_MOE,
           mlp="sparse", fused=_L + ("mlp.experts.down_proj" if p == "down_proj" else
                                    "mlp.experts.gate_up_proj"),
           part=(1, 2) if p == "up_proj" else (0, 2) if p == "gate_proj" else (0, 1))
      for p in _MLP),
    *(Rule(_L + f"mlp.shared_expert.{p}.weight", ("layers", "mlp", "shared_expert", p, "kernel"),
           "linear", when=_SHARED, mlp="sparse") for p in _MLP),
    Rule(_L + "mlp.shared_expert_gate.weight", ("layers", "mlp", "shared_expert_gate", "kernel"),
         "linear", when=_SHARED, mlp="sparse"),
    Rule("model.norm.weight", ("final_norm", "scale"), "copy"),
    Rule("lm_head.weight", ("lm_head", "kernel"), "linear", vocab=True,
         when=lambda m: not m.tie_embeddings),
)


def group_size(m: mc.ConfigDict) -> int:
    """Layers per scanned step, as jaxllm/model/transformer.py `layer_groups` has it."""
    return m.decoder_sparse_step if m.num_experts and m.decoder_sparse_step > 1 else 1


def sparse_layers(m: mc.ConfigDict) -> list[int]:
    if not m.num_experts:
        return []
    return [i for i in range(m.num_layers) if (i + 1) % m.decoder_sparse_step == 0]


def active_rules(m: mc.ConfigDict) -> list[Rule]:
    """The rules of `m`, each once per position in a layer group (see the docstring)."""
    step, out = group_size(m), []
    for r in PARAM_RULES:
        if not r.when(m):
            continue
        if step == 1:
            if r.mlp != ("dense" if m.num_experts else "sparse"):
                out.append(r)
            continue
        if r.path[0] != "layers":
            out.append(r)
            continue
        for j in range(step):
            if r.mlp != ("dense" if j == step - 1 else "sparse"):
                out.append(dataclasses.replace(r, path=("layers", f"layer_{j}", *r.path[1:]),
                                               stride=step, offset=j, shape_key=r.path))
    return out


def param_shapes(m: mc.ConfigDict) -> dict[Path, tuple[int, ...]]:
    """jaxllm param path (ungrouped) -> shape of one slice (without the stacked L/E axes)."""
    D, N, K, H, F, V = (m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim,
                        m.intermediate_size, m.vocab_size)
    Fe, Fs, E = m.moe_intermediate_size, m.shared_expert_intermediate_size, m.num_experts
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
        (*f, "router", "kernel"): (D, E),
        (*f, "experts", "gate_proj"): (D, Fe), (*f, "experts", "up_proj"): (D, Fe),
        (*f, "experts", "down_proj"): (Fe, D),
        (*f, "shared_expert", "gate_proj", "kernel"): (D, Fs),
        (*f, "shared_expert", "up_proj", "kernel"): (D, Fs),
        (*f, "shared_expert", "down_proj", "kernel"): (Fs, D),
        (*f, "shared_expert_gate", "kernel"): (D, 1),
    }


def slice_shape(m: mc.ConfigDict, rule: Rule) -> tuple[int, ...]:
    return param_shapes(m)[rule.shape_key or rule.path]


def stack_sizes(m: mc.ConfigDict, rule: Rule) -> tuple[int, ...]:
    """Sizes of the rule's stacked axes: layers (or layer groups), then experts."""
    size = {"i": m.num_layers // rule.stride, "e": m.num_experts}
    return tuple(size[p] for p in rule.placeholders)


def stacked_shape(m: mc.ConfigDict, rule: Rule) -> tuple[int, ...]:
    """The whole jaxllm param: stacked axes, then the slice."""
    return (*stack_sizes(m, rule), *slice_shape(m, rule))


def indices(m: mc.ConfigDict, rule: Rule) -> Iterator[tuple[int, ...]]:
    """Every value of the rule's placeholders, in the order the stacked axes run."""
    return itertools.product(*map(range, stack_sizes(m, rule)))


def hf_name(rule: Rule | ZeroTensor, index: tuple[int, ...], template: str = "") -> str:
    """The Hugging Face name at a param index (`template`: another name of the rule's)."""
    names = re.findall(r"\{(\w)\}", rule.hf)
    values = dict(zip(names, index, strict=True))
    if isinstance(rule, Rule) and "i" in values:
        values["i"] = rule.stride * values["i"] + rule.offset
    return (template or rule.hf).format(**values)


def fused_name(rule: Rule, index: tuple[int, ...]) -> str:
    return hf_name(rule, index, rule.fused)


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
class ZeroTensor:
    """A Hugging Face tensor with no jaxllm param: export writes zeros (the architecture
    requires it and zeros keep the function); import accepts it only when all zero, or with
    any values when `inert` (it cannot change the function)."""

    hf: str
    shape: Callable[[mc.ConfigDict], tuple[int, ...]]
    when: Callable[[mc.ConfigDict], bool]
    sparse: bool = False  # only in sparse layers
    inert: bool = False


_NO_SHARED = lambda m: m.family == "qwen2_moe" and not m.shared_expert_intermediate_size
ZERO_TENSORS = (
    # Qwen2 and Qwen2-MoE always have q/k/v biases (as transformers 4 builds them); a jaxllm
    # model may be trained without them.
    *(ZeroTensor(_L + f"self_attn.{p}.bias", (lambda m, p=p: (m.head_dim * (
        m.num_heads if p == "q_proj" else m.num_kv_heads),)),
        lambda m: m.family in ("qwen2", "qwen2_moe") and not m.qkv_bias)
      for p in ("q_proj", "k_proj", "v_proj")),
    # Llama's attention_bias adds an o_proj bias, which jaxllm does not have.
    ZeroTensor(_L + "self_attn.o_proj.bias", lambda m: (m.hidden_size,),
               lambda m: m.family == "llama" and m.qkv_bias),
    # transformers builds a shared expert in every sparse layer; jaxllm's may have none
    # (shared_expert_intermediate_size 0): an empty one, whose gate then multiplies nothing.
    *(ZeroTensor(_L + f"mlp.shared_expert.{p}.weight", (lambda m, p=p: (
        (m.hidden_size, 0) if p == "down_proj" else (0, m.hidden_size))), _NO_SHARED,
        sparse=True) for p in _MLP),
    ZeroTensor(_L + "mlp.shared_expert_gate.weight", lambda m: (1, m.hidden_size), _NO_SHARED,
               sparse=True, inert=True),
)


def zero_layers(m: mc.ConfigDict, zero: ZeroTensor) -> list[int]:
    return sparse_layers(m) if zero.sparse else list(range(m.num_layers))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor to write: from `rule` at `index`, or zeros when rule is None."""

    info: TensorInfo
    rule: Rule | None
    index: tuple[int, ...]


def export_plan(m: mc.ConfigDict, dtype: np.dtype, rows: int | None = None) -> list[Entry]:
    """Every Hugging Face tensor of `m`, rule by rule (each rule's slices in stacked order, so
    the exporter reads a param's layers in consecutive blocks)."""
    plan = []
    for rule in active_rules(m):
        shape = hf_shape(rule, slice_shape(m, rule), rows)
        plan += [Entry(TensorInfo(hf_name(rule, ix), shape, dtype), rule, ix)
                 for ix in indices(m, rule)]
    for zero in ZERO_TENSORS:
        if zero.when(m):
            plan += [Entry(TensorInfo(hf_name(zero, (i,)), zero.shape(m), dtype), None, (i,))
                     for i in zero_layers(m, zero)]
    return plan

"""The values every config key may take: `VALUE_RULES`, one rule per key of config.base_config().

A rule gives a leaf's type and the values it may take: an interval such as "[0, 1)" (bounds
are numbers, `inf` or `2**N`), a set of choices, or any value of its type. `Rule.error`
returns what is wrong as text, or None; config.validate() raises it as a ConfigError naming
the key, then runs the checks that involve several keys (divisibility, warmup <= steps, ...).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections as mc

Path = tuple[str, ...]
_KINDS = {bool: "a bool", int: "an int", float: "a number", str: "a string"}


def _bound(text: str) -> float:
    if "**" in text:
        base, exponent = text.split("**")
        return int(base) ** int(exponent)
    return float(text)


def _is_kind(value: Any, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):  # True is not an int, 1 is not a bool
        return kind is bool and isinstance(value, bool)
    if kind is float:  # an int is fine where a float is expected, not the other way round
        return isinstance(value, numbers.Real)
    return isinstance(value, numbers.Integral if kind is int else kind)


@dataclasses.dataclass(frozen=True)
class Rule:
    """The type of one leaf and the values it may take."""

    kind: type  # bool, int, float or str
    interval: str = ""  # "[lo, hi]" with ( or ) for open ends; "" for any value of the kind
    choices: tuple = ()  # the allowed values, instead of an interval
    special: tuple = ()  # (value, meaning): one value allowed outside the interval
    nonempty: bool = False  # a string that must not be ""

    def error(self, value: Any) -> str | None:
        if self.choices:
            if isinstance(value, self.kind) and value in self.choices:
                return None
            return f"{value!r} is not one of {', '.join(map(repr, self.choices))}"
        if not _is_kind(value, self.kind):
            shown = "a group of keys" if isinstance(value, mc.ConfigDict) else repr(value)
            return f"must be {_KINDS[self.kind]}, got {shown} ({type(value).__name__})"
        if self.nonempty and not value:
            return "must not be empty"
        if not self.interval or (self.special and value == self.special[0]):
            return None
        lo, hi = (_bound(b.strip()) for b in self.interval[1:-1].split(","))
        # Written so that NaN is outside every interval.
        above = lo <= value if self.interval[0] == "[" else lo < value
        below = value <= hi if self.interval[-1] == "]" else value < hi
        if above and below:
            return None
        special = f" and is not {self.special[0]!r} ({self.special[1]})" if self.special else ""
        return f"{value!r} is outside {self.interval}{special}"


def integer(interval: str = "", special: tuple = ()) -> Rule:
    return Rule(int, interval, special=special)


def number(interval: str = "", special: tuple = ()) -> Rule:
    return Rule(float, interval, special=special)


def choice(*allowed: str) -> Rule:
    return Rule(str, choices=allowed)


BOOL = Rule(bool)
TEXT = Rule(str)
NAME = Rule(str, nonempty=True)


def rule_for(rules: Mapping[str, Rule], path: Path) -> Rule | None:
    """The rule of `path`: by its dotted name, or a pattern whose `*` segments match any name."""
    rule = rules.get(".".join(path))
    if rule is not None:
        return rule
    for pattern, rule in rules.items():
        parts = pattern.split(".")
        if "*" in parts and len(parts) == len(path) and all(
                p in ("*", q) for p, q in zip(parts, path, strict=True)):
            return rule
    return None


def walk(rules: Mapping[str, Rule], node: mc.ConfigDict, path: Path = ()
         ) -> Iterator[tuple[Path, Any, Rule | None]]:
    """(path, value, rule) of every leaf under `node`, whose own path is `path`: a key with a
    rule, or a value that is not a group of keys (with rule None when there is none)."""
    for key in node.keys():
        value, sub = node[key], (*path, key)
        rule = rule_for(rules, sub)
        if rule is None and isinstance(value, mc.ConfigDict):
            yield from walk(rules, value, sub)
        else:
            yield sub, value, rule


# ----------------------------------------------------------------------------- the table

FAMILIES = ("qwen2", "qwen2_moe", "llama")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")
ATTENTION_IMPLS = ("auto", "xla", "chunked", "pallas")
MOE_IMPLS = ("auto", "xla", "pallas")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
OBJECTIVES = ("lm", "distill", "sft", "dpo")  # stage objectives (train/step.py)
ROPE_SCALINGS = ("none", "yarn", "dynamic_ntk")
SOURCE_FORMATS = ("python_stdlib", "text", "jsonl", "parquet", "arrayrecord")

# The values each key of config.base_config() may take; `*` is any stage, source or mixture
# entry name. config.validate() applies them before the checks that involve several keys,
# and fails on a key with no rule here, so a new key cannot be added without one.
COUNT, SIZE, RATE = integer("[0, inf)"), integer("[1, inf)"), number("[0, inf)")
POSITIVE = number("(0, inf)")
VALUE_RULES: dict[str, Rule] = {
    "model.family": choice(*FAMILIES),
    **{f"model.{k}": SIZE for k in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                      "num_kv_heads", "head_dim", "intermediate_size",
                                      "max_position_embeddings")},
    "model.qkv_bias": BOOL,
    "model.tie_embeddings": BOOL,
    "model.rms_norm_eps": POSITIVE,
    "model.rope_theta": POSITIVE,
    "model.rope_scaling.type": choice(*ROPE_SCALINGS),
    "model.rope_scaling.factor": number("[1, inf)"),
    "model.rope_scaling.original_max_position_embeddings": SIZE,
    "model.rope_scaling.beta_fast": POSITIVE,
    "model.rope_scaling.beta_slow": POSITIVE,
    "model.rope_scaling.attention_factor": RATE,  # 0: 0.1·ln(factor) + 1
    "model.rope_scaling.truncate": BOOL,
    "model.rope_scaling.logn": BOOL,
    "model.dca.enabled": BOOL,
    "model.dca.chunk_size": SIZE,
    "model.dca.local_size": COUNT,
    "model.num_experts": COUNT,  # 0: dense
    "model.num_experts_per_tok": COUNT,
    "model.moe_intermediate_size": COUNT,
    "model.shared_expert_intermediate_size": COUNT,  # 0: no shared expert
    "model.norm_topk_prob": BOOL,
    "model.router_aux_loss_coef": RATE,
    "model.router_aux_loss_per_layer": BOOL,
    "model.router_z_loss_coef": RATE,
    "model.decoder_sparse_step": SIZE,
    "model.moe_capacity_factor": RATE,  # 0: dropless
    "model.dtype": choice(*DTYPES),
    "model.param_dtype": choice(*DTYPES),
    "model.remat": choice(*REMAT),
    # True: one scanned layer compiles for all; False: each layer in turn (compiles L layers,
    # a faster step on CPU for small models: no stacked residuals to copy; model/transformer.py)
    "model.scan_layers": BOOL,
    # auto: Pallas on GPU/TPU, chunked jnp on CPU; xla needs T² memory (jaxllm/kernels).
    "model.attention_impl": choice(*ATTENTION_IMPLS),
    "model.moe_impl": choice(*MOE_IMPLS),  # grouped matmul: xla is lax.ragged_dot
    "model.init_std": POSITIVE,
    "tokenizer.name": NAME,  # "qwen2" or a path
    "tokenizer.max_rank": COUNT,  # 0: the whole vocabulary
    **{f"mesh.{axis}": integer("[1, inf)", special=(-1, "the rest of the devices"))
       for axis in ("data", "fsdp", "tensor", "expert", "sequence")},
    "stages.*.steps": COUNT,  # 0 skips the stage
    "stages.*.seq_len": SIZE,
    "stages.*.batch_size": SIZE,
    "stages.*.rope_theta": POSITIVE,
    "stages.*.mixture.*": RATE,
    "stages.*.reset_optimizer": BOOL,
    "stages.*.objective": choice(*OBJECTIVES),
    "stages.*.lr.peak": POSITIVE,
    "stages.*.lr.end": RATE,
    "stages.*.lr.warmup_steps": COUNT,
    "stages.*.lr.schedule": choice(*SCHEDULES),
    "stages.*.lr.decay_fraction": number("[0, 1]"),
    "data.sources.*.format": choice(*SOURCE_FORMATS),
    "data.sources.*.path": TEXT,
    "data.sources.*.heldout_fraction": number("[0, 0.5]"),
    "data.sources.*.heldout_path": TEXT,
    "data.sources.*.text_field": TEXT,
    "data.sources.*.prompt_field": TEXT,
    "data.sources.*.chat": BOOL,
    "data.sources.*.pairs": BOOL,
    "data.sources.*.min_tokens": COUNT,  # 0: every document
    "data.sources.*.keep_short": number("[0, 1]"),  # share of documents below min_tokens read
    "data.sources.*.align_long": BOOL,
    "data.eval_batches": COUNT,
    "data.workers": COUNT,
    "data.prefetch": COUNT,
    "optimizer.b1": number("[0, 1)"),
    "optimizer.b2": number("[0, 1)"),
    "optimizer.eps": POSITIVE,
    "optimizer.weight_decay": RATE,
    "optimizer.clip_norm": number("(0, inf)", special=(0, "off")),
    "optimizer.grad_accum": SIZE,
    "loss.z_loss": RATE,
    "loss.chunk_size": COUNT,  # 0: a row's whole logits at once
    "bad_steps.spike_factor": number("(1, inf)", special=(0, "off")),
    "bad_steps.max_in_row": SIZE,
    "checkpoint.every_steps": SIZE,
    "checkpoint.keep": SIZE,
    "checkpoint.async": BOOL,
    "init.checkpoint": TEXT,
    "init.hf": TEXT,
    "init.upcycle_from": TEXT,
    "init.upcycle_reinit": number("[0, 1]"),  # share of each expert's units re-drawn
    "distill.teacher": TEXT,
    "distill.temperature": POSITIVE,
    "distill.alpha": number("[0, 1]"),
    "dpo.beta": POSITIVE,
    "dpo.reference": TEXT,
    "export_hf_every": COUNT,  # 0: off
    "eval_long_every": COUNT,  # 0: off
    "eval_long.num_docs": SIZE,
    "eval_long.bucket_size": COUNT,  # 0: a quarter of the stage's seq_len
    "eval_tasks": TEXT,  # "": off
    "eval_tasks_every": COUNT,  # 0: at each stage's end only
    "eval_tasks_limit": COUNT,  # 0: every example
    "profile.start": COUNT,
    "profile.stop": COUNT,  # 0: no profile
    "compilation_cache_dir": TEXT,  # "auto": ~/.cache/jaxllm/xla; "": off
    "log_every": SIZE,
    "mfu_convention": choice("palm", "causal"),
    "eval_every": SIZE,
    "check_memory": BOOL,
    "seed": integer("[0, 2**63)"),  # jax.random.key takes an int64
}

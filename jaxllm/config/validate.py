"""Validation: `validate(config)` refuses, in one message naming the key, the first value
that cannot work: unknown keys, then each leaf against config/rules.py's VALUE_RULES, then the
checks that involve several keys. A typo fails before anything is compiled.
"""

from __future__ import annotations

import logging

import ml_collections as mc

from jaxllm.config.rules import VALUE_RULES, walk
from jaxllm.config.schema import (
    QWEN2_NUM_RANKS,
    ConfigError,
    base_config,
    data_source,
    model_defaults,
    stage,
    stage_names,
)

# What each named stage and data source is checked against: their keys, not their values.
_STAGE, _SOURCE = stage(1, 1, 1, 1.0, 1.0, 1.0, 0, "cosine"), data_source("text")


def _fail(key: str, message: str):
    raise ConfigError(f"config.{key}: {message}")


def _check_keys(node: mc.ConfigDict, schema: mc.ConfigDict, prefix: str) -> None:
    """Refuses keys the schema lacks, and a value where the schema has a group of keys."""
    for key in node.keys():
        where = prefix + key
        if key not in schema:
            allowed = ", ".join(sorted(schema.keys()))
            _fail(where, f"unknown key; allowed keys here: {allowed}")
        if not isinstance(schema[key], mc.ConfigDict):
            continue
        if not isinstance(node[key], mc.ConfigDict):
            _fail(where, f"must be a group of keys, got {node[key]!r}")
        if where in ("stages", "data.sources"):  # named by the config, each like its template
            template = _STAGE if where == "stages" else _SOURCE
            named = mc.ConfigDict({name: template for name in node[key].keys()})
            _check_keys(node[key], named, f"{where}.")
        elif key != "mixture":  # source name -> weight
            _check_keys(node[key], schema[key], f"{where}.")


def _apply_rules(node: mc.ConfigDict, path: tuple[str, ...], shown: str) -> None:
    """Checks every leaf under `node` (at `path` in the schema, shown as `shown`) by VALUE_RULES."""
    for leaf, value, rule in walk(VALUE_RULES, node, path):
        if rule is None:
            raise LookupError(f"config.{'.'.join(leaf)} has no rule: add one to VALUE_RULES in "
                              "jaxllm/config/rules.py")
        message = rule.error(value)
        if message is not None:
            _fail(".".join((shown, *leaf[len(path):])) if shown else ".".join(leaf), message)


def _check_model(m: mc.ConfigDict, prefix: str) -> None:
    """The model checks that involve more than one key, or a feature not built yet."""
    if m.num_heads % m.num_kv_heads:
        _fail(f"{prefix}.num_heads", f"{m.num_heads} heads are not divisible by "
              f"num_kv_heads={m.num_kv_heads} (grouped-query attention needs N % K == 0)")
    if m.head_dim % 2:
        _fail(f"{prefix}.head_dim", f"{m.head_dim} is odd; rope rotates pairs of dimensions")
    if m.num_experts_per_tok > m.num_experts:
        _fail(f"{prefix}.num_experts_per_tok", f"{m.num_experts_per_tok} exceeds "
              f"num_experts={m.num_experts}")
    if m.num_experts and not (m.num_experts_per_tok and m.moe_intermediate_size):
        _fail(f"{prefix}.num_experts", f"{m.num_experts} experts need num_experts_per_tok >= 1 "
              "and moe_intermediate_size >= 1")
    if m.dca.local_size >= m.dca.chunk_size:
        _fail(f"{prefix}.dca.local_size", f"{m.dca.local_size} must be below "
              f"dca.chunk_size={m.dca.chunk_size}")
    if m.rope_scaling.type == "yarn" and m.rope_scaling.beta_fast <= m.rope_scaling.beta_slow:
        _fail(f"{prefix}.rope_scaling.beta_fast", f"{m.rope_scaling.beta_fast} must exceed "
              f"rope_scaling.beta_slow={m.rope_scaling.beta_slow}")
    if m.dca.enabled and m.rope_scaling.type == "dynamic_ntk":
        _fail(f"{prefix}.rope_scaling.type", "dynamic_ntk reads the positions rope is called "
              "with, which under dual chunk attention are DCA's indices; use yarn or none")
    if m.dca.enabled and m.rope_scaling.logn:
        _fail(f"{prefix}.rope_scaling.logn", "LogN scaling with dual chunk attention is not "
              "supported (rope sees DCA's indices, not the real positions)")
    if (m.family == "qwen2_moe") != (m.num_experts > 0):
        _fail(f"{prefix}.num_experts", f"{m.num_experts} experts with family={m.family!r}: a "
              "qwen2_moe model needs num_experts >= 1, and only qwen2_moe has experts")
    if m.num_experts and m.num_layers % m.decoder_sparse_step:
        _fail(f"{prefix}.decoder_sparse_step", f"{m.decoder_sparse_step} does not divide "
              f"num_layers={m.num_layers} (layers run in groups that end in a sparse layer)")


def validate_model(m: mc.ConfigDict, prefix: str = "model") -> None:
    _check_keys(m, model_defaults(), prefix + ".")
    _apply_rules(m, ("model",), prefix)
    _check_model(m, prefix)


def _check_sources(config: mc.ConfigDict) -> None:
    """config.data: errors for what cannot work; warnings for a source weighted 0 or unused."""
    sources = config.data.sources
    if not sources:
        _fail("data.sources", "needs at least one source")
    for name in sources.keys():
        key, src = f"data.sources.{name}", sources[name]
        fmt = src.get("format", "python_stdlib")  # a source may leave out keys: defaults
        if fmt != "python_stdlib" and not src.get("path"):
            _fail(f"{key}.path", f"a {fmt} source needs a file, directory or glob")
        if fmt in ("jsonl", "parquet") and not src.get("text_field", "text"):
            _fail(f"{key}.text_field", f"a {fmt} source needs the name of its text field")
        if src.get("chat") and src.get("pairs"):
            _fail(f"{key}.pairs", "a source is either chat (conversations) or pairs "
                  "(preference pairs), not both")
        for field in ("prompt_field", "chat", "pairs"):
            if src.get(field) and fmt not in ("jsonl", "parquet"):
                _fail(f"{key}.{field}", f"only jsonl and parquet records have fields, not {fmt}")
        if src.get("keep_short", 0.0) and not src.get("min_tokens", 0):
            _fail(f"{key}.keep_short", "keeps a share of the documents below min_tokens; set "
                  "min_tokens >= 1 too")
    used = set()
    for stage_name in stage_names(config):
        for name, weight in config.stages[stage_name].mixture.items():
            if weight == 0:
                logging.warning("config.stages.%s.mixture.%s: weight 0, the source is not read",
                                stage_name, name)
            elif name in sources:
                used.add(name)
    for name in sorted(set(sources.keys()) - used):
        logging.warning("config.data.sources.%s: no stage's mixture uses it", name)


def _check_stages(config: mc.ConfigDict) -> None:
    names, m, sources = stage_names(config), config.model, config.data.sources
    if not names:
        _fail("stages", "needs at least one stage")
    accum = config.optimizer.grad_accum
    for name in names:
        s, key = config.stages[name], f"stages.{name}"
        if s.seq_len > m.max_position_embeddings:
            _fail(f"{key}.seq_len", f"{s.seq_len} exceeds model.max_position_embeddings="
                  f"{m.max_position_embeddings}")
        if s.batch_size % accum:
            _fail(f"{key}.batch_size", f"{s.batch_size} is not divisible by "
                  f"optimizer.grad_accum={accum}")
        if s.steps and s.lr.warmup_steps > s.steps:
            _fail(f"{key}.lr.warmup_steps", f"{s.lr.warmup_steps} is outside 0..steps={s.steps}")
        for source in s.mixture.keys():
            if source not in sources:
                _fail(f"{key}.mixture.{source}", f"no such source; data.sources has "
                      f"{', '.join(sorted(sources.keys()))}")
        if not any(w > 0 for w in s.mixture.values()):
            _fail(f"{key}.mixture", "needs at least one source with a positive weight")
        used = [n for n, w in s.mixture.items() if w > 0]
        paired = [n for n in used if sources[n].get("pairs")]
        if s.steps and s.objective != "dpo" and paired:
            _fail(f"{key}.mixture", f"source {paired[0]!r} holds preference pairs, which only "
                  f"a dpo stage learns from; this stage's objective is {s.objective}")
        plain = [n for n in used if not sources[n].get("chat")]
        if s.steps and s.objective == "sft" and plain:
            _fail(f"{key}.mixture", f"an sft stage trains on conversations, but source "
                  f"{plain[0]!r} is not a chat source (set data.sources.{plain[0]}.chat=True "
                  "for jsonl / parquet conversations)")
        unpaired = [n for n in used if not sources[n].get("pairs")]
        if s.steps and s.objective == "dpo" and unpaired:
            _fail(f"{key}.mixture", f"a dpo stage learns from preference pairs, but source "
                  f"{unpaired[0]!r} has none (set data.sources.{unpaired[0]}.pairs=True for "
                  "jsonl / parquet records of prompt, chosen and rejected)")
        if s.steps and s.objective == "distill" and not config.distill.teacher:
            _fail(f"{key}.objective", "distill needs a teacher: set config.distill.teacher to "
                  "a run directory, params checkpoint or Hugging Face directory")


def validate(config: mc.ConfigDict) -> None:
    """Raises ConfigError naming the first key whose value cannot work: unknown keys, then each
    leaf against VALUE_RULES, then the checks that involve several keys."""
    _check_keys(config, base_config(), "")
    _apply_rules(config, (), "")
    _check_model(config.model, "model")
    tok, m = config.tokenizer, config.model
    if tok.max_rank and tok.name.lower() == "qwen2":
        if not 256 <= tok.max_rank <= QWEN2_NUM_RANKS:
            _fail("tokenizer.max_rank", f"{tok.max_rank} is outside 256..{QWEN2_NUM_RANKS} "
                  "(the qwen2 ranks), and is not 0 (the whole vocabulary)")
    if tok.max_rank and tok.max_rank + 3 > m.vocab_size:
        _fail("model.vocab_size", f"{m.vocab_size} rows cannot hold tokenizer.max_rank="
              f"{tok.max_rank} ranks plus 3 special tokens")
    if config.profile.stop and config.profile.stop <= config.profile.start:
        _fail("profile.stop", f"{config.profile.stop} must be above profile.start="
              f"{config.profile.start} (the steps traced are [start, stop))")
    if sum(config.mesh[a] == -1 for a in config.mesh.keys()) > 1:
        _fail("mesh", "only one axis may be -1")
    if config.init.checkpoint and config.init.hf:
        _fail("init.hf", f"and init.checkpoint={config.init.checkpoint!r} are both set: a run "
              "starts from one of them")
    for key in ("checkpoint", "hf"):
        if config.init.upcycle_from and config.init[key]:
            _fail("init.upcycle_from", f"and init.{key}={config.init[key]!r} are both set: a "
                  "run starts from one of them")
    if config.init.upcycle_from and not config.model.num_experts:
        _fail("init.upcycle_from", "upcycling builds a mixture of experts: set "
              "model.family=qwen2_moe and model.num_experts >= 1")
    _check_sources(config)
    _check_stages(config)

"""Config schema, loading and validation.

Every config file in jaxllm/configs/ starts from `base_config()` and changes values;
`validate` then checks the whole tree against that schema and the rules of config_rules.py
(type and range of every key), so a typo in a key or a value that cannot work fails with one
message naming the key before anything is compiled.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import logging
import os
from collections.abc import Sequence

import ml_collections as mc

# The allowed values of every key: config_rules.VALUE_RULES; DTYPES is re-exported for convert/.
from jaxllm.config_rules import DTYPES as DTYPES
from jaxllm.config_rules import VALUE_RULES, rule_for, walk

RECIPE_STAGES = ("pretrain", "long_context", "anneal")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def model_defaults() -> mc.ConfigDict:
    return mc.ConfigDict(
        dict(
            family="qwen2",
            vocab_size=151936,
            hidden_size=896,
            num_layers=24,
            num_heads=14,
            num_kv_heads=2,
            head_dim=64,
            intermediate_size=4864,
            qkv_bias=True,
            tie_embeddings=False,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            # yarn / dynamic_ntk (transformers' "dynamic"); logn: Qwen-7B's LogN query scaling
            # past original_max_position_embeddings; attention_factor 0: YaRN's default.
            rope_scaling=dict(type="none", factor=1.0, original_max_position_embeddings=32768,
                              beta_fast=32.0, beta_slow=1.0, attention_factor=0.0,
                              truncate=True, logn=False),
            dca=dict(enabled=False, chunk_size=32768, local_size=1024),
            max_position_embeddings=32768,
            # Mixture of experts (family qwen2_moe); zeros mean dense.
            num_experts=0,
            num_experts_per_tok=0,
            moe_intermediate_size=0,
            shared_expert_intermediate_size=0,
            norm_topk_prob=False,
            router_aux_loss_coef=0.001,
            # False: transformers' load-balancing loss over all sparse layers' tokens pooled;
            # True: each layer's own, averaged (Switch, Megatron), which layers collapsed onto
            # different experts cannot hide
            router_aux_loss_per_layer=False,
            router_z_loss_coef=0.0,
            decoder_sparse_step=1,
            moe_capacity_factor=0.0,  # 0: dropless; else each expert takes ≤ cf·N·K/E copies
            dtype="bfloat16",
            param_dtype="float32",
            remat="full",
            scan_layers=True,  # False: a Python loop over the same stacked layer parameters
            attention_impl="auto",
            moe_impl="auto",  # grouped matmul: auto (pallas), xla (lax.ragged_dot), pallas
            init_std=0.02,
        )
    )


def stage(steps: int, seq_len: int, batch_size: int, rope_theta: float, peak: float, end: float,
          warmup_steps: int, schedule: str, mixture: dict[str, float] | None = None
          ) -> mc.ConfigDict:
    """One training stage: an entry of config.stages (docs/configs.md)."""
    return mc.ConfigDict(
        dict(
            steps=steps,
            seq_len=seq_len,
            batch_size=batch_size,
            rope_theta=float(rope_theta),
            mixture=mixture or {"stdlib": 1.0},
            reset_optimizer=False,  # True: fresh Adam moments at this stage's first step
            lr=dict(peak=peak, end=end, warmup_steps=warmup_steps, schedule=schedule,
                    decay_fraction=0.2),
        )
    )


def data_source(format: str, path: str = "", *, heldout_fraction: float = 0.02,
                heldout_path: str = "", text_field: str = "text", prompt_field: str = "",
                min_tokens: int = 0, keep_short: float = 0.0, align_long: bool = False
                ) -> mc.ConfigDict:
    """One entry of config.data.sources (jaxllm/data/formats.py describes the formats).

    `path`: a file, directory or glob. Held out: `heldout_path` when set, else every
    1/heldout_fraction-th record. jsonl and parquet: the document is `text_field`; with
    `prompt_field`, the prompt comes first and is not trained on (supervised fine-tuning).
    Long documents (jaxllm/data/mixture.py): with `min_tokens` > 0 only documents of at least
    that many tokens are read, and a `keep_short` share of the others; with `align_long`, a
    long document that does not fit in the rest of a row starts the next row.
    """
    return mc.ConfigDict(dict(format=format, path=path, heldout_fraction=heldout_fraction,
                              heldout_path=heldout_path, text_field=text_field,
                              prompt_field=prompt_field, min_tokens=min_tokens,
                              keep_short=float(keep_short), align_long=align_long))


def base_config() -> mc.ConfigDict:
    """The schema: every key any config may set, with its default; the values each key may
    take are in jaxllm/config_rules.py VALUE_RULES (a test checks that every key has one)."""
    c = mc.ConfigDict()
    c.model = model_defaults()
    c.tokenizer = mc.ConfigDict(dict(name="qwen2", max_rank=0))  # max_rank 0: the whole vocab
    c.mesh = mc.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1, sequence=1))
    c.stages = mc.ConfigDict()
    for name in RECIPE_STAGES:
        c.stages[name] = stage(0, 4096, 256, 1e6, 3e-4, 3e-5, 0, "cosine")
    # data.workers: processes that read and tokenize documents (0: threads in this process);
    # data.prefetch: batches whose documents are loaded ahead, in the background.
    c.data = mc.ConfigDict(
        dict(sources={"stdlib": data_source("python_stdlib")}, eval_batches=2, workers=0,
             prefetch=2)
    )
    c.optimizer = mc.ConfigDict(
        dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, grad_accum=1)
    )
    # chunk_size: tokens of a row whose logits exist at once (jaxllm/train/loss.py); 0: all
    c.loss = mc.ConfigDict(dict(z_loss=0.0, chunk_size=1024))
    # A step whose loss or gradient is not finite, or whose loss exceeds spike_factor × its
    # running average (0: no spike check), is skipped; after max_in_row skipped steps in a row
    # the run restores the last checkpoint and skips the batches that caused them.
    c.bad_steps = mc.ConfigDict(dict(spike_factor=0.0, max_in_row=3))
    c.checkpoint = mc.ConfigDict(dict(every_steps=1000, keep=3, **{"async": True}))
    # upcycle_from: a dense params checkpoint or HF dir made into this MoE (jaxllm/upcycle.py);
    # upcycle_reinit: the share of each expert's units re-drawn from the init (Qwen2: 0.5).
    c.init = mc.ConfigDict(dict(checkpoint="", hf="", upcycle_from="", upcycle_reinit=0.5))
    c.export_hf_every = 0  # >0: also write <workdir>/hf/<step>/ every this many steps
    # >0: in the long_context stage, every this many steps, perplexity by position bucket
    # (jaxllm/eval/long_ppl.py) over eval_long.num_docs held-out documents of seq_len tokens,
    # in buckets of eval_long.bucket_size positions (0: a quarter of seq_len).
    c.eval_long_every = 0
    c.eval_long = mc.ConfigDict(dict(num_docs=2, bucket_size=0))
    # lm-eval tasks (names or task YAML paths, comma-separated; "": off) on the live params
    # (jaxllm/eval/harness.py) every eval_tasks_every steps (0: only at each stage's end) and
    # at each stage's end, eval_tasks_limit examples a task (0: all).
    c.eval_tasks = ""
    c.eval_tasks_every = 0
    c.eval_tasks_limit = 0
    # Trace global steps [start, stop) into <workdir>/profile (stop 0: off); XLA's compiled
    # programs kept between runs ("auto": ~/.cache/jaxllm/xla; "": off). jaxllm/profiling.py.
    c.profile = mc.ConfigDict(dict(start=0, stop=0))
    c.compilation_cache_dir = "auto"
    c.log_every = 10
    # How mfu counts attention FLOPs: "palm" (every query against every key, as MaxText and
    # the PaLM paper) or "causal" (half of it, as Megatron); the peak is the chips' rated one.
    c.mfu_convention = "palm"
    c.eval_every = 500
    c.seed = 0
    return c


# What each named stage and data source is checked against: their keys, not their values.
_STAGE, _SOURCE = stage(1, 1, 1, 1.0, 1.0, 1.0, 0, "cosine"), data_source("text")


def stage_names(config: mc.ConfigDict) -> list[str]:
    """Stage names in the order they were written (ConfigDict.keys() sorts them)."""
    return list(json.loads(config.stages.to_json_best_effort()))


# ----------------------------------------------------------------------------- loading

def _import_config_file(path: str):
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"jaxllm_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    return module


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as model.family=llama


def apply_override(config: mc.ConfigDict, override: str) -> None:
    """Applies one "a.b.c=value" override, refusing keys that do not exist."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, text = override.split("=", 1)
    *parents, leaf = parts = key.strip().split(".")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, mc.ConfigDict) or part not in node:
            known = list(node) if isinstance(node, mc.ConfigDict) else []
            close = difflib.get_close_matches(part, known, n=1)
            hint = f"; did you mean {'.'.join(parts[:i] + close)!r}?" if close else ""
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r}{hint}")
        if i < len(parents):
            node = node[part]
    value = _parse_value(text)
    old = node[leaf]
    if isinstance(old, bool) and text.strip().lower() in ("true", "false"):
        value = text.strip().lower() == "true"  # as absl's --config.KEY=true
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
        node[leaf] = value
    except TypeError:  # ConfigDict keeps a key's type: 1.5 for an int key, text for a number
        rule = rule_for(VALUE_RULES, tuple(key.strip().split(".")))
        _fail(key.strip(), (rule and rule.error(value)) or f"{value!r} is a "
              f"{type(value).__name__}; it must be a {type(old).__name__}")


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")  # shipped


def config_path(path: str) -> str:
    """A config file as given; `configs/NAME.py` that is not there is the shipped one
    (jaxllm/configs/NAME.py), so the documented paths work from any directory."""
    parts = os.path.normpath(path).split(os.sep)
    shipped = os.path.join(CONFIGS_DIR, *parts[1:])
    if not os.path.exists(path) and len(parts) > 1 and parts[0] == "configs" and \
            os.path.exists(shipped):
        return shipped
    return path


def load_config(path: str, overrides: Sequence[str] = ()) -> mc.ConfigDict:
    """The same ConfigDict the CLI builds: `path` (see `config_path`) may end in `:ARG` for a
    variant."""
    arg = None
    if ":" in path and not os.path.exists(config_path(path)):
        path, arg = path.split(":", 1)
    path = config_path(path)
    module = _import_config_file(path)
    try:
        config = module.get_config(arg) if arg is not None else module.get_config()
    except ValueError as e:  # the config file's own refusal, e.g. an unknown variant
        raise ConfigError(f"--config={path}{'' if arg is None else ':' + arg}: {e}") from None
    for override in overrides:
        apply_override(config, override)
    validate(config)
    return config


# ----------------------------------------------------------------------------- validation

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
                              "jaxllm/config_rules.py")
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
        if src.get("prompt_field") and fmt not in ("jsonl", "parquet"):
            _fail(f"{key}.prompt_field", f"only jsonl and parquet records have fields, not {fmt}")
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


def validate(config: mc.ConfigDict) -> None:
    """Raises ConfigError naming the first key whose value cannot work: unknown keys, then each
    leaf against VALUE_RULES, then the checks that involve several keys."""
    _check_keys(config, base_config(), "")
    _apply_rules(config, (), "")
    _check_model(config.model, "model")
    tok, m = config.tokenizer, config.model
    if tok.max_rank and tok.name.lower() == "qwen2":
        from jaxllm.tokenizer import QWEN2_NUM_RANKS

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

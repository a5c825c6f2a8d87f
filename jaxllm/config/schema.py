"""The config schema: every key with its default (`base_config`), a stage, a data source.

Every config file in jaxllm/configs/ starts from `base_config()` and changes values;
config/validate.py checks a config against this schema and the value rules of
config/rules.py; config/load.py loads a config file with its overrides.
"""

from __future__ import annotations

import json

import ml_collections as mc

RECIPE_STAGES = ("pretrain", "long_context", "anneal")
QWEN2_NUM_RANKS = 151_643  # BPE ranks of the Qwen2 tokenizer; its specials come after them


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
            # lm: next-token loss; distill: config.distill.teacher's distribution; sft: the
            # next-token loss on chat sources' assistant turns; dpo: preference pairs against
            # config.dpo.reference
            objective="lm",
            lr=dict(peak=peak, end=end, warmup_steps=warmup_steps, schedule=schedule,
                    decay_fraction=0.2),
        )
    )


def data_source(format: str, path: str = "", *, heldout_fraction: float = 0.02,
                heldout_path: str = "", text_field: str = "text", prompt_field: str = "",
                chat: bool = False, pairs: bool = False, min_tokens: int = 0,
                keep_short: float = 0.0, align_long: bool = False) -> mc.ConfigDict:
    """One entry of config.data.sources (jaxllm/data/formats.py describes the formats).

    `path`: a file, directory or glob. Held out: `heldout_path` when set, else every
    1/heldout_fraction-th record. jsonl and parquet: the document is `text_field`; with
    `prompt_field`, the prompt comes first and is not trained on. With `chat`, a record is a
    conversation instead, `messages` ([{"role", "content"}, ...]) or `prompt` and `response`,
    rendered with Qwen2's ChatML template and trained on its assistant turns only
    (jaxllm/data/chat.py; what an `sft` stage reads). With `pairs`, a record is a preference
    pair, `prompt`, `chosen` and `rejected` (what a `dpo` stage reads).
    Long documents (jaxllm/data/mixture.py): with `min_tokens` > 0 only documents of at least
    that many tokens are read, and a `keep_short` share of the others; with `align_long`, a
    long document that does not fit in the rest of a row starts the next row.
    """
    return mc.ConfigDict(dict(format=format, path=path, heldout_fraction=heldout_fraction,
                              heldout_path=heldout_path, text_field=text_field,
                              prompt_field=prompt_field, chat=chat, pairs=pairs,
                              min_tokens=min_tokens,
                              keep_short=float(keep_short), align_long=align_long))


def base_config() -> mc.ConfigDict:
    """The schema: every key any config may set, with its default; the values each key may
    take are in jaxllm/config/rules.py VALUE_RULES (a test checks that every key has one)."""
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
    # upcycle_from: a dense params checkpoint or HF dir made into this MoE (convert/upcycle.py);
    # upcycle_reinit: the share of each expert's units re-drawn from the init (Qwen2: 0.5).
    c.init = mc.ConfigDict(dict(checkpoint="", hf="", upcycle_from="", upcycle_reinit=0.5))
    # The teacher of `distill` stages (a run directory, params checkpoint or HF directory
    # sharing the tokenizer), the softmax temperature, and the KL's weight alpha in
    # (1 − alpha)·cross entropy + alpha·τ²·KL (jaxllm/train/loss.py); 1: distillation only.
    c.distill = mc.ConfigDict(dict(teacher="", temperature=1.0, alpha=1.0))
    # reference "": a dpo stage's own starting weights (kept in <workdir>/references/<stage>)
    c.dpo = mc.ConfigDict(dict(beta=0.1, reference=""))
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
    # programs kept between runs ("auto": ~/.cache/jaxllm/xla; "": off). jaxllm/train/profiling.py.
    c.profile = mc.ConfigDict(dict(start=0, stop=0))
    c.compilation_cache_dir = "auto"
    c.log_every = 10
    # How mfu counts attention FLOPs: "palm" (every query against every key, as MaxText and
    # the PaLM paper) or "causal" (half of it, as Megatron); the peak is the chips' rated one.
    c.mfu_convention = "palm"
    c.eval_every = 500
    # jaxllm.main refuses, before allocating anything, a stage that `plan` estimates at over
    # twice the memory each device has (python -m jaxllm.plan, jaxllm.compile for the details).
    c.check_memory = True
    c.seed = 0
    return c


def stage_names(config: mc.ConfigDict) -> list[str]:
    """Stage names in the order they were written (ConfigDict.keys() sorts them)."""
    return list(json.loads(config.stages.to_json_best_effort()))

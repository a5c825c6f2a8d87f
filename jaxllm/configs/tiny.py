"""The embedded default: a ~5M-parameter Qwen2 that trains on 2 CPU cores in minutes.

Vocabulary: the real Qwen2 BPE truncated to its first 8,192 ranks (+3 specials); data: the
Python standard library's own sources (no download). All three recipe stages run, short:
pretrain at 128 tokens with rope base 1e4, long_context at 512 with base 1e6, then anneal.

Variants: `configs/tiny.py:smoke` is a still smaller model and a few steps, for tests;
`configs/tiny.py:chat` adds two stages, chat SFT on the conversations that ship with jaxllm and
DPO on the preference pairs (jaxllm/data/examples, written by examples/chat_data.py);
`configs/tiny.py:bench` is the 18.9M-parameter model of docs/speed.md's CPU speed comparison
(benchmarks/train_step.py), pretraining 40 steps of 8 × 512 tokens, the other stages off.
"""

import importlib.resources

from jaxllm.config import base_config, data_source, stage

EXAMPLES = importlib.resources.files("jaxllm.data") / "examples"


def get_config(arg=None):
    c = base_config()
    c.model.update(family="qwen2", vocab_size=8256, hidden_size=256, num_layers=4,
                   num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=768,
                   qkv_bias=True, tie_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6,
                   max_position_embeddings=4096, dtype="float32", param_dtype="float32",
                   remat="none")
    c.tokenizer.max_rank = 8192
    c.stages.pretrain = stage(120, 128, 32, 1e4, 3e-3, 3e-4, 10, "cosine")
    c.stages.long_context = stage(20, 512, 8, 1e6, 3e-4, 3e-4, 0, "constant")
    c.stages.anneal = stage(20, 512, 8, 1e6, 3e-4, 3e-5, 0, "linear")
    c.log_every = 10
    c.eval_every = 40
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 2
    if arg == "smoke":
        c.model.update(vocab_size=1280, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, intermediate_size=128)
        c.tokenizer.max_rank = 1024
        c.stages.pretrain.update(steps=6, seq_len=32, batch_size=4)
        c.stages.pretrain.lr.warmup_steps = 2
        c.stages.long_context.update(steps=2, seq_len=64, batch_size=2)
        c.stages.anneal.update(steps=2, seq_len=64, batch_size=2)
        c.log_every = 2
        c.eval_every = 4
        c.data.eval_batches = 1
    elif arg == "chat":
        add_chat_stages(c, sft=(60, 512, 8, 1e6, 1e-4, 1e-5, 5, "cosine"),
                        dpo=(40, 512, 8, 1e6, 5e-5, 5e-6, 5, "cosine"))
    elif arg == "bench":
        c.model.update(vocab_size=16384, hidden_size=384, num_layers=8, num_heads=6,
                       num_kv_heads=2, head_dim=64, intermediate_size=1024,
                       scan_layers=False)  # a faster step on CPU; compiles 8 layers
        c.tokenizer.max_rank = 16381  # + 3 special tokens = 16,384
        c.stages.pretrain.update(steps=40, seq_len=512, batch_size=8)
        c.stages.long_context.steps = c.stages.anneal.steps = 0
    elif arg is not None:
        raise ValueError(f"configs/tiny.py: unknown variant {arg!r}; known: smoke, chat, bench")
    return c


def add_chat_stages(c, sft: tuple, dpo: tuple) -> None:
    """After the recipe's stages: an sft stage on the shipped conversations, then a dpo stage
    on the shipped preference pairs, each made by `stage(*args)`."""
    c.data.sources.chat = data_source("jsonl", str(EXAMPLES / "chat.jsonl"), chat=True,
                                      heldout_fraction=0.05)
    c.data.sources.pairs = data_source("jsonl", str(EXAMPLES / "preferences.jsonl"),
                                       pairs=True, heldout_fraction=0.1)
    c.stages.sft = stage(*sft, mixture={"chat": 1.0})
    c.stages.sft.objective = "sft"
    c.stages.dpo = stage(*dpo, mixture={"pairs": 1.0})
    c.stages.dpo.objective = "dpo"

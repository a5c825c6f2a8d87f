"""Train-step throughput: jaxllm vs Hugging Face transformers on torch, same model and batch.

    python benchmarks/train_step.py [--config=configs/tiny.py] [--batch=8] [--seq_len=256]

Both sides run the config's model (float32 on CPU, the dtype of the config elsewhere) with
AdamW on the same random tokens: forward, backward and the optimizer update per step. Prints
a table of step time and tokens per second; the first `--warmup` steps (compilation) are not
timed.
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_seconds


def jaxllm_step(config, tokens: np.ndarray):
    from jaxllm.model import frozen, init_params
    from jaxllm.optim import make_optimizer, make_schedule
    from jaxllm.train.step import TrainState, make_train_step

    stage = config.stages.pretrain
    tx = make_optimizer(config.optimizer)
    params = init_params(config.model, jax.random.key(0))
    state = TrainState.create(params, tx.init(params))
    train_step = jax.jit(make_train_step(frozen(config.model), tx, make_schedule(stage.lr, 1000),
                                         0, 1, 0.0), donate_argnums=0)
    B, T = tokens.shape
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "positions": jnp.broadcast_to(jnp.arange(T - 1), (B, T - 1)),
             "segment_ids": jnp.ones((B, T - 1), jnp.int32),
             "loss_mask": jnp.ones((B, T - 1), jnp.float32)}
    holder = [state]

    def step():
        holder[0], metrics = train_step(holder[0], batch)
        jax.block_until_ready(metrics["loss"])

    return step


def torch_step(config, tokens: np.ndarray):
    import torch
    import transformers

    m = config.model
    hf_config = transformers.Qwen2Config(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        head_dim=m.head_dim, intermediate_size=m.intermediate_size,
        tie_word_embeddings=m.tie_embeddings, rms_norm_eps=m.rms_norm_eps,
        rope_theta=m.rope_theta, max_position_embeddings=m.max_position_embeddings)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(hf_config).train()
    o = config.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(o.b1, o.b2), eps=o.eps,
                            weight_decay=o.weight_decay)
    ids = torch.from_numpy(tokens.astype(np.int64))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import jaxllm

    config = jaxllm.load_config(args.config)
    on_cpu = jax.devices()[0].platform == "cpu"
    if on_cpu:
        config.model.dtype = "float32"
    tokens = np.random.default_rng(0).integers(
        0, config.model.vocab_size, (args.batch, args.seq_len + 1)).astype(np.int32)
    tokens_per_step = args.batch * args.seq_len
    rows = []
    for name, make in (("jaxllm (jax.jit)", jaxllm_step), ("transformers (torch eager)",
                                                           torch_step)):
        median = median_seconds(make(config, tokens), warmup=args.warmup, iters=args.steps)
        rows.append((name, median * 1e3, tokens_per_step / median))
    device, m = jax.devices()[0], config.model
    print(f"\nmodel {args.config} ({m.num_layers} layers, D {m.hidden_size}), "
          f"batch {args.batch} x {args.seq_len} tokens, {config.model.dtype}, "
          f"{device.platform} {device.device_kind} / {platform.processor() or platform.machine()} "
          f"x {os.cpu_count()} cores, jax {jax.__version__}")
    print(f"| {'implementation':<28} | {'step ms (median)':>16} | {'tokens/s':>10} |")
    print(f"|{'-' * 30}|{'-' * 18}|{'-' * 12}|")
    for name, ms, tps in rows:
        print(f"| {name:<28} | {ms:>16.1f} | {tps:>10.0f} |")


if __name__ == "__main__":
    main()

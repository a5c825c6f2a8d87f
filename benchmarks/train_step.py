"""Train-step throughput: jaxllm vs Hugging Face transformers on torch, same model and batch.

    python benchmarks/train_step.py [--config=configs/tiny.py] [--batch=8] [--seq_len=256]
                                    [--attention_impl=auto] [--warmup=2] [--steps=10]

Qwen2-0.5B on one H100 / H200:
    python benchmarks/train_step.py --config=configs/qwen2_0_5b.py --batch=4 --seq_len=2048

Both sides train the config's model with AdamW on the same random tokens: forward, backward,
gradient clipping and the optimizer update per step. On CPU both run in float32. On a GPU
both keep float32 weights and optimizer state and compute in the config's dtype (bfloat16):
jaxllm as configured (remat, attention_impl; `auto` is the Pallas kernel there), torch under
`torch.autocast` with SDPA attention, fused AdamW and no activation checkpointing
(transformers' default). The table gives the median step time after `--warmup` untimed steps
(the first compiles), tokens per second, the peak device memory of each side where the
backend reports it (JAX's `peak_bytes_in_use`, torch's `max_memory_allocated`; not on CPU)
and what each side ran. jaxllm runs first, and JAX keeps the memory it freed in its pool, so
torch gets what is left (`jaxllm.plan` puts jaxllm's 0.5B step at 4 × 2048 near 19 GB).

A side that fails gets a row saying why, the reasons follow the table, and the exit status
is 1. If jaxllm fails with an attention_impl other than `xla`, it runs again with `xla`, so
that the comparison still has a jaxllm row.
"""

from __future__ import annotations

import os

# Set before JAX starts: it would otherwise take 75% of the GPU's memory for its pool, and
# torch, in the same process, could not hold a 0.5B model's training state in the rest.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from timing import Failures, is_number, median_seconds  # noqa: E402

GiB = 2**30


def jaxllm_step(config, tokens: np.ndarray):
    """(step function, peak device bytes so far or None)."""
    from jaxllm.model import frozen, init_params
    from jaxllm.optim import make_optimizer, make_schedule
    from jaxllm.train.step import TrainState, make_train_step

    m, stage = config.model, config.stages.pretrain
    tx = make_optimizer(config.optimizer)
    params = init_params(m, jax.random.key(0))
    state = TrainState.create(params, tx.init(params))
    del params
    train_step = jax.jit(make_train_step(frozen(m), tx, make_schedule(stage.lr, 1000),
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

    def peak_bytes():
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")

    return step, peak_bytes


def describe_jaxllm(config) -> str:
    from jaxllm.kernels import resolve_attention_impl

    m = config.model
    return (f"{m.dtype} compute, {m.param_dtype} weights+AdamW, remat {m.remat}, attention "
            f"{resolve_attention_impl(m.attention_impl)}, jit")


def torch_step(config, tokens: np.ndarray):
    """(step function, peak device bytes so far or None)."""
    import torch
    import transformers

    m = config.model
    cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(m.dtype)
    hf_config = transformers.Qwen2Config(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        head_dim=m.head_dim, intermediate_size=m.intermediate_size,
        tie_word_embeddings=m.tie_embeddings, rms_norm_eps=m.rms_norm_eps,
        rope_theta=m.rope_theta, max_position_embeddings=m.max_position_embeddings)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:  # built on the device: a 0.5B model initialised on the host takes seconds
        model = transformers.Qwen2ForCausalLM(hf_config).train()
    o = config.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(o.b1, o.b2), eps=o.eps,
                            weight_decay=o.weight_decay, fused=cuda)
    ids = torch.from_numpy(tokens.astype(np.int64)).to(device)
    use_autocast = cuda and autocast_dtype is not None

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
            loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return step, (torch.cuda.max_memory_allocated if cuda else lambda: None)


def describe_torch(config) -> str:
    import torch

    cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
    autocast = cuda and config.model.dtype in ("bfloat16", "float16")
    precision = f"{config.model.dtype} autocast, float32" if autocast else "float32"
    return (f"{precision} weights+AdamW{' (fused)' if cuda else ''}, no remat, attention sdpa, "
            f"eager, torch {torch.__version__.split('+')[0]}")


def safely(describe, config) -> str:
    try:
        return describe(config)
    except Exception:  # noqa: BLE001  the row's own run will say what is wrong
        return "-"


def measure(name: str, make, describe, config, tokens: np.ndarray, args,
            failures: Failures) -> tuple:
    """One table row: (name, step ms, tokens/s, peak GiB, what ran); a failure fills the
    cells with its reason."""
    ran = safely(describe, config)
    try:
        step, peak_bytes = make(config, tokens)
        seconds = median_seconds(step, warmup=args.warmup, iters=args.steps)
        peak = peak_bytes()
        row = (name, f"{seconds * 1e3:.1f}", f"{args.batch * args.seq_len / seconds:.0f}",
               "-" if peak is None else f"{peak / GiB:.1f}", ran)
    except Exception as e:  # noqa: BLE001  out of memory, kernel refused: say so, go on
        reason = failures.cell(name, e)
        row = (name, reason, "-", "-", ran)
    gc.collect()  # the step's closure holds the train state: free it for the next side
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--attention_impl", default=None,
                        help="jaxllm's model.attention_impl (default: the config's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import jaxllm

    config = jaxllm.load_config(args.config)
    device = jax.devices()[0]
    if device.platform == "cpu":
        config.model.dtype = "float32"
    if args.attention_impl:
        config.model.attention_impl = args.attention_impl
    tokens = np.random.default_rng(0).integers(
        0, config.model.vocab_size, (args.batch, args.seq_len + 1)).astype(np.int32)
    m = config.model
    print(f"\nmodel {args.config} ({m.num_layers} layers, D {m.hidden_size}, V {m.vocab_size}), "
          f"batch {args.batch} x {args.seq_len} tokens, AdamW, {device.platform} "
          f"{device.device_kind} / {platform.processor() or platform.machine()} x "
          f"{os.cpu_count()} cores, jax {jax.__version__}; median of {args.steps} steps")
    # Rows print as they come, so a run stopped by a time limit keeps the ones it finished.
    w = max(len("what ran"), *(len(safely(d, config)) for d in (describe_jaxllm, describe_torch)))
    print(f"| {'implementation':<22} | {'step ms':>15} | {'tokens/s':>9} | {'peak GiB':>8} | "
          f"{'what ran':<{w}} |")
    print(f"|{'-' * 24}|{'-' * 17}|{'-' * 11}|{'-' * 10}|{'-' * (w + 2)}|", flush=True)
    failures = Failures()

    def row(name, make, describe) -> bool:
        name, ms, tps, peak, ran = measure(name, make, describe, config, tokens, args, failures)
        print(f"| {name:<22} | {ms:>15} | {tps:>9} | {peak:>8} | {ran:<{w}} |", flush=True)
        return is_number(ms)

    if not row("jaxllm (jax.jit)", jaxllm_step, describe_jaxllm) and m.attention_impl != "xla":
        m.attention_impl = "xla"
        row("jaxllm (jax.jit)", jaxllm_step, describe_jaxllm)
    row("transformers (torch)", torch_step, describe_torch)
    failures.print()
    sys.exit(1 if failures.items else 0)


if __name__ == "__main__":
    main()

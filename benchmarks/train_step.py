"""Train-step speed and memory: jaxllm vs Hugging Face transformers on torch, eager and under
torch.compile, same model, batch and AdamW, in one run.

    python -m benchmarks.train_step [--config=configs/tiny.py[:VARIANT]] [--config.KEY=VALUE ...]
        [--batch=8] [--seq_len=256] [--warmup=2] [--steps=10] [--peers=eager,compile]

The CPU comparison of docs/speed.md (an 18.9M-parameter Qwen2, float32):
    python -m benchmarks.train_step --config=configs/tiny.py:bench --batch=8 --seq_len=512
Qwen2-0.5B on one H100 / H200:
    python -m benchmarks.train_step --config=configs/qwen2_0_5b.py --batch=4 --seq_len=2048

Every side trains the config's model with AdamW on the same random tokens: forward, backward,
gradient clipping and the optimizer update per step. On CPU all run in float32. On a GPU all
keep float32 weights and optimizer state and compute in the config's dtype (bfloat16): jaxllm
as configured (remat, attention_impl), torch under `torch.autocast` with SDPA attention, fused
AdamW and no activation checkpointing (transformers' default); `compile` is the same torch
step under `torch.compile` (inductor, default mode).

Each side runs in a process of its own (this script with `--side`), one after the other, so
that its peak memory is its own and no side's threads or memory pool slow another: on CPU the
process's peak resident memory (runtime and libraries included), on a GPU the device's peak
bytes in use. The table gives the median step time after `--warmup` untimed steps (the first
compiles), tokens per second, MFU (the model's training FLOPs per token, jaxllm.train.metrics'
count, times tokens per second, over the chip's rated peak, jaxllm.train.metrics.RATED_PEAKS; on a
CPU, which has none, over a large matmul measured in this run, the faster of jax's and
torch's), peak memory, and tokens per second over the best peer's.

Each side's figures print as it finishes (a run stopped by a time limit keeps them), then
the table. A side that fails gets a row saying why (`OOM` or the exception's type), the
reasons follow the table, and the exit status is 1. If jaxllm fails with an attention_impl
other than `xla`, it runs again with `xla`.
"""

from __future__ import annotations

import os

# Set before JAX starts: it would otherwise take 75% of the GPU's memory for its pool.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.timing import is_out_of_memory, median_seconds  # noqa: E402

GiB = 2**30
SIDES = {"jaxllm": "jaxllm (jax.jit)", "eager": "transformers (torch eager)",
         "compile": "transformers (torch.compile)"}
RESULT = "RESULT "  # a side's process prints its measurements on one line after this


def gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def jaxllm_step(config, tokens: np.ndarray):
    """(step function that waits for its result, peak device bytes or None)."""
    import jax
    import jax.numpy as jnp

    from jaxllm.model import frozen, init_params
    from jaxllm.train.optim import make_optimizer, make_schedule
    from jaxllm.train.step import TrainState, make_train_step

    m, stage = config.model, config.stages.pretrain
    tx = make_optimizer(config.optimizer)
    params = init_params(m, jax.random.key(0))
    state = TrainState.create(params, tx.init(params))
    del params
    train_step = jax.jit(make_train_step(frozen(m), tx, make_schedule(stage.lr, 1000), 0, 1,
                                         config.loss.z_loss, loss_chunk=config.loss.chunk_size),
                         donate_argnums=0)
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
        return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")

    return step, peak_bytes


def describe_jaxllm(config) -> str:
    import jax

    from jaxllm.kernels import resolve_attention_impl

    m = config.model
    return (f"{m.dtype} compute, {m.param_dtype} weights+AdamW, remat {m.remat}, attention "
            f"{resolve_attention_impl(m.attention_impl)}, jit, jax {jax.__version__}")


def torch_step(config, tokens: np.ndarray, compiled: bool):
    """(step function, peak device bytes or None) of transformers' Qwen2 on torch."""
    import torch
    import transformers

    m = config.model
    cuda = gpu() and torch.cuda.is_available()
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
    forward = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
            loss = forward(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return step, (torch.cuda.max_memory_allocated if cuda else lambda: None)


def describe_torch(config, compiled: bool) -> str:
    import torch

    cuda = gpu() and torch.cuda.is_available()
    autocast = cuda and config.model.dtype in ("bfloat16", "float16")
    precision = f"{config.model.dtype} autocast, float32" if autocast else "float32"
    return (f"{precision} weights+AdamW{' (fused)' if cuda else ''}, no remat, attention sdpa, "
            f"{'torch.compile' if compiled else 'eager'}, torch {torch.__version__.split('+')[0]}")


def matmul_peak(side: str, dtype: str, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a size² matmul in `dtype` by jax or torch, on the device the side uses."""
    if side == "jaxllm":
        import jax
        import jax.numpy as jnp

        a = jnp.ones((size, size), dtype)
        f = jax.jit(lambda x: x @ x)
        run = lambda: f(a).block_until_ready()  # noqa: E731
    else:
        import torch

        device = "cuda" if gpu() and torch.cuda.is_available() else "cpu"
        a = torch.ones((size, size), dtype=getattr(torch, dtype), device=device)
        sync = torch.cuda.synchronize if device == "cuda" else lambda: None

        def run():
            a @ a
            sync()
    return 2.0 * size**3 / median_seconds(run, warmup=1, iters=repeats)


def run_side(args, config) -> dict:
    """Measures one side in this process; the parent reads the returned dict."""
    tokens = np.random.default_rng(0).integers(
        0, config.model.vocab_size, (args.batch, args.seq_len + 1)).astype(np.int32)
    if args.side == "jaxllm":
        describe = describe_jaxllm
        make = jaxllm_step
    else:
        compiled = args.side == "compile"
        describe = lambda c: describe_torch(c, compiled)  # noqa: E731
        make = lambda c, t: torch_step(c, t, compiled)  # noqa: E731
    result = {"ran": describe(config)}
    step, peak_bytes = make(config, tokens)
    seconds = median_seconds(step, warmup=args.warmup, iters=args.steps)
    peak = peak_bytes()
    if peak is None:  # CPU: the process's peak resident memory (Linux reports KiB)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result.update(seconds=seconds, peak_bytes=peak,
                  matmul_flops=matmul_peak(args.side, config.model.dtype))
    return result


def side_in_subprocess(side: str, argv: list[str]) -> dict:
    """Runs `--side=side` in a fresh process; a failure returns {"error": ...}."""
    cmd = [sys.executable, "-m", "benchmarks.train_step", *argv, f"--side={side}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    lines = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()
    error = next((ln for ln in reversed(lines) if ln.strip() and not ln.startswith(" ")),
                 lines[-1])
    cell = "OOM" if is_out_of_memory(proc.stderr) else error.split(":", 1)[0][:40]
    return {"error": error[:300], "cell": cell, "trace": proc.stderr[-4000:]}


def load(args, overrides: list[str]):
    import jaxllm

    config = jaxllm.load_config(args.config, overrides)
    if not gpu():
        config.model.dtype = "float32"
    if args.attention_impl:
        config.model.attention_impl = args.attention_impl
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--attention_impl", default=None,
                        help="jaxllm's model.attention_impl (default: the config's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peers", default="eager,compile",
                        help="transformers variants to run: eager, compile (comma-separated)")
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    overrides = [a.removeprefix("--config.") for a in rest if a.startswith("--config.")]
    if unknown := [a for a in rest if not a.startswith("--config.")]:
        parser.error(f"unrecognized arguments: {unknown}")
    config = load(args, overrides)
    if args.side:
        print(RESULT + json.dumps(run_side(args, config)), flush=True)
        return

    import jax

    from jaxllm.train.metrics import RATED_PEAKS, chip_of, flops_per_token, rated_peak

    peers = [p for p in args.peers.split(",") if p]
    if unknown := set(peers) - {"eager", "compile"}:
        parser.error(f"--peers: unknown {sorted(unknown)}; known: eager, compile")
    argv = [a for a in sys.argv[1:] if not a.startswith("--side")]
    m, device = config.model, jax.devices()[0]
    tokens_per_step = args.batch * args.seq_len
    flops = flops_per_token(m, args.seq_len) * tokens_per_step
    print(f"\nmodel {args.config} {' '.join(overrides)} ({m.num_layers} layers, D "
          f"{m.hidden_size}, V {m.vocab_size}), batch {args.batch} x {args.seq_len} tokens, "
          f"AdamW, {device.platform} {device.device_kind} / "
          f"{platform.processor() or platform.machine()} x {os.cpu_count()} cores; median of "
          f"{args.steps} steps after {args.warmup}; each side in its own process", flush=True)
    results = {}
    for side in ["jaxllm", *peers]:
        results[side] = side_in_subprocess(side, argv)
        if side == "jaxllm" and "error" in results[side] and m.attention_impl != "xla":
            print(f"jaxllm failed ({results[side]['error']}); again with attention_impl=xla")
            results[side] = side_in_subprocess(side, [*argv, "--attention_impl=xla"])
        r = results[side]  # a line now, so that a run stopped by a time limit keeps it
        print(f"{SIDES[side]}: " + (f"failed ({r['cell']})" if "error" in r else
                                    f"{r['seconds'] * 1e3:.1f} ms/step, "
                                    f"{tokens_per_step / r['seconds']:.0f} tokens/s, peak "
                                    f"{r['peak_bytes'] / GiB:.2f} GiB"), flush=True)
    done = [r for r in results.values() if "error" not in r]
    measured = max((r["matmul_flops"] for r in done), default=0.0)
    chip = chip_of(device.device_kind)  # MFU against its rated peak; on CPU the measured one
    peak = rated_peak(chip, m.dtype) if chip else measured
    best_peer = max((tokens_per_step / results[p]["seconds"] for p in peers
                     if "error" not in results[p]), default=0.0)
    if measured:
        each = ", ".join(f"{s} {r['matmul_flops'] / 1e9:.1f}" for s, r in results.items()
                         if "error" not in r)
        print(f"matmul peak {measured / 1e9:.1f} GFLOP/s ({m.dtype} 2048x2048; {each}); "
              f"{flops / tokens_per_step / 1e6:.1f} MFLOP per token; MFU against "
              + (f"{RATED_PEAKS[chip].name}'s rated {peak / 1e12:.0f} TFLOP/s" if chip else
                 "the measured matmul peak (no rated peak for this device)"))
    print("| implementation | step ms | tokens/s | MFU % | peak GiB | ours / best peer | "
          "what ran |")
    print("|---|--:|--:|--:|--:|--:|---|")
    failed = []
    for side, r in results.items():
        if "error" in r:
            failed.append((side, r))
            print(f"| {SIDES[side]} | {r['cell']} | - | - | - | - | - |")
            continue
        tps = tokens_per_step / r["seconds"]
        ratio = f"{tps / best_peer:.2f}" if best_peer and side == "jaxllm" else "-"
        print(f"| {SIDES[side]} | {r['seconds'] * 1e3:.1f} | {tps:.0f} | "
              f"{100 * flops / r['seconds'] / peak:.1f} | {r['peak_bytes'] / GiB:.2f} | "
              f"{ratio} | {r['ran']} |")
    for side, r in failed:
        print(f"failed: {SIDES[side]}: {r['error']}")
    for side, r in failed:
        print(f"\nstderr of {SIDES[side]} (end):\n{r['trace']}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""Context parallelism: one long row's train step split over `sequence`, ring attention vs
all-gathered K/V, on mesh sequence = 1, 2, 4, 8.

    python -m benchmarks.context_parallel [--seq_len=32768] [--sequences=1,2,4,8]
                                          [--config=configs/tiny.py:smoke]
                                          [--attention_impl=chunked] [--warmup=1] [--iters=3]

The step is the one tests/unit/parallel/test_ring_attention.py compiles: the config with
mesh.sequence=S, mesh.data=1, one row of --seq_len tokens (stages.pretrain,
model.max_position_embeddings), remat full, `init_train_state` and `make_train_step` with
AdamW; here it runs, on random tokens packed as 4 equal documents (positions restarting at
each, loss mask ones). The two ways jaxllm.parallel.blocks splits causal attention over
`sequence`, side by side:

  ring        what training does: the rows in the zigzag layout (`row_order`, permuted as
              `to_global` permutes them) and the step traced under it (`traced_in_row_order`):
              K/V travel round the ring by collective-permute, the causal work balanced.
  all-gather  the rows in order, the step traced without the layout: each device all-gathers
              K/V over `sequence` inside the shard_map and attends its queries to the keys up
              to its last one (the last device does the most).

sequence = 1 is one row for both (nothing splits). Per row: compile seconds (trace, lower,
compile), the median step seconds after --warmup untimed steps, tokens per second, XLA's
temporary memory per device of the compiled step (`memory_analysis().temp_size_in_bytes`),
and max |Δloss|: the largest difference, over all the steps run, between the variant's loss
and sequence = 1's (same init, same batch, so the same losses up to float rounding; a
sanity check, not an assertion). A variant that fails gets a row saying why (`OOM` or the
exception's type), the reasons follow the table, and the exit status is 1.

Without a device count already in XLA_FLAGS, the script asks XLA for 8 host (CPU) devices
before JAX starts; on a GPU that flag touches only the host platform, and the rows use the
accelerators (a row needing more devices than there are says so). On CPU the 8 fake devices
share the machine's cores, so the step times measure the split's overheads and how the
compute divides (the all-gather variant's last device waits longest), not a speedup: a
sequence of S does the same total work on the same cores. The memory column is the one a
CPU run answers faithfully.
"""

from __future__ import annotations

import os

# Before JAX starts: the number of host devices is fixed when its CPU backend starts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import Failures, median_seconds  # noqa: E402

MiB = 2**20
DOCUMENTS = 4  # equal documents packed in the row


def load(args, sequence: int):
    from jaxllm.config.load import load_config

    return load_config(args.config, [
        f"mesh.sequence={sequence}", "mesh.data=1", f"stages.pretrain.seq_len={args.seq_len}",
        "stages.pretrain.batch_size=1", f"model.max_position_embeddings={args.seq_len}",
        "model.remat=full", f"model.attention_impl={args.attention_impl}"])


def make_batch(T: int, vocab_size: int) -> dict[str, np.ndarray]:
    """One row of T random tokens: DOCUMENTS equal documents, ids 1, 2, ..., positions
    restarting at each (as jaxllm.data.packing lays out a packed row)."""
    tokens = np.random.default_rng(0).integers(0, vocab_size, (1, T + 1)).astype(np.int32)
    doc = -(-T // DOCUMENTS)
    t = np.arange(T, dtype=np.int32)[None]
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": t % doc, "segment_ids": t // doc + 1,
            "loss_mask": np.ones((1, T), np.float32)}


def run_variant(args, sequence: int, ring: bool) -> tuple[float, float, int | None, np.ndarray]:
    """(compile s, median step s, temp bytes per device or None, the loss of every step)."""
    from jaxllm.parallel import blocks, sharding
    from jaxllm.train.loop import to_global
    from jaxllm.train.optim import make_optimizer, make_schedule
    from jaxllm.train.stages import init_train_state, stage_model_config
    from jaxllm.train.step import make_train_step

    config = load(args, sequence)
    T = args.seq_len
    mesh = sharding.make_mesh(config, jax.devices()[:sequence])
    order = blocks.row_order(mesh, T) if ring else None
    if ring and sequence > 1 and order is None:
        raise ValueError(f"row_order: {T} tokens do not split into 2 × {sequence} chunks")
    step_fn = make_train_step(stage_model_config(config, "pretrain"),
                              make_optimizer(config.optimizer),
                              make_schedule(config.stages.pretrain.lr, args.warmup + args.iters),
                              0, 1, 0.0, 0.0)
    with sharding.use_mesh(mesh):
        state, _ = init_train_state(config, mesh)
        batch = to_global(make_batch(T, config.model.vocab_size),
                          sharding.batch_sharding(mesh), order)
        start = time.perf_counter()
        compiled = jax.jit(blocks.traced_in_row_order(step_fn, order),
                           donate_argnums=0).lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        temp = None if memory is None else memory.temp_size_in_bytes
        holder, losses = [state], []
        del state

        def step():
            holder[0], metrics = compiled(holder[0], batch)
            losses.append(metrics["loss"])
            return metrics["loss"]

        seconds = median_seconds(step, warmup=args.warmup, iters=args.iters)
        return compile_s, seconds, temp, np.asarray([float(x) for x in losses])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq_len", type=int, default=32768)
    parser.add_argument("--sequences", default="1,2,4,8")
    parser.add_argument("--config", default="configs/tiny.py:smoke")
    parser.add_argument("--attention_impl", default="chunked")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()

    sequences = [int(s) for s in args.sequences.split(",")]
    devices = jax.devices()
    device = devices[0]
    m = load(args, 1).model
    print(f"\nmodel {args.config} ({m.num_layers} layers, D {m.hidden_size}, N {m.num_heads}, "
          f"K {m.num_kv_heads}, H {m.head_dim}, V {m.vocab_size}, {m.dtype}), 1 row x "
          f"{args.seq_len} tokens ({DOCUMENTS} documents), remat full, attention "
          f"{args.attention_impl}, AdamW; {len(devices)} x {device.platform} "
          f"{device.device_kind} / {platform.processor() or platform.machine()} x "
          f"{os.cpu_count()} cores, jax {jax.__version__}; median of {args.iters} steps after "
          f"{args.warmup}")
    # Rows print as they come, so a run stopped by a time limit keeps the ones it finished.
    print(f"| {'sequence':>8} | {'variant':<16} | {'compile s':>9} | {'step s':>9} | "
          f"{'tokens/s':>9} | {'temp MiB/device':>15} | {'max |Δloss|':>11} |")
    print(f"|{'-' * 10}|{'-' * 18}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 17}|{'-' * 13}|",
          flush=True)
    failures = Failures()
    reference = None  # sequence = 1's losses
    for sequence in sequences:
        variants = [("whole row", True)] if sequence == 1 else [("ring", True),
                                                                ("all-gather", False)]
        for name, ring in variants:
            if sequence > len(devices):
                cells = (f"needs {sequence} dev", "-", "-", "-", "-")
            else:
                try:
                    compile_s, seconds, temp, losses = run_variant(args, sequence, ring)
                    if sequence == 1:
                        reference = losses
                    delta = ("-" if reference is None or len(reference) != len(losses)
                             else f"{np.max(np.abs(losses - reference)):.2e}")
                    cells = (f"{compile_s:.1f}", f"{seconds:.3f}",
                             f"{args.seq_len / seconds:.0f}",
                             "-" if temp is None else f"{temp / MiB:.1f}", delta)
                except Exception as e:  # noqa: BLE001  out of memory, refused: say so, go on
                    cells = (failures.cell(f"sequence={sequence} {name}", e),
                             "-", "-", "-", "-")
            gc.collect()  # the failed or finished step's state: free it for the next row
            print(f"| {sequence:>8} | {name:<16} | {cells[0]:>9} | {cells[1]:>9} | "
                  f"{cells[2]:>9} | {cells[3]:>15} | {cells[4]:>11} |", flush=True)
    failures.print()
    sys.exit(1 if failures.items else 0)


if __name__ == "__main__":
    main()

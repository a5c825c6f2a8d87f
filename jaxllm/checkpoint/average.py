"""`python -m jaxllm.checkpoint average --workdir=DIR --last=N --out=DIR`: the mean of a run's
newest N checkpoints' params, as a params checkpoint.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxllm.checkpoint.run_dir import (
    check_out_dir,
    keep_tokenizer_files,
    read_run_config,
    run_model_config,
    save_params,
)
from jaxllm.config.cli import ArgumentParser, run_command
from jaxllm.config.schema import ConfigError
from jaxllm.data.tokenizer import load_tokenizer


def average_checkpoints(workdir: str, last: int, out_dir: str) -> list[int]:
    """Averages the params of the newest `last` checkpoints of a run (in float32) into a
    params checkpoint, as Qwen2 and Llama 3 do before release, with the run's tokenizer and
    the rope base of the newest one's stage. Returns the steps used."""
    check_out_dir(out_dir, workdir, "--workdir")
    config = read_run_config(workdir)
    tok = config.get("tokenizer", {})
    tokenizer = load_tokenizer(tok.get("name", "qwen2"), max_rank=int(tok.get("max_rank", 0)))
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
    steps = sorted(manager.all_steps())[-last:]
    if len(steps) < last:
        raise ConfigError(f"--last={last}: {workdir} has only {len(steps)} checkpoints")
    total = None
    for step in steps:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        params = jax.tree.map(lambda x: np.asarray(x, np.float32), restored["state"]["params"])
        total = params if total is None else jax.tree.map(np.add, total, params)
    manager.close()
    model = run_model_config(config, restored["meta"].get("stage"))
    dtype = jnp.dtype(model.param_dtype)
    averaged = jax.tree.map(lambda x: jnp.asarray(x / len(steps), dtype), total)
    save_params(out_dir, model, averaged)
    if jax.process_index() == 0:
        keep_tokenizer_files(tokenizer, out_dir)
    return steps


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m jaxllm.checkpoint")
    sub = parser.add_subparsers(dest="command", required=True)
    avg = sub.add_parser("average", help="average the params of a run's newest checkpoints")
    avg.add_argument("--workdir", required=True)
    avg.add_argument("--last", type=int, required=True)
    avg.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    steps = run_command(lambda: average_checkpoints(args.workdir, args.last, args.out))
    print(f"averaged steps {steps} of {args.workdir} into {args.out}; generate or export from "
          f"it with --workdir={args.out}, train from it with --config.init.checkpoint={args.out}")

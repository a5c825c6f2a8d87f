"""`python -m jaxllm.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]`

Runs every stage of the config's pipeline in order and resumes from the newest checkpoint in
DIR. Without --config it trains the embedded default, configs/tiny.py.
"""

from __future__ import annotations

import os
import sys
import traceback

from absl import flags, logging

_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.py")

flags.DEFINE_string("config", _TINY, "Config file, optionally with :ARG; then any number of "
                    "--config.KEY=VALUE overrides (jaxllm/config/cli.py).")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, where the cluster "
                    "cannot be auto-detected (TPU pods, SLURM and GKE are).")
flags.DEFINE_integer("num_processes", None, "Number of processes, with --coordinator_address.")
flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def initialize_distributed() -> None:
    """Joins the other processes: explicit flags, else JAX's cluster auto-detection (Cloud TPU
    VMs, GKE, SLURM, Open MPI), else this is the only process."""
    import jax

    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id, initialization_timeout=120)
        return
    try:
        jax.distributed.initialize()
    except ValueError as e:  # "coordinator_address should be defined": no cluster found
        if "coordinator_address" not in str(e):
            raise


def _exit(code: int, now: bool = False) -> None:
    """Exits; with peers, or `now`, at once: a peer may never reach the distributed shutdown
    barrier (its collectives failed, or it stopped on an error of its own data), and the
    threads of a checkpoint cut short would print their failures for hundreds of lines."""
    import jax

    if jax.process_count() == 1 and not now:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def train(config, workdir: str):
    """Every stage of `config` in `workdir` with the evaluators it asks for (eval_tasks,
    eval_long_every): what this command runs; returns the final TrainState."""
    import jax

    from jaxllm.eval import loop_evaluators
    from jaxllm.plan import check_fits
    from jaxllm.train.stages import run

    evaluators = loop_evaluators(config)  # (its bad settings are reported first)
    if config.check_memory:  # before anything is allocated or any checkpoint touched
        check_fits(config, jax.devices())
    return run(config, workdir, evaluators)


def main(argv: list[str], overrides: list[str]) -> None:
    from jaxllm.config.cli import fail, run_command
    from jaxllm.config.load import load_config
    from jaxllm.config.schema import ConfigError
    from jaxllm.data.formats import DataError
    from jaxllm.train.loop import PREEMPTED_EXIT_CODE, Preempted

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    config = run_command(lambda: load_config(FLAGS.config, overrides))
    initialize_distributed()
    try:
        train(config, FLAGS.workdir)
    except (ConfigError, DataError) as e:
        fail(e, exit=_exit)
    except Preempted:
        sys.exit(PREEMPTED_EXIT_CODE)
    except KeyboardInterrupt:  # Ctrl-C twice (once saves a checkpoint and stops: Preempted)
        print("\ninterrupted: stopped without saving a checkpoint; the same command resumes "
              "from the newest one, if any", file=sys.stderr)
        _exit(130, now=True)
    except Exception:
        import jax

        if jax.process_count() == 1:
            raise
        traceback.print_exc()
        _exit(1)


if __name__ == "__main__":
    from jaxllm.config.cli import run_with_overrides

    run_with_overrides(main)

"""`python -m jaxllm.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]`

Runs every stage of the config's pipeline in order and resumes from the newest checkpoint in
DIR. Without --config it trains the embedded default, configs/tiny.py.
"""

from __future__ import annotations

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

_TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                     "tiny.py")

config_flags.DEFINE_config_file("config", _TINY, "Config file, optionally with :ARG.",
                                lock_config=False)
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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jaxllm.config import ConfigError
    from jaxllm.train.loop import PREEMPTED_EXIT_CODE, Preempted
    from jaxllm.train.pipeline import run

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    initialize_distributed()
    try:
        run(FLAGS.config, FLAGS.workdir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted:
        sys.exit(PREEMPTED_EXIT_CODE)
    except Exception:
        import jax

        if jax.process_count() == 1:
            raise
        # A peer died (its collectives fail at once): exit now instead of waiting in the
        # distributed shutdown barrier for a process that will never arrive.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    app.run(main)

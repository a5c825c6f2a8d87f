"""Export during training from params that span two processes (gloo on CPU).

Each process holds half of every param (FSDP over one device per process). Both call
`export_run_checkpoint`; blocks are gathered one at a time and process 0 alone writes. The
result must be bitwise what one process writes from the whole params.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

from tests.helpers.hf import assert_bitwise_equal, tensors
from tests.helpers.runs import ROOT as ROOT_DIR
from tests.helpers.runs import xla_flags

ROOT = pathlib.Path(ROOT_DIR)
_CHILD = r"""
import sys
import jax

port, pid, workdir, config_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid, initialization_timeout=60)
import numpy as np
from jaxllm import load_config
from jaxllm.convert import export_run_checkpoint
from jaxllm.convert.from_hf import import_shardings
from jaxllm.model import abstract_params
from flax import linen as nn
from tests.helpers.runs import ROOT as ROOT_DIR

config = load_config(config_path)
rng = np.random.default_rng(3)  # numpy, not a jitted init: same values in every process
host = jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32),
                    nn.unbox(abstract_params(config.model)))
shardings = import_shardings(config.model)  # FSDP over both processes' devices
params = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
                      host, shardings)
assert not params["embed"]["embedding"].is_fully_addressable
export_run_checkpoint(workdir, 5, config, "anneal", params, dtype="float32")
"""


def test_two_processes_export_what_one_process_exports(tmp_path):
    from flax import linen as nn

    from jaxllm import load_config
    from jaxllm.convert import export_run_checkpoint
    from jaxllm.model import abstract_params

    config_path = str(ROOT / "jaxllm" / "configs" / "tiny.py") + ":smoke"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(1))
    port = str(20000 + (os.getpid() * 7) % 20000)
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, port, str(i), str(tmp_path / "two"),
                               config_path], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

    config = load_config(config_path)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32),
                          nn.unbox(abstract_params(config.model)))
    one = export_run_checkpoint(str(tmp_path / "one"), 5, config, "anneal", params,
                                dtype="float32")
    two = tmp_path / "two" / "hf" / "5"
    assert_bitwise_equal(tensors(one), tensors(str(two)))
    assert (two / "config.json").read_text() == (pathlib.Path(one) / "config.json").read_text()

"""Export streams: peak host memory stays bounded by the shard size, not the model size.

The test writes a 344 MB float32 run checkpoint (a 24-layer Llama-shaped model, saved by the
real Checkpointer from params sharded FSDP over 8 devices, as training leaves it) and exports
it in a fresh process with 40 MB shards. The child reads its resident memory just before the
export, resets its peak (VmHWM) there, and reads the peak after: the growth must stay under
2 × the shard size (80 MB), under a quarter of the checkpoint. Holding the checkpoint, or
even one whole stacked param (75 MB) with its storage chunks, would break the bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

SHARD_BYTES = 40_000_000
_CHILD = r"""
import json, sys
from jaxllm.convert.to_hf import export_checkpoint
from jaxllm.data.tokenizer import load_tokenizer

def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

tokenizer = load_tokenizer("qwen2", max_rank=4000)  # loaded before measuring: not weights
import jax
jax.devices()  # so are jax's backends, and the plugins of the aot extra where installed
before = status_kb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current RSS
export_checkpoint(sys.argv[1], sys.argv[2], max_shard_bytes=int(sys.argv[3]),
                  tokenizer=tokenizer)
print(json.dumps({"before": before * 1024, "peak": status_kb("VmHWM") * 1024}))
"""


def _write_run(workdir: str) -> int:
    """A run directory holding one checkpoint of a 344 MB model; returns the params' bytes."""
    from jaxllm.checkpoint.state import Checkpointer
    from jaxllm.config.schema import base_config
    from jaxllm.convert.from_hf import import_shardings
    from jaxllm.model import abstract_params
    from jaxllm.train.step import TrainState

    config = base_config()
    config.model.update(family="llama", vocab_size=4096, hidden_size=512, num_layers=24,
                        num_heads=8, num_kv_heads=8, head_dim=64, intermediate_size=1536,
                        qkv_bias=False, tie_embeddings=False, param_dtype="float32")
    config.tokenizer.max_rank = 4000
    config.checkpoint["async"] = False
    abstract = nn.unbox(abstract_params(config.model))

    def init(key):  # random values: zeros would compress and hide the chunk buffers
        leaves, treedef = jax.tree.flatten(abstract)
        keys = jax.random.split(key, len(leaves))
        return treedef.unflatten([jax.random.uniform(k, a.shape, a.dtype, -1, 1)
                                  for k, a in zip(keys, leaves, strict=True)])

    params = jax.jit(init, out_shardings=import_shardings(config.model))(jax.random.key(0))
    state = TrainState(step=jnp.int32(7), params=params, opt_state=(),
                       loss_ema=jnp.float32(0), bad_in_row=jnp.int32(0))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    checkpointer = Checkpointer(workdir, config)
    checkpointer.save(7, state, {"stage": "pretrain", "data_state": {}})
    checkpointer.close()
    return sum(x.nbytes for x in jax.tree.leaves(params))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                    reason="measures peak memory with Linux /proc/self/{status,clear_refs}")
def test_export_peak_memory_is_bounded_by_the_shard_size(tmp_path):
    workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
    os.makedirs(workdir)
    model_bytes = _write_run(workdir)
    assert 300e6 < model_bytes < 400e6
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _CHILD, workdir, out, str(SHARD_BYTES)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    growth = measured["peak"] - measured["before"]
    print(f"export of {model_bytes / 1e6:.0f} MB: peak host memory growth "
          f"{growth / 1e6:.0f} MB (bound {2 * SHARD_BYTES / 1e6:.0f} MB)")
    assert growth < 2 * SHARD_BYTES, growth

    # And it is the whole model, sharded as asked.
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    files = sorted(set(index["weight_map"].values()))
    assert len(index["weight_map"]) == 2 + 24 * 9 + 1 and len(files) >= 4
    assert index["metadata"]["total_size"] == model_bytes // 2  # bfloat16
    assert all(os.path.getsize(os.path.join(out, f)) <= SHARD_BYTES for f in files)
    from safetensors import safe_open

    with safe_open(os.path.join(out, index["weight_map"]["model.layers.23.mlp.down_proj.weight"]),
                   framework="np") as f:
        w = f.get_tensor("model.layers.23.mlp.down_proj.weight")
    assert w.shape == (512, 1536) and np.abs(w.astype(np.float32)).max() <= 1

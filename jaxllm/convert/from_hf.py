"""Hugging Face directory -> jaxllm params checkpoint (`python -m jaxllm.convert import`).

Each param is built straight onto its sharding over all devices (FSDP over D when it divides,
else one device) from only the safetensors blocks each device holds, then written with
Orbax as the params checkpoint that `--config.init.checkpoint=DIR` starts from. The source's
`config.json` and tokenizer files are kept in `DIR/hf_files/`, so exporting the checkpoint
again gives back the same tokenizer and bos/eos ids.
"""

from __future__ import annotations

import os
import shutil

import jax
import ml_collections as mc
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh

from jaxllm.checkpoint.run_dir import HF_FILES, check_out_dir
from jaxllm.convert import hf
from jaxllm.convert.hf_config import read_hf_config

# Weights and checkpoints of other formats are not worth copying beside the params.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_MAX_COPY_BYTES = 64 << 20


def import_shardings(m: mc.ConfigDict, devices=None) -> dict:
    """Param shardings for import: FSDP over all devices when hidden_size divides."""
    from jaxllm.model import abstract_params
    from jaxllm.parallel import sharding

    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if m.hidden_size % len(devices) == 0 else 1
    shape = [1] * len(sharding.MESH_AXES)
    shape[sharding.MESH_AXES.index("fsdp")] = n
    mesh = Mesh(np.asarray(devices[:n]).reshape(shape), sharding.MESH_AXES,
                axis_types=(AxisType.Auto,) * len(shape))
    with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        return sharding.param_shardings(abstract_params(m), mesh)


def import_hf(hf_dir: str, out_dir: str, dtype: str | None = None) -> mc.ConfigDict:
    """Converts `hf_dir` into a params checkpoint at `out_dir`; returns its model config.

    `dtype` casts the weights (default: keep the dtype on disk, so a round trip is exact).
    """
    from jaxllm.checkpoint.run_dir import save_params

    check_out_dir(out_dir, hf_dir, "--hf")
    m, _ = read_hf_config(hf_dir)
    if dtype is not None:
        hf.np_dtype(dtype)
    params = hf.read_hf_params(hf_dir, m, import_shardings(m), dtype)
    m.param_dtype = np.dtype(params["embed"]["embedding"].dtype).name
    save_params(out_dir, m, params)
    if jax.process_index() == 0:
        _keep_hf_files(hf_dir, os.path.join(out_dir, HF_FILES))
    return m


def _keep_hf_files(hf_dir: str, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    for file in os.listdir(hf_dir):
        src = os.path.join(hf_dir, file)
        if (os.path.isfile(src) and not file.endswith(_SKIP_SUFFIXES)
                and file != "model.safetensors.index.json"
                and os.path.getsize(src) <= _MAX_COPY_BYTES):
            shutil.copy2(src, os.path.join(dest, file))

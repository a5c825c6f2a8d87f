"""`load_model`: (model config, params, tokenizer) from a run directory, a params checkpoint or
a Hugging Face directory, on one device or sharded over a mesh; for generation and evaluation.
"""

from __future__ import annotations

import jax
import ml_collections as mc
from jax.sharding import Mesh

from jaxllm.convert.hf import load_hf
from jaxllm.convert.hf_config import read_hf_config
from jaxllm.convert.to_hf import load_checkpoint
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.model.transformer import abstract_params
from jaxllm.parallel import sharding


def load_model(workdir: str | None = None, hf: str | None = None, step: int | None = None,
               mesh: str | Mesh = "") -> tuple[mc.ConfigDict, dict, object]:
    """(model config, params, tokenizer) from a run directory / params checkpoint or from a
    Hugging Face directory. `mesh` (a Mesh, or "tensor:4,fsdp:2", see
    `sharding.mesh_from_spec`) places the params sharded over it by their logical axes (an HF
    directory is read straight onto the shards), and `generate` then decodes on that mesh;
    by default they go to one device."""
    if (workdir is None) == (hf is None):
        raise ValueError("give exactly one of --workdir and --hf")

    def shardings(model_config):
        if isinstance(mesh, str):
            if not mesh:
                return None
            return sharding.param_shardings(abstract_params(model_config),
                                            sharding.mesh_from_spec(model_config, mesh))
        return sharding.param_shardings(abstract_params(model_config), mesh)

    if hf is not None:
        model_config, params = load_hf(hf, shardings(read_hf_config(hf)[0]))
        return model_config, params, load_tokenizer(hf)
    model_config, params, tokenizer = load_checkpoint(workdir, step)
    if tokenizer is None:
        raise ValueError(f"{workdir} has no tokenizer of its own (a params checkpoint made by "
                         "save_params); export it with a tokenizer, or use --hf")
    return model_config, jax.device_put(params, shardings(model_config)), tokenizer

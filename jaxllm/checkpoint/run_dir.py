"""What a run directory and a params checkpoint hold, for everything that reads or writes them.

A run directory (`--workdir`): `config.json` (the resolved config), `checkpoints/<step>/`
(checkpoint/state.py), `metrics.jsonl`. A params checkpoint (`python -m jaxllm.convert
import`, `python -m jaxllm.checkpoint average`, `config.init.checkpoint`): `params/` (Orbax)
and `model.json`; import and average add `hf_files/`, the tokenizer of the model or run it came
from.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import ml_collections as mc
import orbax.checkpoint as ocp

from jaxllm.config.schema import ConfigError, model_defaults
from jaxllm.config.validate import validate_model
from jaxllm.data.tokenizer import save_hf_tokenizer_files

HF_FILES = "hf_files"  # where `convert import` keeps the source's tokenizer and config.json


def checkpoint_steps(workdir: str) -> list[int]:
    """The finished steps in workdir/checkpoints, oldest first."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    # Orbax renames a step's temporary directory to `<step>` once complete.
    return sorted(int(d) for d in os.listdir(directory)
                  if re.fullmatch(r"\d+", d) and os.path.isdir(os.path.join(directory, d, "state")))


def read_run_config(workdir: str) -> dict:
    """A run directory's config.json, refused with one clear line if another program wrote it
    (a Hugging Face config.json, say, from an export into the run directory)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--workdir={workdir} is not a jaxllm run directory (it has no "
                                "config.json)")
    with open(path) as f:
        try:
            config = json.load(f)
        except ValueError as e:
            raise ConfigError(f"--workdir={workdir} is not a jaxllm run directory: {path} is "
                              f"not JSON ({e})") from None
    if not isinstance(config, dict) or "model" not in config:
        raise ConfigError(f"--workdir={workdir} is not a jaxllm run directory: {path} has no "
                          "'model' (is it a Hugging Face config.json?)")
    return config


def save_params(out_dir: str, model_config: mc.ConfigDict, params: dict) -> None:
    """Writes a params checkpoint that `config.init.checkpoint=out_dir` starts from."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(out_dir, "params"), params, force=True)
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "model.json"), "w") as f:
            f.write(model_config.to_json_best_effort(indent=2))


def load_model_config(ckpt_dir: str) -> mc.ConfigDict:
    path = os.path.join(ckpt_dir, "model.json")
    if not os.path.exists(path):
        raise ConfigError(f"config.init.checkpoint: {ckpt_dir} is not a jaxllm params checkpoint "
                          "(no model.json); make one with `python -m jaxllm.convert import` or "
                          "`python -m jaxllm.checkpoint average`")
    model = model_defaults()
    with open(path) as f:
        model.update(json.load(f))
    validate_model(model)
    return model


def load_params(ckpt_dir: str, abstract_params) -> dict:
    """Restores a params checkpoint onto the shardings in `abstract_params`."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(os.path.abspath(ckpt_dir), "params"),
                                    abstract_params)


# The model keys that decide parameter shapes (and so what weights fit).
SHAPE_KEYS = ("family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
              "head_dim", "intermediate_size", "qkv_bias", "tie_embeddings", "num_experts",
              "moe_intermediate_size", "shared_expert_intermediate_size",
              "decoder_sparse_step", "param_dtype")


def check_same_shapes(model: mc.ConfigDict, other: mc.ConfigDict, where: str) -> None:
    """Refuses weights whose shapes differ from the config's model, naming the key."""
    for key in SHAPE_KEYS[:-1]:  # a param dtype is cast on load
        if model[key] != other[key]:
            raise ConfigError(f"config.model.{key}={model[key]!r}, but {where} has "
                              f"{other[key]!r}")


def check_out_dir(out_dir: str, source: str, source_flag: str) -> None:
    """Refuses to write into the source, or into a run directory (config.json + checkpoints/):
    an export would overwrite its config.json, an import or average would put there a
    model.json that hides its checkpoints."""
    if os.path.realpath(out_dir) == os.path.realpath(source):
        raise ValueError(f"--out={out_dir} is the {source_flag} it reads: it would write over "
                         "its own source; use a new --out")
    if (os.path.exists(os.path.join(out_dir, "config.json"))
            and os.path.isdir(os.path.join(out_dir, "checkpoints"))):
        raise ValueError(f"--out={out_dir} is a jaxllm run directory (config.json + "
                         "checkpoints/): writing there would leave the run unreadable; use a "
                         "new --out")


def keep_tokenizer_files(tokenizer: Any, ckpt_dir: str) -> None:
    """Gives a params checkpoint made from a run (`checkpoint average`) the run's tokenizer:
    its files and special ids in `hf_files/`, where `convert import` keeps its source's, so
    that generation and export find them."""
    dest = os.path.join(ckpt_dir, HF_FILES)
    save_hf_tokenizer_files(tokenizer, dest)
    with open(os.path.join(dest, "config.json"), "w") as f:  # only the ids export reads
        json.dump({"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id}, f)


def run_model_config(config: mc.ConfigDict | dict, stage: str | None) -> mc.ConfigDict:
    """The model a run's stage trained: config.model with that stage's rope base."""
    config = config if isinstance(config, dict) else config.to_dict()
    m = model_defaults()
    m.update(config["model"])
    if stage is not None:
        if stage not in config.get("stages", {}):
            raise ConfigError(f"the checkpoint's stage {stage!r} is not in config.stages "
                              f"({', '.join(config.get('stages', {}))})")
        m.rope_theta = float(config["stages"][stage]["rope_theta"])
    return m

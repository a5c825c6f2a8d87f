"""The teacher of a distillation stage (config.distill): loaded once, frozen, sharded on the
run's mesh by its own logical axes, and checked to share the student's tokenizer."""

from __future__ import annotations

import json
import os

import ml_collections as mc

from jaxllm.config.schema import ConfigError
from jaxllm.model import frozen
from jaxllm.train.step import Distillation

# Text whose ids tell two tokenizers apart: code, accents, CJK, digits, a special token.
PROBE = "def main(argv):\n    return 0  # héllo, 世界 1234<|endoftext|>"


def is_hf_dir(path: str) -> bool:
    """A Hugging Face model directory: a config.json with a model_type (a run's has none)."""
    config_json = os.path.join(path, "config.json")
    if not os.path.isfile(config_json):
        return False
    with open(config_json) as f:
        return "model_type" in json.load(f)


def same_tokenizer(a, b) -> bool:
    return a.vocab_size == b.vocab_size and a.encode(PROBE) == b.encode(PROBE)


def load_teacher(config: mc.ConfigDict, mesh, tokenizer) -> tuple[Distillation, dict]:
    """(what the train step needs of the teacher, its params on `mesh`), from
    config.distill.teacher: a run directory (its newest checkpoint, with the rope base of
    that checkpoint's stage), a params checkpoint or a Hugging Face directory."""
    path = config.distill.teacher
    where = f"config.distill.teacher={path}"
    if not os.path.isdir(path):
        raise ConfigError(f"{where}: no such directory (give a run directory, a params "
                          "checkpoint or a Hugging Face directory)")

    from jaxllm.convert.load import load_model  # safetensors: only here

    source = {"hf": path} if is_hf_dir(path) else {"workdir": path}
    try:
        model_cfg, params, teacher_tokenizer = load_model(**source, mesh=mesh)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    check_tokenizer(teacher_tokenizer, tokenizer, where)
    return Distillation(frozen(model_cfg), float(config.distill.temperature),
                        float(config.distill.alpha)), params


def check_tokenizer(teacher_tokenizer, tokenizer, where: str) -> None:
    if not same_tokenizer(teacher_tokenizer, tokenizer):
        raise ConfigError(
            f"{where}: the teacher's tokenizer ({teacher_tokenizer.vocab_size} ids) is not this "
            f"run's ({tokenizer.vocab_size} ids, config.tokenizer): a student learns the "
            "teacher's distribution over the same ids, so both must use one tokenizer")

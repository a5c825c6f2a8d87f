"""The frozen models of a stage: a distillation stage's teacher (config.distill) and a DPO
stage's reference (config.dpo), loaded once, sharded on the run's mesh by their own logical
axes, and checked to share the trained model's tokenizer."""

from __future__ import annotations

import json
import os

import ml_collections as mc

from jaxllm.config.schema import ConfigError
from jaxllm.model import frozen
from jaxllm.train.step import Distillation, Preference

REFERENCES = "references"  # <workdir>/references/<stage>: a dpo stage's starting weights
MIN_PAIR_TOKENS = 16  # fewer than any rendered pair has: bounds the pairs a row can hold

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
    model_cfg, params = load_frozen(config.distill.teacher, "config.distill.teacher", mesh,
                                    tokenizer)
    return distillation(config, model_cfg), params


def frozen_model(config: mc.ConfigDict, stage_name: str, model_cfg: mc.FrozenConfigDict
                 ) -> tuple[Distillation | Preference | None, mc.FrozenConfigDict | None]:
    """What a stage's steps take beside the state, without its weights (for `jaxllm.compile`
    and `plan`): (its Distillation / Preference, the frozen model's config) for a distill /
    dpo stage, else (None, None); `model_cfg` is the stage's own (the default reference's)."""
    objective = config.stages[stage_name].objective
    if objective == "distill":
        model_cfg = frozen_model_config(config.distill.teacher, "config.distill.teacher")
        return distillation(config, model_cfg), model_cfg
    if objective != "dpo":
        return None, None
    if config.dpo.reference:
        model_cfg = frozen_model_config(config.dpo.reference, "config.dpo.reference")
    return preference(config, stage_name, model_cfg), model_cfg


def frozen_model_config(path: str, key: str) -> mc.FrozenConfigDict:
    """A teacher's / reference's model config, read without its weights."""
    if not os.path.isdir(path):
        raise ConfigError(f"{key}={path}: no such directory (give a run directory, a params "
                          "checkpoint or a Hugging Face directory)")
    try:
        if is_hf_dir(path):
            from jaxllm.convert.hf_config import read_hf_config

            return frozen(read_hf_config(path)[0])
        from jaxllm.convert.to_hf import open_checkpoint

        return frozen(open_checkpoint(path).model)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={path}: {e}") from None


def distillation(config: mc.ConfigDict, teacher_cfg) -> Distillation:
    return Distillation(teacher_cfg, float(config.distill.temperature),
                        float(config.distill.alpha))


def preference(config: mc.ConfigDict, stage_name: str, reference_cfg) -> Preference:
    pairs = config.stages[stage_name].seq_len // MIN_PAIR_TOKENS + 1
    return Preference(reference_cfg, float(config.dpo.beta), pairs)


def load_reference(config: mc.ConfigDict, workdir: str, stage_name: str, model_cfg, params,
                   at_start: bool, abstract_params, given: tuple | None = None
                   ) -> tuple[Preference, dict]:
    """(what a dpo stage's step needs of its reference, the reference's params): `given`
    (config.dpo.reference's config and params, `load_frozen`), else the stage's starting
    weights `params` (`model_cfg`), written to <workdir>/references/<stage> when the stage
    starts (`at_start`) so that a resumed stage compares against the same ones."""
    if given is not None:
        return preference(config, stage_name, given[0]), given[1]

    from jaxllm.checkpoint.run_dir import load_params, save_params

    path = os.path.join(workdir, REFERENCES, stage_name)
    if not os.path.exists(os.path.join(path, "model.json")):
        if not at_start:
            raise ConfigError(f"{path}: the reference of dpo stage {stage_name!r} (its starting "
                              "weights) is missing, and the stage has begun; restore the "
                              "directory, or set config.dpo.reference")
        save_params(path, config.model, params)
    return preference(config, stage_name, model_cfg), load_params(path, abstract_params)


def load_frozen(path: str, key: str, mesh, tokenizer) -> tuple[mc.FrozenConfigDict, dict]:
    """A frozen model's config and params on `mesh`, its tokenizer checked against ours."""
    where = f"{key}={path}"
    if not os.path.isdir(path):
        raise ConfigError(f"{where}: no such directory (give a run directory, a params "
                          "checkpoint or a Hugging Face directory)")

    from jaxllm.convert.load import load_model  # safetensors: only here

    source = {"hf": path} if is_hf_dir(path) else {"workdir": path}
    try:
        model_cfg, params, other_tokenizer = load_model(**source, mesh=mesh)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    check_tokenizer(other_tokenizer, tokenizer, where)
    return frozen(model_cfg), params


WHY_ONE_TOKENIZER = {
    "config.distill.teacher": "a student learns the teacher's distribution over the same ids",
    "config.dpo.reference": "DPO compares the two models' log-probabilities of the same ids",
}


def check_tokenizer(other, tokenizer, where: str) -> None:
    key = where.split("=")[0]
    role = "teacher" if key == "config.distill.teacher" else "reference"
    if not same_tokenizer(other, tokenizer):
        raise ConfigError(
            f"{where}: the {role}'s tokenizer ({other.vocab_size} ids) is not this run's "
            f"({tokenizer.vocab_size} ids, config.tokenizer): {WHY_ONE_TOKENIZER[key]}, so "
            "both must use one tokenizer")

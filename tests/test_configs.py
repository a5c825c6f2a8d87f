"""Every config file loads, validates, and has its published parameter count (no allocation)."""

import glob
import os

import pytest

from jaxllm.config import ConfigError, base_config, load_config, stage_names, validate
from jaxllm.model import param_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))

PUBLISHED = {  # parameters, relative tolerance
    "qwen2_0_5b": (494e6, 0.01),
    "qwen2_1_5b": (1.54e9, 0.01),
    "qwen2_7b": (7.62e9, 0.01),
    "qwen2_72b": (72.7e9, 0.005),
    "llama2_7b": (6.74e9, 0.005),
    "llama3_1_8b": (8.03e9, 0.005),
}


def test_every_config_file_is_covered():
    names = {os.path.basename(p)[:-3] for p in CONFIGS}
    assert names - {"tiny"} == set(PUBLISHED), "add the new config's published size here"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_loads_and_validates(path):
    config = load_config(path)
    assert stage_names(config) == ["pretrain", "long_context", "anneal"]
    name = os.path.basename(path)[:-3]
    if name in PUBLISHED:
        expected, rtol = PUBLISHED[name]
        assert param_count(config.model) == pytest.approx(expected, rel=rtol)


def test_qwen2_recipe_stages():
    c = load_config(os.path.join(ROOT, "configs", "qwen2_72b.py"))
    assert (c.stages.pretrain.seq_len, c.stages.pretrain.rope_theta) == (4096, 1e4)
    assert (c.stages.long_context.seq_len, c.stages.long_context.rope_theta) == (32768, 1e6)
    assert c.stages.anneal.lr.end < c.stages.anneal.lr.peak
    assert c.optimizer.b2 == 0.95 and c.optimizer.weight_decay == 0.1


def test_variant_and_overrides():
    c = load_config(os.path.join(ROOT, "configs", "tiny.py:smoke"),
                    ["model.num_layers=3", "stages.long_context.seq_len=128", "model.family=llama"])
    assert c.model.num_layers == 3 and c.stages.long_context.seq_len == 128
    assert c.model.family == "llama"


@pytest.mark.parametrize("override, key", [
    ("model.num_layer=2", "model.num_layer"),
    ("stages.pretrain.sequence=5", "stages.pretrain.sequence"),
    ("model.num_kv_heads=3", "model.num_heads"),
    ("model.family=gpt2", "model.family"),
    ("model.attention_impl=flash", "model.attention_impl"),
    ("stages.pretrain.lr.schedule=step", "stages.pretrain.lr.schedule"),
    ("stages.pretrain.batch_size=6", "stages.pretrain.batch_size"),  # grad_accum=4 below
    ("stages.anneal.seq_len=100000", "stages.anneal.seq_len"),
    ("mesh.data=0", "mesh.data"),
    ("tokenizer.max_rank=2000", "model.vocab_size"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(os.path.join(ROOT, "configs", "tiny.py:smoke"),
                    ["optimizer.grad_accum=2", override] if "batch_size" not in override
                    else ["optimizer.grad_accum=4", override])


def test_unknown_key_written_in_a_config_file_is_refused():
    c = base_config()
    c.stages.pretrain.steps = 1
    c.model.hidden_sise = 3
    with pytest.raises(ConfigError, match=r"model\.hidden_sise.*allowed keys"):
        validate(c)


def test_mixture_must_name_a_source():
    c = base_config()
    c.stages.pretrain.mixture = {"web": 1.0}
    with pytest.raises(ConfigError, match=r"stages\.pretrain\.mixture\.web"):
        validate(c)


def test_a_run_starts_from_one_set_of_weights():
    with pytest.raises(ConfigError, match=r"init\.hf.*init\.checkpoint='b' are both set"):
        load_config(os.path.join(ROOT, "configs", "tiny.py:smoke"),
                    ["init.checkpoint=b", "init.hf=a"])

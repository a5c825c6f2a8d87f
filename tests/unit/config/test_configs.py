"""Every config file loads, validates, and has its published parameter count (no allocation);
every key of the schema has a rule, and values outside it are refused naming the key."""

import glob
import json
import os
import re
import subprocess
import sys

import jax
import ml_collections as mc
import pytest

from jaxllm.config.cli import split_overrides
from jaxllm.config.load import load_config
from jaxllm.config.rules import VALUE_RULES, walk
from jaxllm.config.schema import ConfigError, base_config, stage_names
from jaxllm.config.validate import validate
from jaxllm.model import param_count
from jaxllm.parallel import sharding
from jaxllm.train.stages import check_resumable
from tests.helpers.runs import ROOT, xla_flags

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "jaxllm", "configs", "[!_]*.py")))

PUBLISHED = {  # parameters, relative tolerance
    "qwen2_0_5b": (494e6, 0.01),
    "qwen2_1_5b": (1.54e9, 0.01),
    "qwen2_7b": (7.62e9, 0.01),
    "qwen2_72b": (72.7e9, 0.005),
    "llama2_7b": (6.74e9, 0.005),
    "llama3_1_8b": (8.03e9, 0.005),
    "qwen2_57b_a14b": (57.4e9, 0.005),
    "qwen1_5_moe_a2_7b": (14.3e9, 0.005),
}


def test_every_config_file_is_covered():
    names = {os.path.basename(p)[:-3] for p in CONFIGS}
    assert names - {"tiny", "tiny_moe"} == set(PUBLISHED), "add the new config's published size"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_loads_and_validates(path):
    config = load_config(path)
    assert stage_names(config) == ["pretrain", "long_context", "anneal"]
    name = os.path.basename(path)[:-3]
    if name in PUBLISHED:
        expected, rtol = PUBLISHED[name]
        assert param_count(config.model) == pytest.approx(expected, rel=rtol)


def test_qwen2_recipe_stages():
    c = load_config(os.path.join(ROOT, "jaxllm", "configs", "qwen2_72b.py"))
    assert (c.stages.pretrain.seq_len, c.stages.pretrain.rope_theta) == (4096, 1e4)
    assert (c.stages.long_context.seq_len, c.stages.long_context.rope_theta) == (32768, 1e6)
    assert c.stages.anneal.lr.end < c.stages.anneal.lr.peak
    assert c.optimizer.b2 == 0.95 and c.optimizer.weight_decay == 0.1


def test_variant_and_overrides():
    c = load_config(os.path.join(ROOT, "jaxllm", "configs", "tiny.py:smoke"),
                    ["model.num_layers=3", "stages.long_context.seq_len=128", "model.family=llama"])
    assert c.model.num_layers == 3 and c.stages.long_context.seq_len == 128
    assert c.model.family == "llama"
    c = load_config(os.path.join(ROOT, "jaxllm", "configs", "tiny.py:smoke"),
                    ["model.dca.enabled=true", "model.qkv_bias=False"])
    assert c.model.dca.enabled is True and c.model.qkv_bias is False  # absl's spelling too


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
        load_config(os.path.join(ROOT, "jaxllm", "configs", "tiny.py:smoke"),
                    ["optimizer.grad_accum=2", override] if "batch_size" not in override
                    else ["optimizer.grad_accum=4", override])


@pytest.mark.parametrize("overrides, key", [
    (["model.num_experts_per_tok=5"], "model.num_experts_per_tok"),  # top-k > 4 experts
    (["model.num_experts=0"], "model.num_experts"),  # qwen2_moe without experts
    (["model.family=qwen2"], "model.num_experts"),  # experts in a dense family
    (["model.decoder_sparse_step=3"], "model.decoder_sparse_step"),  # 2 layers
    (["model.moe_intermediate_size=0"], "model.num_experts"),
    (["model.moe_capacity_factor=-1.0"], "model.moe_capacity_factor"),
    (["mesh.data=1", "mesh.expert=8"], "model.num_experts"),  # 4 experts over 8 devices
    (["mesh.expert=2", "mesh.tensor=2", "model.moe_intermediate_size=33"],
     "model.moe_intermediate_size"),
])
def test_bad_moe_configs_name_the_key(overrides, key):
    """tiny_moe:smoke (2 layers, 4 experts of 32, shared 64) made wrong one way at a time:
    one ConfigError naming the key, from loading or from building the 8-device mesh."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config = load_config("configs/tiny_moe.py:smoke", overrides)
        sharding.make_mesh(config, jax.devices()[:8])


def test_expert_axis_needs_experts():
    config = load_config(os.path.join(ROOT, "jaxllm", "configs", "tiny.py:smoke"),
                         ["mesh.data=4", "mesh.expert=2"])
    with pytest.raises(ConfigError, match=r"mesh\.expert=2 needs a mixture-of-experts"):
        sharding.make_mesh(config, jax.devices()[:8])


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
        load_config(os.path.join(ROOT, "jaxllm", "configs", "tiny.py:smoke"),
                    ["init.checkpoint=b", "init.hf=a"])


# ----------------------------------------------------------------------------- rules

def test_every_schema_key_has_a_rule_and_every_rule_a_key():
    schema = base_config()  # three stages, one source, one mixture entry, the model
    assert stage_names(schema) and list(schema.data.sources) and schema.stages.pretrain.mixture
    leaves = list(walk(VALUE_RULES, schema))
    assert [".".join(p) for p, _, rule in leaves if rule is None] == [], \
        "add the new key's rule to VALUE_RULES in jaxllm/config/rules.py"
    for path, value, rule in leaves:
        assert rule.error(value) is None, (path, value)  # each default obeys its own rule
    used = {pattern for pattern in VALUE_RULES for path, _, _ in leaves
            if re.fullmatch(re.escape(pattern).replace(r"\*", r"[^.]+"), ".".join(path))}
    assert set(VALUE_RULES) - used == set(), "a rule for a key the schema no longer has"
    validate(schema)


def _smoke_with(key: str, value) -> mc.ConfigDict:
    """configs/tiny.py:smoke with `key` set to `value`, of any type: as a config file that
    builds its own ConfigDict can (assignment to a typed ConfigDict key would refuse it)."""
    tree = load_config(os.path.join(ROOT, "jaxllm", "configs", "tiny.py:smoke")).to_dict()
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[leaf] = value
    return mc.ConfigDict(tree)


BAD = [  # key, value, what the message says after "config.KEY: " (or all of it, from "config.")
    ("model.family", "gpt2", "'gpt2' is not one of 'qwen2', 'qwen2_moe', 'llama'"),
    ("model.vocab_size", 0, "0 is outside [1, inf)"),
    ("model.hidden_size", 64.0, "must be an int, got 64.0 (float)"),
    ("model.num_layers", True, "must be an int, got True (bool)"),
    ("model.head_dim", -16, "-16 is outside [1, inf)"),
    ("model.head_dim", 15, "15 is odd"),
    ("model.intermediate_size", "128", "must be an int, got '128' (str)"),
    ("model.qkv_bias", 1, "must be a bool, got 1 (int)"),
    ("model.tie_embeddings", "yes", "must be a bool"),
    ("model.rms_norm_eps", 0.0, "0.0 is outside (0, inf)"),
    ("model.rope_theta", -1.0, "-1.0 is outside (0, inf)"),
    ("model.rope_theta", "1e6", "must be a number, got '1e6' (str)"),
    ("model.rope_scaling.type", "ntk", "'ntk' is not one of"),
    ("model.rope_scaling.factor", 0.5, "0.5 is outside [1, inf)"),
    ("model.rope_scaling", None, "must be a group of keys"),
    ("model.dca.local_size", -1, "-1 is outside [0, inf)"),
    ("model.dca.local_size", 40000, "must be below dca.chunk_size=32768"),
    ("model.max_position_embeddings", 0, "0 is outside [1, inf)"),
    ("model.num_experts", -1, "-1 is outside [0, inf)"),
    ("model.num_experts_per_tok", 2, "2 exceeds num_experts=0"),
    ("model.decoder_sparse_step", 0, "0 is outside [1, inf)"),
    ("model.router_aux_loss_coef", -0.1, "-0.1 is outside [0, inf)"),
    ("model.norm_topk_prob", None, "must be a bool, got None"),
    ("model.dtype", "float64", "'float64' is not one of 'float32', 'bfloat16', 'float16'"),
    ("model.remat", True, "True is not one of 'none', 'full', 'dots'"),
    ("model.moe_impl", "loop", "'loop' is not one of"),
    ("model.init_std", 0.0, "0.0 is outside (0, inf)"),
    ("tokenizer.name", "", "must not be empty"),
    ("tokenizer.max_rank", -1, "-1 is outside [0, inf)"),
    ("tokenizer.max_rank", 100, "100 is outside 256..151643"),
    ("mesh.fsdp", 0, "0 is outside [1, inf) and is not -1 (the rest of the devices)"),
    ("mesh.tensor", 2.0, "must be an int"),
    ("stages.pretrain.steps", -1, "-1 is outside [0, inf)"),
    ("stages.pretrain.steps", 6.0, "must be an int, got 6.0 (float)"),
    ("stages.pretrain.seq_len", 0, "0 is outside [1, inf)"),
    ("stages.anneal.batch_size", 0, "0 is outside [1, inf)"),
    ("stages.pretrain.rope_theta", 0.0, "0.0 is outside (0, inf)"),
    ("stages.pretrain.reset_optimizer", "no", "must be a bool"),
    ("stages.pretrain.lr.peak", 0.0, "0.0 is outside (0, inf)"),
    ("stages.pretrain.lr.peak", float("inf"), "inf is outside (0, inf)"),
    ("stages.pretrain.lr.end", -1e-4, "-0.0001 is outside [0, inf)"),
    ("stages.pretrain.lr.warmup_steps", -1, "-1 is outside [0, inf)"),
    ("stages.pretrain.lr.warmup_steps", 7, "7 is outside 0..steps=6"),
    ("stages.pretrain.lr.decay_fraction", 1.5, "1.5 is outside [0, 1]"),
    ("stages.pretrain.lr.schedule", "step", "'step' is not one of"),
    ("stages.pretrain.mixture.stdlib", -1.0, "-1.0 is outside [0, inf)"),
    ("stages.pretrain.mixture.stdlib", 0.0,
     "config.stages.pretrain.mixture: needs at least one source with a positive weight"),
    ("stages.long_context.mixture", {"web": 1.0},
     "config.stages.long_context.mixture.web: no such source; data.sources has stdlib"),
    ("stages.anneal", 3, "must be a group of keys"),
    ("data.sources.stdlib.format", "csv", "'csv' is not one of"),
    ("data.sources.stdlib.heldout_fraction", 0.6, "0.6 is outside [0, 0.5]"),
    ("data.sources.stdlib.path", 3, "must be a string, got 3 (int)"),
    ("data.workers", -1, "-1 is outside [0, inf)"),
    ("data.prefetch", 1.5, "must be an int"),
    ("data.eval_batches", -1, "-1 is outside [0, inf)"),
    ("optimizer.b1", 1.0, "1.0 is outside [0, 1)"),
    ("optimizer.b2", 1.5, "1.5 is outside [0, 1)"),
    ("optimizer.b2", -0.1, "-0.1 is outside [0, 1)"),
    ("optimizer.b1", "0.9", "must be a number, got '0.9' (str)"),
    ("optimizer.eps", 0.0, "0.0 is outside (0, inf)"),
    ("optimizer.weight_decay", -0.1, "-0.1 is outside [0, inf)"),
    ("optimizer.clip_norm", -1.0, "-1.0 is outside (0, inf) and is not 0 (off)"),
    ("optimizer.clip_norm", float("nan"), "nan is outside (0, inf)"),
    ("optimizer.grad_accum", 0, "0 is outside [1, inf)"),
    ("loss.z_loss", -1e-4, "-0.0001 is outside [0, inf)"),
    ("bad_steps.spike_factor", 0.5, "0.5 is outside (1, inf) and is not 0 (off)"),
    ("bad_steps.spike_factor", 1.0, "1.0 is outside (1, inf)"),
    ("bad_steps.max_in_row", 0, "0 is outside [1, inf)"),
    ("checkpoint.every_steps", 0, "0 is outside [1, inf)"),
    ("checkpoint.keep", 0, "0 is outside [1, inf)"),
    ("checkpoint.async", "yes", "must be a bool"),
    ("init.hf", None, "must be a string, got None"),
    ("init.upcycle_from", 1, "must be a string"),
    ("export_hf_every", -1, "-1 is outside [0, inf)"),
    ("log_every", 0, "0 is outside [1, inf)"),
    ("eval_every", 0, "0 is outside [1, inf)"),
    ("seed", -1, "-1 is outside [0, 2**63)"),
    ("seed", 2**63, "9223372036854775808 is outside [0, 2**63)"),
    ("seed", 1.0, "must be an int, got 1.0 (float)"),
    ("seed", True, "must be an int, got True (bool)"),
]


@pytest.mark.parametrize("key, value, message", BAD, ids=lambda x: str(x)[:40])
def test_out_of_range_values_are_refused_naming_the_key(key, value, message):
    config = _smoke_with(key, value)
    with pytest.raises(ConfigError) as info:
        validate(config)
    text = str(info.value)
    if message.startswith("config."):  # a check of several keys names the one to change
        assert text.startswith(message), text
    else:
        assert text.startswith(f"config.{key}: ") and message in text, text


@pytest.mark.parametrize("key, value", [
    ("optimizer.b2", 0.0), ("optimizer.weight_decay", 0), ("stages.pretrain.lr.end", 0),
    ("stages.pretrain.lr.peak", 1), ("stages.pretrain.lr.decay_fraction", 1),  # ints: numbers
    ("bad_steps.spike_factor", 0), ("bad_steps.spike_factor", 1.5), ("mesh.fsdp", -1),
    ("optimizer.clip_norm", 0.0),
    ("data.sources.stdlib.heldout_fraction", 0.5), ("stages.pretrain.lr.warmup_steps", 6),
    ("stages.pretrain.mixture.stdlib", 2), ("seed", 2**63 - 1), ("tokenizer.max_rank", 256),
])
def test_values_at_the_edges_are_accepted(key, value):
    config = _smoke_with(key, value)
    if key == "mesh.fsdp":
        config.mesh.data = 1  # only one axis may be -1
    validate(config)


def test_override_of_the_wrong_type_names_the_key():
    smoke = os.path.join(ROOT, "jaxllm", "configs", "tiny.py:smoke")
    with pytest.raises(ConfigError, match=r"^config\.optimizer\.grad_accum: must be an int, "
                       r"got 1\.5 \(float\)"):
        load_config(smoke, ["optimizer.grad_accum=1.5"])
    with pytest.raises(ConfigError, match=r"^config\.seed: must be an int, got True"):
        load_config(smoke, ["seed=True"])


def test_cli_refuses_a_bad_value_before_compiling(tmp_path):
    workdir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "jaxllm.main", "--config=configs/tiny.py:smoke",
         f"--workdir={workdir}", "--config.optimizer.b2=1.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "error: config.optimizer.b2: 1.5 is outside [0, 1)" in done.stderr
    assert not workdir.exists()  # refused before the run directory, let alone a compile


def test_split_overrides_takes_both_forms_and_leaves_the_rest():
    argv = ["main", "--workdir=w", "--config=c.py", "--config.seed=3", "--config.model.remat",
            "full", "--config.mesh.data", "-1", "--", "--config.x=1"]
    assert split_overrides(argv) == (["seed=3", "model.remat=full", "mesh.data=-1"],
                                     ["main", "--workdir=w", "--config=c.py", "--",
                                      "--config.x=1"])
    with pytest.raises(ConfigError, match="give a value"):
        split_overrides(["main", "--config.seed", "--workdir=w"])


def test_a_misspelled_key_names_the_closest_one():
    smoke = os.path.join(ROOT, "jaxllm", "configs", "tiny.py:smoke")
    with pytest.raises(ConfigError, match=r"^unknown config key 'stages\.pretrain\.step'; did "
                       r"you mean 'stages\.pretrain\.steps'\?$"):
        load_config(smoke, ["stages.pretrain.step=5"])
    with pytest.raises(ConfigError, match=r"^unknown config key 'modle'; did you mean 'model'"):
        load_config(smoke, ["modle.num_layers=2"])
    with pytest.raises(ConfigError, match=r"unknown variant 'smok'"):
        load_config(smoke[:-1], [])


def test_cli_gives_one_line_for_a_misspelled_key_a_file_as_workdir_or_missing_data(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    for args, message in [
            ([f"--workdir={tmp_path / 'run'}", "--config.stages.pretrain.step=5"],
             "error: unknown config key 'stages.pretrain.step'; did you mean "
             "'stages.pretrain.steps'?\n"),
            ([f"--workdir={afile}", "--config=configs/tiny.py:smoke"],
             f"error: --workdir={afile} is a file; give a directory (new or a run's)\n"),
            ([f"--workdir={tmp_path / 'data_run'}", "--config=configs/tiny.py:smoke",
              "--config.data.sources.stdlib.format=arrayrecord",
              f"--config.data.sources.stdlib.path={tmp_path / 'nothing'}"],
             f"error: data.sources.stdlib.path: '{tmp_path / 'nothing'}' does not exist\n")]:
        done = subprocess.run([sys.executable, "-m", "jaxllm.main", *args], cwd=ROOT,
                              env={**os.environ, "XLA_FLAGS": xla_flags(1)},
                              capture_output=True, text=True, timeout=120)
        assert (done.returncode, done.stderr) == (2, message)
    assert not (tmp_path / "run").exists()


def test_only_a_run_with_a_checkpoint_keeps_its_model_shape(tmp_path):
    smoke = os.path.join(ROOT, "jaxllm", "configs", "tiny.py:smoke")
    four, two = (load_config(smoke, [f"model.num_layers={n}"]) for n in (4, 2))
    check_resumable(str(tmp_path), four)
    check_resumable(str(tmp_path), two)  # stopped before its first checkpoint: a fresh start
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model"]["num_layers"] == 2
    os.makedirs(tmp_path / "checkpoints" / "10" / "state")
    with pytest.raises(ConfigError, match=r"config\.model\.num_layers: the run in .* was "
                       r"started with 2, this command asks for 4"):
        check_resumable(str(tmp_path), four)
    (tmp_path / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    with pytest.raises(ConfigError, match="is not a jaxllm run directory: .* has no 'model'"):
        check_resumable(str(tmp_path), two)  # a Hugging Face model's directory, say


def test_configs_slash_name_is_the_shipped_config_from_any_directory(tmp_path, monkeypatch):
    """`--config=configs/NAME.py` names jaxllm/configs/NAME.py (it ships with the package) from
    any directory, unless a file of that path is where the command runs."""
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/tiny.py:smoke").model.hidden_size == 64
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.py").write_text(
        "from jaxllm.config import base_config\n\n\ndef get_config(arg=None):\n"
        "    c = base_config()\n    c.model.hidden_size = 96\n    return c\n")
    assert load_config("configs/tiny.py").model.hidden_size == 96
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.py")

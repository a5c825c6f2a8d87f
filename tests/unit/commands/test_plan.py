"""`jaxllm.plan`: runs on every config without allocating, and its memory estimate is close."""

import glob
import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from jaxllm.config.load import load_config
from jaxllm.parallel import sharding
from jaxllm.plan import format_plan, make_plan
from jaxllm.train.optim import make_optimizer, make_schedule
from jaxllm.train.stages import init_train_state, stage_model_config
from jaxllm.train.step import make_train_step
from tests.helpers.runs import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "jaxllm", "configs", "[!_]*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_plan_runs_on_every_config(path):
    start = time.perf_counter()
    plan = make_plan(load_config(path), 8)
    assert time.perf_counter() - start < 30  # "in seconds", with a wide margin for slow CI
    b = plan["bytes_per_device"]
    assert b["total"] == pytest.approx(b["params"] + b["optimizer"] + b["gradients"]
                                       + b["activations"])
    if load_config(path).model.num_experts:
        assert 0 < plan["params_active"] < plan["params_total"]
    else:
        assert plan["params_active"] == plan["params_total"] > 0
    assert set(plan["fits"]) == {"v5p", "v6e", "h100"}


def test_the_mesh_line_names_its_split_axes_or_none():
    tiny = load_config(os.path.join(ROOT, "jaxllm", "configs", "tiny.py"))
    assert "mesh            1 device: no axis split\n" in format_plan(make_plan(tiny, 1))
    tiny.mesh.data = 8
    assert "mesh            8 devices: data=8\n" in format_plan(make_plan(tiny, 8))


@pytest.mark.parametrize("variant, devices, chip", [("v5p_256", 128, "v5p"),
                                                     ("h100_64", 64, "h100")])
def test_qwen2_72b_documented_meshes_fit(variant, devices, chip):
    config = load_config(os.path.join(ROOT, "jaxllm", "configs", f"qwen2_72b.py:{variant}"))
    plan = make_plan(config, devices)
    assert plan["params_total"] == pytest.approx(72.7e9, rel=0.005)
    shards = plan["mesh"]["fsdp"] * plan["mesh"]["sequence"] * plan["mesh"]["tensor"]
    assert plan["bytes_per_device"]["params"] == pytest.approx(72.7e9 * 4 / shards, rel=0.01)
    assert plan["fits"][chip]


@pytest.mark.parametrize("name, variant, devices, total, active", [
    ("qwen2_57b_a14b", "v5p_256", 128, 57.4e9, 14.2e9),
    ("qwen2_57b_a14b", "h100_128", 128, 57.4e9, 14.2e9),
    ("qwen1_5_moe_a2_7b", "v5p_32", 16, 14.3e9, 2.7e9),
    ("qwen1_5_moe_a2_7b", "h100_16", 16, 14.3e9, 2.7e9)])
def test_moe_counts_and_documented_meshes(name, variant, devices, total, active):
    """Published total and active parameters (within 0.5 %); FLOPs per token count the active
    ones; the documented meshes fit their chips."""
    config = load_config(os.path.join(ROOT, "jaxllm", "configs", f"{name}.py:{variant}"))
    plan = make_plan(config, devices)
    assert plan["params_total"] == pytest.approx(total, rel=0.005)
    assert plan["params_active"] == pytest.approx(active, rel=0.005)
    embed = config.model.vocab_size * config.model.hidden_size  # the input table is no matmul
    matmul = plan["params_active"] - embed - sum(  # nor are norms and biases
        config.model.num_layers * k for k in (2 * config.model.hidden_size, (
            config.model.num_heads + 2 * config.model.num_kv_heads) * config.model.head_dim))
    attention = 12 * config.model.num_layers * config.model.num_heads * config.model.head_dim
    assert plan["flops_per_token"] == pytest.approx(6 * matmul + attention * 4096, rel=1e-3)
    assert plan["fits"]["v5p" if variant.startswith("v5p") else "h100"]


def test_plan_shows_qwen2_7b_upcycled_into_57b_a14b(tmp_path):
    """The dense source's config.json alone (no weights) is enough for plan to check the pair
    and say how the experts are cut."""
    from jaxllm.convert.hf_config import config_to_hf

    dense = load_config(os.path.join(ROOT, "jaxllm", "configs", "qwen2_7b.py")).model
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config_to_hf(dense, "bfloat16"), f)
    out = subprocess.run(
        [sys.executable, "-m", "jaxllm.plan", "--config=configs/qwen2_57b_a14b.py:v5p_256",
         "--devices=128", f"--config.init.upcycle_from={tmp_path}"], cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("each dense FFN of 18944 units copied 9 times, shuffled, cut into 64 experts of "
            "2560 (6656 units discarded), 1280 units of each expert re-initialised") in out.stdout
    assert "57.409B total, 14.249B active" in out.stdout


def test_cli_json():
    env = {**os.environ, "XLA_FLAGS": ""}
    out = subprocess.run([sys.executable, "-m", "jaxllm.plan", "--config=configs/qwen2_7b.py",
                          "--devices=64", "--json"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    plan = json.loads(out)
    assert {"params_total", "params_active", "flops_per_token", "bytes_per_device"} <= set(plan)
    assert set(plan["bytes_per_device"]) == {"params", "optimizer", "gradients", "activations",
                                             "total"}
    assert plan["mesh"]["fsdp"] == 64


def compiled_peak_bytes(config, stage_name):
    """What XLA allocates for the stage's train step: arguments + temporaries + outputs."""
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    stage = config.stages[stage_name]
    with sharding.use_mesh(mesh):
        state, _ = init_train_state(config, mesh)
        step = jax.jit(make_train_step(stage_model_config(config, stage_name),
                                       make_optimizer(config.optimizer),
                                       make_schedule(stage.lr, 10), 0, 1, 0.0), donate_argnums=0)
        shape = (stage.batch_size, stage.seq_len)
        batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32)
                 for k in ("inputs", "targets", "positions", "segment_ids")}
        batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32)
        m = step.lower(state, batch).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes)


@pytest.mark.parametrize("stage_name", ["pretrain", "long_context"])
def test_tiny_memory_estimate_within_25_percent_of_the_compiled_step(stage_name):
    config = load_config(os.path.join(ROOT, "jaxllm", "configs", "tiny.py"), ["mesh.data=1"])
    plan = make_plan(config, 1)
    b = plan["bytes_per_device"]
    estimate = (b["params"] + b["optimizer"] + b["gradients"]
                + plan["stages"][stage_name]["activation_bytes"])
    measured = compiled_peak_bytes(config, stage_name)
    assert estimate == pytest.approx(measured, rel=0.25), (estimate / 1e6, measured / 1e6)


# The compiler's per-device total of each stage's train step, for every mesh variant of the
# shipped configs (docs/compiling.md; benchmarks/compile_table.py,
# 2026-12-04): TPU rows from jax 0.12.0.1 with libtpu 0.0.52, GPU rows from jax 0.10.2 with
# jax-cuda13-plugin 0.10.2, the compilers whose figures agree with their own buffer
# assignments. Recompile and update them when the step changes.
COMPILED_GIB = {
    ("configs/qwen2_72b.py:v5p_256", 128): {"pretrain": 27.57, "long_context": 27.29,
                                            "anneal": 27.29},
    ("configs/qwen2_72b.py:h100_64", 64): {"pretrain": 46.50, "long_context": 46.49,
                                           "anneal": 46.49},
    ("configs/qwen2_57b_a14b.py:v5p_256", 128): {"pretrain": 45.81, "long_context": 45.45,
                                                 "anneal": 45.45},
    ("configs/qwen2_57b_a14b.py:h100_128", 128): {"pretrain": 40.3, "long_context": 40.3,
                                                  "anneal": 40.3},
    ("configs/qwen1_5_moe_a2_7b.py:v5p_32", 16): {"pretrain": 46.88, "long_context": 46.26,
                                                  "anneal": 46.26},
    ("configs/qwen1_5_moe_a2_7b.py:h100_16", 16): {"pretrain": 44.21, "long_context": 44.2,
                                                   "anneal": 44.2},
}


@pytest.mark.parametrize("config,devices", COMPILED_GIB, ids=lambda x: str(x))
def test_plan_is_within_15_percent_of_the_compiler(config, devices):
    plan = make_plan(load_config(config), devices)
    compiled = max(COMPILED_GIB[config, devices].values()) * 2**30
    assert plan["bytes_per_device"]["total"] == pytest.approx(compiled, rel=0.15)


def test_every_mesh_variant_has_compiler_figures():
    """A new mesh variant needs its compiled figures above (and a row in docs/compiling.md)."""
    variants = set()
    for path in CONFIGS:
        spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        variants |= {f"configs/{os.path.basename(path)}:{v}" for v in getattr(module, "MESHES", {})}
    assert variants == {config for config, _ in COMPILED_GIB}

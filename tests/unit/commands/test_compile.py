"""`jaxllm.compile`: the train step compiled ahead of time for an 8-chip TPU v5p slice and 8
deviceless H100s, on this CPU machine, and read off the compiled program.

The TPU and GPU tests need the `aot` extra (libtpu, XLA's CUDA plugin): without it they skip,
saying so. What they assert is in the optimised HLO text: the target's Pallas kernels on
per-device blocks, ring attention's collective-permutes and no all-gather of anything
token-sized, expert parallelism's ragged-all-to-all, and per-device memory under a bound.
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest

from jaxllm.compile.flops import jaxpr_flops
from jaxllm.compile.program import compile_stages, count_collectives, count_kernels
from jaxllm.compile.targets import (
    TargetError,
    compile_only_devices,
    gpu_target_config,
    known_targets,
    parse_target,
)
from jaxllm.config.load import load_config
from tests.helpers.runs import ROOT

GiB = 2**30


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


HAS_LIBTPU = _installed("libtpu")
HAS_CUDA_PLUGIN = _installed("jax_plugins.xla_cuda13")
needs_tpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install "
                               "'.[aot]'): TPU compiles not checked")
needs_gpu = pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="XLA's CUDA plugin not installed "
                               "(pip install '.[aot]'): GPU compiles not checked")
TARGETS = {"tpu": pytest.param("v5p-16", marks=needs_tpu, id="v5p"),
           "gpu": pytest.param("h100x8", marks=needs_gpu, id="h100")}

# Smoke-sized tiny with a length whose per-device and whole sizes (256, 512) are no weight's
# dimension, so that an all-gather of a token-sized array shows in its shape.
SEQ_LEN, RING = 512, ("mesh.data=2", "mesh.fsdp=1", "mesh.tensor=2", "mesh.sequence=2")
_cache: dict = {}


def _compile(target: str, config: str, *overrides: str):
    """The pretrain train step of `config` compiled for `target` ("cpu": this machine's 8
    devices); one compile per combination for the module."""
    key = (target, config, overrides)
    if key not in _cache:
        c = load_config(config, [f"stages.pretrain.seq_len={SEQ_LEN}", *overrides])
        if target == "cpu":
            devices, memory = jax.devices()[:8], 24 * GiB
        else:
            t = parse_target(target)
            devices, memory = compile_only_devices(t), t.device_memory
        [report] = compile_stages(c, devices, memory, ["pretrain"], eval_step=False)
        _cache[key] = report
    return _cache[key]


def _kernel_calls(hlo: str, kind: str) -> list[str]:
    marker = {"mosaic": "tpu_custom_call", "triton": "__gpu$xla.gpu.triton"}[kind]
    return [line for line in hlo.splitlines() if f'custom_call_target="{marker}"' in line]


def _result_shapes(line: str) -> list[tuple[int, ...]]:
    """The shapes of an HLO instruction's result: `%x = (f32[2,4]{1,0}, s32[]) op(...)`."""
    result = re.search(r"= (.*?) [a-z][\w-]*\(", line)[1]
    return [tuple(int(d) for d in dims.split(",") if d)
            for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", result)]


def _all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
    shapes = []
    for line in hlo.splitlines():
        if re.search(r"\ball-gather(-start)?\(", line):
            shapes += _result_shapes(line)
    return shapes


# -- the kernels follow the devices the step is compiled for ------------------------------------

@pytest.mark.parametrize("target", [*TARGETS.values(), "cpu"])
def test_kernels_follow_the_target(target):
    """The same step, attention_impl=pallas, tiny on data 2 × tensor 2 × sequence 2: Mosaic
    kernels for the v5p, Triton kernels for the H100s, interpreted ones (plain HLO) on CPU;
    each on its device's block: batch 4/2, heads 4/2 (kv 2/2), length 512/2, head_dim 16."""
    r = _compile(target, "configs/tiny.py:smoke", "model.attention_impl=pallas", *RING)
    mosaic, triton = _kernel_calls(r.hlo, "mosaic"), _kernel_calls(r.hlo, "triton")
    if target == "cpu":
        assert not mosaic and not triton
        assert "flash_attention" in r.hlo  # the interpreted kernel's ops, by their names
        return
    calls = mosaic if target.startswith("v5p") else triton
    assert calls and not (triton if target.startswith("v5p") else mosaic)
    assert r.kernels == {"mosaic": len(mosaic), "triton": len(triton)}
    # Every kernel result is a per-device block (outputs, statistics, gradients): 2 rows and
    # the device's 256 tokens or a half of them (ring attention's causal halves), never the
    # whole 4 rows or 512 tokens.
    for line in calls:
        for shape in _result_shapes(line):
            assert shape[0] == 2 and {128, 256} & set(shape) and 512 not in shape, line[:200]


@pytest.mark.parametrize("target", TARGETS.values())
def test_ring_attention_permutes_and_gathers_no_tokens(target):
    """Ring attention over sequence 2 passes K/V blocks with collective-permute; no all-gather
    returns more of a row's tokens than the device's 256 (a dimension of 512, a row, or of
    1,024 or 2,048, rows × length merged): not K/V, not the embeddings, not the activations
    of a weight gradient. Per-device memory is small."""
    r = _compile(target, "configs/tiny.py:smoke", "model.attention_impl=pallas", *RING)
    assert r.collectives.get("collective-permute", 0) >= 2
    gathered = _all_gather_shapes(r.hlo)
    assert gathered, "FSDP-style weight gathers were expected"
    tokens = {SEQ_LEN, 2 * SEQ_LEN, 4 * SEQ_LEN}
    assert not [s for s in gathered if tokens & set(s)], gathered
    assert r.fits and r.total < 64 * 2**20, r.total


@pytest.mark.parametrize("target", TARGETS.values())
def test_expert_parallel_moe(target):
    """tiny_moe on expert 4 × data 2: grouped-matmul kernels of the target; on TPU the tokens
    travel to their experts' devices by ragged-all-to-all."""
    r = _compile(target, "configs/tiny_moe.py:smoke", "mesh.data=2", "mesh.fsdp=1",
                 "mesh.expert=4", "stages.pretrain.batch_size=8", "stages.long_context.steps=0",
                 "stages.anneal.steps=0")
    kind = "mosaic" if target.startswith("v5p") else "triton"
    assert r.kernels[kind] > 0
    if target.startswith("v5p"):
        assert r.collectives.get("ragged-all-to-all", 0) >= 4, r.collectives
    # Dropless exchange: each device's receive buffers hold expert × its 1,024 routed rows
    # (any device may get them all), saved per layer for the backward: ~60 MiB of the ~76.
    assert r.fits and r.total < 96 * 2**20, r.total


@needs_tpu
def test_qwen2_7b_pretrain_fits_a_v5p_64_slice():
    """One full-size step: Qwen2-7B pretraining on fsdp 32 (its config's mesh over v5p-64's 32
    chips), 131,072 tokens a chip: the whole train state split 32 ways, flash attention's
    Mosaic kernels, and under the chip's 95 GiB (about a minute on 2 cores)."""
    config = load_config(os.path.join(ROOT, "jaxllm", "configs", "qwen2_7b.py"))
    target = parse_target("v5p-64")
    [r] = compile_stages(config, compile_only_devices(target), target.device_memory,
                         ["pretrain"], eval_step=False)
    params = 7.615e9  # Qwen2-7B's parameters; with Adam's two moments, 12 bytes each
    assert r.arguments == pytest.approx(12 * params / 32, rel=0.01), r.arguments / GiB
    assert r.kernels["mosaic"] >= 3 and r.collectives["all-gather"] > 0
    assert r.fits, (r.total / GiB, r.error)


# -- the command: a report, JSON, and one line for each kind of bad input -----------------------

def _command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxllm.compile", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@needs_tpu
def test_command_json_on_v5p():
    p = _command("--config=configs/tiny.py:smoke", "--target=v5p-8", "--json",
                 "--config.mesh.fsdp=4", "--config.stages.long_context.batch_size=4",
                 "--config.stages.anneal.batch_size=4")
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert (out["target"], out["devices"]) == ("v5p-8", 4)
    [stage] = [s for s in out["stages"] if s["stage"] == "pretrain"]
    assert stage["fits"] and stage["eval"]["fits"]
    b = stage["bytes_per_device"]
    assert b["total"] == b["arguments"] + b["outputs"] + b["temporaries"] > 0
    assert stage["kernels"]["mosaic"] > 0 and stage["collectives"]["all-gather"] > 0
    assert {s["stage"] for s in out["stages"]} == {"pretrain", "long_context", "anneal"}
    # The traced FLOPs count every layer, kernel and recompute: at least the model's own, more
    # where the kernels pad (32 and 64 tokens to TPU blocks of 128: the shorter, the more).
    ratios = [s["flops_per_step"] / s["model_flops_per_step"] for s in out["stages"]]
    assert all(1.0 <= r < 3.0 for r in ratios) and ratios[0] > ratios[1], ratios
    # What a step would take at 40 % / 55 % of 4 v5p chips' rated 459 TFLOP/s each.
    assert stage["step_seconds_at_mfu"] == pytest.approx(
        {f"{m:.0%}": stage["model_flops_per_step"] / (m * 459e12 * 4) for m in (0.4, 0.55)})


@needs_tpu
def test_command_does_not_fit_names_the_stage():
    """A 2-layer model of Qwen2-72B's width on one v5e chip (16 GiB): exit 1, one line."""
    p = _command("--config=configs/tiny.py:smoke", "--target=v5e-1", "--stage=pretrain",
                 "--eval=false", "--config.model.num_layers=2",
                 "--config.model.hidden_size=8192", "--config.model.intermediate_size=29568",
                 "--config.model.vocab_size=152064", "--config.model.num_heads=64",
                 "--config.model.num_kv_heads=8", "--config.model.head_dim=128",
                 "--config.tokenizer.max_rank=0")
    assert p.returncode == 1, p.stderr[-2000:]
    [line] = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert "does not fit: stage pretrain (train step)" in line and "v5e-1" in line


def test_command_bad_target_is_one_line():
    p = _command("--config=configs/tiny.py:smoke", "--target=v5p-7")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert p.stderr.startswith("error: --target=v5p-7: v5p slices count TensorCores")
    assert "known targets" in p.stderr and "h100x" in p.stderr


@pytest.mark.parametrize("target,module,package", [("v5p-8", "libtpu", "libtpu"),
                                                   ("h100x8", "jax_plugins.xla_cuda13",
                                                    "CUDA plugin")])
def test_missing_compiler_names_the_pip_command(monkeypatch, target, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    match = rf"{package}.*not installed: pip install 'jaxllm\[aot\]'"
    with pytest.raises(TargetError, match=match):
        compile_only_devices(parse_target(target))


# -- the pieces ----------------------------------------------------------------------------------

def test_parse_target():
    v5p = parse_target("v5p-256")
    assert (v5p.platform, v5p.devices, v5p.shape, v5p.device_memory) == (
        "tpu", 128, (4, 4, 8), 95 * GiB)
    assert parse_target("v5e-8").shape == (2, 4) and parse_target("v4-8").devices == 4
    h = parse_target("h100x64")
    assert (h.platform, h.devices, h.shape) == ("gpu", 64, (8, 8))
    assert parse_target("h200x8").device_memory > parse_target("h100x8").device_memory
    for bad in ("v5p-7", "v5e-3", "h100x12", "a100x8", "tpu"):
        with pytest.raises(TargetError, match="known targets"):
            parse_target(bad)
    assert all(parse_target(name).name == name for name in known_targets())


def test_h200_spec_differs_in_memory_only():
    h100, h200 = gpu_target_config("h100"), gpu_target_config("h200")
    changed = {a.split(":")[0].strip() for a, b in zip(h100.splitlines(), h200.splitlines(),
                                                      strict=True) if a != b}
    assert {"device_memory_size", "memory_bandwidth"} <= changed <= {
        "device_memory_size", "memory_bandwidth", "device_description_str", "name",
        "model_str"}


def test_count_collectives_and_kernels():
    hlo = """
  %all-gather-start.1 = (f32[4]{0}, f32[8]{0}) all-gather-start(%p), dimensions={0}
  %all-gather-done.1 = f32[8]{0} all-gather-done(%all-gather-start.1)
  %ag.2 = f32[8]{0} all-gather(%all-gather-done.1), dimensions={0}
  %r = f32[8]{0} all-reduce(%ag.2), to_apply=%add
  %x = f32[8]{0} ragged-all-to-all(%r, %o, %a, %b, %c, %d)
  %k = f32[8]{0} custom-call(%x), custom_call_target="tpu_custom_call"
"""
    assert count_collectives(hlo) == {"all-gather": 2, "all-reduce": 1, "ragged-all-to-all": 1}
    assert count_kernels(hlo) == {"mosaic": 1, "triton": 0}


def test_jaxpr_flops_counts_matmuls_scans_and_kernels():
    def f(x, w):
        def body(c, _):
            return c @ w, None
        return jax.lax.scan(body, x, None, length=3)[0].sum()

    x, w = jax.ShapeDtypeStruct((8, 16), "float32"), jax.ShapeDtypeStruct((16, 16), "float32")
    forward = jaxpr_flops(jax.make_jaxpr(f)(x, w).jaxpr)
    assert forward.flops == 3 * 2 * 8 * 16 * 16 and forward.uncounted == 0
    backward = jaxpr_flops(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, w).jaxpr)
    assert backward.flops == 3 * forward.flops  # forward, then dx and dw


def test_loss_chunks_stay_split_over_sequence():
    """fsdp 2 × sequence 4, as Qwen2-72B on v5p-256: the loss's chunk of hidden states is not
    gathered over sequence, so each device forms only its own tokens' logits: 4 rows × 128 of
    a chunk's 512 tokens a row, not all 512 (the chunk merged into rows × length was)."""
    c = load_config("configs/tiny.py", ["mesh.data=1", "mesh.fsdp=2", "mesh.sequence=4",
                                        "stages.pretrain.seq_len=2048",
                                        "stages.pretrain.batch_size=8", "loss.chunk_size=512",
                                        "stages.long_context.steps=0", "stages.anneal.steps=0"])
    [r] = compile_stages(c, jax.devices()[:8], 24 * GiB, ["pretrain"], eval_step=False)
    logits = set(re.findall(r"f32\[([\d,]+),8256\]", r.hlo))  # V = 8,256: tiny's vocabulary
    assert logits and all(math.prod(map(int, dims.split(","))) == 4 * 128 for dims in logits), \
        logits

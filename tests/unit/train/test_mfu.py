"""MFU as the field reports it: model FLOPs (PaLM's count, or the causal half) over the chips'
rated dense peak, matched from `device_kind`; on CPU a measured peak, labelled so, that cannot
put mfu above 1."""

from __future__ import annotations

import pytest

from jaxllm.config.load import load_config
from jaxllm.train import metrics
from tests.helpers.runs import records


@pytest.mark.parametrize("device_kind, chip, bf16", [
    ("TPU v4", "tpu_v4", 275e12),
    ("TPU v5 lite", "tpu_v5e", 197e12),
    ("TPU v5e", "tpu_v5e", 197e12),
    ("TPU v5", "tpu_v5p", 459e12),
    ("TPU v5p", "tpu_v5p", 459e12),
    ("TPU v6 lite", "tpu_v6e", 918e12),
    ("NVIDIA A100-SXM4-80GB", "a100", 312e12),
    ("NVIDIA A100-PCIE-40GB", "a100", 312e12),
    ("NVIDIA H100 80GB HBM3", "h100_sxm", 989e12),
    ("NVIDIA H100 PCIe", "h100_pcie", 756e12),
    ("NVIDIA H100 NVL", "h100_nvl", 835e12),
    ("NVIDIA H200", "h200", 989e12),
    ("cpu", None, None),
    ("TPU v3", None, None),
])
def test_the_rated_peak_of_each_device_kind(device_kind, chip, bf16):
    assert metrics.chip_of(device_kind) == chip
    if chip is not None:
        assert metrics.rated_peak(chip, "bfloat16") == metrics.rated_peak(chip, "float32") == bf16


class _Device:
    def __init__(self, kind):
        self.device_kind = kind


def test_peak_is_rated_on_known_chips_and_measured_on_cpu(monkeypatch):
    peak, kind, line = metrics.peak_flops("bfloat16", [_Device("TPU v5 lite")] * 4)
    assert (peak, kind) == (4 * 197e12, "rated") and "4 × TPU v5e (197 TFLOP/s each)" in line
    assert metrics.peak_flops("float8_e4m3fn", [_Device("NVIDIA H200")] * 8)[0] == 8 * 1979e12
    monkeypatch.setattr(metrics, "measure_peak_flops", lambda dtype: 5e9)
    peak, kind, line = metrics.peak_flops("float32")  # this machine's CPU devices
    assert (peak, kind) == (5e9, "measured") and "cpu has no rated peak" in line


def test_a_measured_peak_rises_to_what_the_run_reaches():
    measured = metrics.Mfu(1e9, "measured")
    assert measured(5e8) == 0.5 and measured(3e9) == 1.0 and measured(1.5e9) == 0.5
    assert measured.label_once() == {"mfu_peak": "measured"} and measured.label_once() == {}
    rated = metrics.Mfu(1e9, "rated")
    assert rated(2e9) == 2.0  # a rated peak is the chip's, whatever the run reports


def test_mfu_on_cpu_stays_at_most_1_when_the_peak_was_measured_under_load(tmp_path,
                                                                         monkeypatch):
    """The peak measured while something else loaded the machine (here: injected, 1 MFLOP/s):
    the run's mfu is still at most 1, its first record says the peak was measured."""
    from jaxllm.train import stages

    monkeypatch.setattr(metrics, "measure_peak_flops", lambda dtype: 1e6)
    config = load_config("configs/tiny.py:smoke", [
        "stages.long_context.steps=0", "stages.anneal.steps=0", "stages.pretrain.batch_size=8",
        "log_every=1",
        "checkpoint.async=False", "eval_every=100"])
    stages.run(config, str(tmp_path))
    train = [r for r in records(tmp_path) if "mfu" in r]
    assert len(train) == 6 and all(0 < r["mfu"] <= 1 for r in train)
    assert train[0]["mfu_peak"] == "measured" and all("mfu_peak" not in r for r in train[1:])


def test_flops_per_token_palm_and_causal_for_llama2_7b():
    m = load_config("configs/llama2_7b.py").model
    L, D, N, K, H, F, V, T = 32, 4096, 32, 32, 128, 11008, 32000, 4096
    assert (m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim,
            m.intermediate_size, m.vocab_size) == (L, D, N, K, H, F, V)
    matmul = L * (D * (N + 2 * K) * H + N * H * D + 3 * D * F) + D * V
    palm = 6 * matmul + 12 * L * N * H * T
    assert metrics.flops_per_token(m, T) == palm
    assert metrics.flops_per_token(m, T, "causal") == palm - 6 * L * N * H * T
    with pytest.raises(ValueError, match="convention"):
        metrics.flops_per_token(m, T, "megatron")


def test_plan_gives_a_step_time_at_40_and_55_percent_mfu():
    from jaxllm.plan import make_plan

    config = load_config("configs/qwen2_7b.py:v5p_64")
    stage = make_plan(config, 32)["stages"]["pretrain"]
    flops = stage["flops_per_token"] * stage["tokens_per_step"]
    assert stage["step_seconds"]["v5p"] == pytest.approx(
        {"40%": flops / (0.40 * 459e12 * 32), "55%": flops / (0.55 * 459e12 * 32)})
    assert stage["step_seconds"]["h100"]["40%"] == pytest.approx(flops / (0.40 * 989e12 * 32))

"""Training telemetry: FLOPs per token, MFU, metrics.jsonl, TensorBoard and progress.

MFU is PaLM's: model FLOPs per token (`flops_per_token`, attention counted in full or, with
`convention="causal"`, halved) times tokens/s, over the chips' rated dense peak
(`RATED_PEAKS`, by `device_kind`); where no peak is rated (CPUs) over a measured matmul peak,
labelled "measured". Only process 0 writes. On a terminal a tqdm bar shows loss, tokens/s and
MFU; otherwise one plain log line per logged step, which is what a cluster log wants.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np


def ffn_widths(model_cfg: mc.ConfigDict) -> tuple[float, float]:
    """(all, active per token) SwiGLU widths summed over layers: a dense layer counts F, a
    sparse one E·F_e + F_shared, of which K·F_e + F_shared run for a token."""
    m = model_cfg
    if not m.num_experts:
        return (m.num_layers * m.intermediate_size,) * 2
    sparse = m.num_layers // m.decoder_sparse_step
    dense = (m.num_layers - sparse) * m.intermediate_size
    shared = sparse * m.shared_expert_intermediate_size
    return (dense + shared + sparse * m.num_experts * m.moe_intermediate_size,
            dense + shared + sparse * m.num_experts_per_tok * m.moe_intermediate_size)


FLOPS_CONVENTIONS = ("palm", "causal")


def flops_per_token(model_cfg: mc.ConfigDict, seq_len: int, convention: str = "palm") -> float:
    """Training FLOPs per token: 6·(matmul params) + 12·L·N·H·T, PaLM's count (every query
    against every key; MaxText's figures and the PaLM / Chinchilla papers count so), or with
    `convention="causal"` 6·L·N·H·T (the causal half, as Megatron counts). For MoE models the
    matmul params a token uses (its experts, the shared expert, the router)."""
    if convention not in FLOPS_CONVENTIONS:
        raise ValueError(f"flops convention {convention!r}: use one of {FLOPS_CONVENTIONS}")
    m = model_cfg
    D, L, N, K, H, V = (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim,
                        m.vocab_size)
    router = (L // m.decoder_sparse_step) * D * (m.num_experts + 1) if m.num_experts else 0
    matmul_params = (L * (D * (N + 2 * K) * H + N * H * D) + 3 * D * ffn_widths(m)[1] + router
                     + D * V)  # the output head is a matmul even when tied
    attention = 12.0 * L * N * H * seq_len
    return 6.0 * matmul_params + (attention / 2 if convention == "causal" else attention)


@dataclasses.dataclass(frozen=True)
class RatedPeak:
    """A chip's rated dense peak (FLOP/s, without sparsity), from its vendor's data sheet."""

    name: str
    bf16: float
    fp8: float | None = None


RATED_PEAKS = {
    "tpu_v4": RatedPeak("TPU v4", 275e12),
    "tpu_v5e": RatedPeak("TPU v5e", 197e12),
    "tpu_v5p": RatedPeak("TPU v5p", 459e12),
    "tpu_v6e": RatedPeak("TPU v6e", 918e12),
    "a100": RatedPeak("NVIDIA A100", 312e12),
    "h100_sxm": RatedPeak("NVIDIA H100 SXM", 989e12, 1979e12),
    "h100_pcie": RatedPeak("NVIDIA H100 PCIe", 756e12, 1513e12),
    "h100_nvl": RatedPeak("NVIDIA H100 NVL", 835e12, 1671e12),
    "h200": RatedPeak("NVIDIA H200", 989e12, 1979e12),
}
# device_kind as JAX reports it on TPUs (v5e and v6e say "lite", v5p says "TPU v5").
_TPU_KINDS = {"tpu v4": "tpu_v4", "tpu v5 lite": "tpu_v5e", "tpu v5e": "tpu_v5e",
              "tpu v5": "tpu_v5p", "tpu v5p": "tpu_v5p", "tpu v6 lite": "tpu_v6e",
              "tpu v6e": "tpu_v6e"}


def chip_of(device_kind: str) -> str | None:
    """RATED_PEAKS' key for a `jax.Device.device_kind` ("TPU v5 lite", "NVIDIA H100 80GB
    HBM3", "NVIDIA A100-SXM4-80GB", ...); None for one it does not know (CPUs)."""
    kind = device_kind.lower().strip()
    if kind in _TPU_KINDS:
        return _TPU_KINDS[kind]
    if "h200" in kind:
        return "h200"
    if "h100" in kind:
        return "h100_pcie" if "pcie" in kind else "h100_nvl" if "nvl" in kind else "h100_sxm"
    if "a100" in kind:
        return "a100"
    return None


def rated_peak(chip: str, dtype: str) -> float:
    """One chip's rated peak for matmuls in `dtype`: fp8's where the chip has it, bf16's for
    every other dtype (float32 models are measured against it too, as elsewhere)."""
    peak = RATED_PEAKS[chip]
    return peak.fp8 if "float8" in dtype and peak.fp8 else peak.bf16


def peak_flops(dtype: str, devices: list | None = None) -> tuple[float, str, str]:
    """(peak FLOP/s of all `devices` (default: the run's), "rated" or "measured", a line
    saying which): the chips' rated peak, or on a device kind with none a measured one."""
    devices = devices if devices is not None else jax.devices()
    chip = chip_of(devices[0].device_kind)
    if chip is not None:
        each = rated_peak(chip, dtype)
        return (each * len(devices), "rated", f"mfu: against the rated peak of {len(devices)} "
                f"× {RATED_PEAKS[chip].name} ({each / 1e12:.0f} TFLOP/s each)")
    measured = measure_peak_flops(dtype)
    return (measured, "measured", f"mfu: {devices[0].device_kind} has no rated peak; against a "
            f"measured {dtype} matmul peak ({measured / 1e12:.3g} TFLOP/s), raised to any rate "
            "the run reaches above it, so mfu stays at most 1")


PLANNED_MFU = (0.40, 0.55)  # what `plan` and `compile` turn into step times


def step_seconds(flops_per_step: float, devices: int, chip: str) -> dict[str, float]:
    """{"40%": s, "55%": s}: a step of `flops_per_step` model FLOPs on `devices` chips (a
    RATED_PEAKS key) at each of PLANNED_MFU."""
    peak = rated_peak(chip, "bfloat16") * devices
    return {f"{mfu:.0%}": flops_per_step / (mfu * peak) for mfu in PLANNED_MFU}


def format_seconds(times: dict[str, float]) -> str:
    """'1.23 s / 0.891 s' of step_seconds."""
    return " / ".join(f"{t:.3g} s" if t >= 1e-3 else f"{t * 1e3:.3g} ms" for t in times.values())


class Mfu:
    """achieved FLOP/s → MFU against `peak`; a measured peak rises to any rate achieved above
    it (the machine showed it can: the measurement ran while something else loaded it)."""

    def __init__(self, peak: float, kind: str):
        self.peak, self.kind, self.labelled = peak, kind, False

    def __call__(self, achieved: float) -> float:
        if self.kind == "measured" and achieved > self.peak:
            self.peak = achieved
        return achieved / self.peak

    def label_once(self) -> dict[str, str]:
        """{"mfu_peak": "rated" | "measured"} for the run's first record, then {}."""
        first, self.labelled = not self.labelled, True
        return {"mfu_peak": self.kind} if first else {}


@functools.cache
def measure_peak_flops(dtype: str, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a size² matmul on each device times the device count: the fastest of
    `repeats` runs, measured once per process (a value kept on disk would outlive the load
    the machine was under when it was measured, and MFU would read above 1)."""
    device = jax.devices()[0]
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        fastest = min(fastest, time.perf_counter() - start)
    # Fake CPU devices share the same cores: count the host once, not per device.
    devices = 1 if device.platform == "cpu" else jax.device_count()
    return 2.0 * size**3 / fastest * devices


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported only where needed (process 0).

    tensorboardX imports torch, when it is installed, only to accept torch tensors: 2-4 s at
    every start of a run. This writer passes it Python numbers, so torch is hidden for that
    import (unless something imported it already) and stays importable afterwards.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError: tensorboardX goes without
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


def read_metrics(workdir: str) -> Iterator[dict]:
    """The records of a run's metrics.jsonl (none if it has none), in order; a line that a
    crash cut short is skipped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def logged_steps(workdir: str, prefixes: list[str]) -> dict[str, set[int]]:
    """For each prefix, the steps whose records in metrics.jsonl have a value named with it;
    read by process 0 (the only writer) and sent to every process, so that all agree."""
    steps: dict[str, set[int]] = {p: set() for p in prefixes}
    if jax.process_index() == 0 and prefixes:
        for record in read_metrics(workdir):
            for prefix in prefixes:
                if any(k.startswith(prefix) for k in record):
                    steps[prefix].add(int(record["step"]))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        text = json.dumps({p: sorted(s) for p, s in steps.items()}).encode()
        size = int(multihost_utils.broadcast_one_to_all(np.int32(len(text))))
        data = np.zeros(size, np.uint8)
        if jax.process_index() == 0:
            data[:] = np.frombuffer(text, np.uint8)
        data = multihost_utils.broadcast_one_to_all(data)
        steps = {p: set(s) for p, s in json.loads(np.asarray(data).tobytes()).items()}
    return steps


class MetricsWriter:
    """metrics.jsonl (appended on resume), TensorBoard events and progress, on process 0."""

    def __init__(self, workdir: str, total_steps: int, initial_step: int = 0):
        self.active = jax.process_index() == 0
        self.bar = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.tb = _summary_writer_class()(logdir=workdir)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step",
                            dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        flat = dict(record)
        for name, value in record.items():  # one level of nesting: epoch of each source
            if isinstance(value, dict):
                flat.update({f"{name}/{k}": v for k, v in value.items()})
        for name, value in flat.items():
            if isinstance(value, int | float) and name != "step":
                self.tb.add_scalar(f"{record['stage']}/{name}" if name == "lr" else name,
                                   value, record["step"])
        self.tb.flush()
        if self.bar is None:
            shown = {k: v for k, v in record.items() if k != "step"}
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in shown.items())
            print(f"step {record['step']}: {text}", flush=True)
        elif "loss" in record:
            self.bar.set_postfix(stage=record["stage"], loss=f"{record['loss']:.3f}",
                                 tok_s=f"{record['tokens_per_sec']:.0f}",
                                 mfu=f"{record['mfu']:.1%}")

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        self.tb.close()

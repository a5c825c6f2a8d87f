"""`python -m jaxllm.compile --config=configs/NAME.py[:VARIANT] --target=TARGET [--stage=NAME]
[--json] [--config.KEY=VALUE ...]`: will this config fit and run on that hardware?

Compiles, on this machine, each stage's train and eval steps exactly as `jaxllm.main` would
run them on TARGET (targets.py lists the names), and prints per stage the compiler's memory
per device against the device's, compile time, collectives, Pallas kernels and FLOPs.
Exit 0: every stage fits; 1: a stage does not (named, with GiB needed and available);
2: bad input (config, target, stage) or the target's compiler is not installed.
"""

from __future__ import annotations

import os
import sys

# Deviceless GPU compilation needs jax on its CPU backend (no GPU is looked for), and sorts of
# ≥ 65,536 elements (the MoE dispatch) cannot ask a GPU for CUB's scratch size: XLA must
# choose without one. Both before jax starts.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_gpu_deviceless_cub_mode" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_gpu_deviceless_cub_mode=DEVICELESS_CUB_DISABLED")

import json  # noqa: E402
import re  # noqa: E402

from absl import flags, logging  # noqa: E402

GiB = 2**30


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none"


def target_chip(target) -> str:
    """The metrics.RATED_PEAKS key of a target's chips, from their device kind."""
    from jaxllm.compile.targets import GPU_KINDS
    from jaxllm.train.metrics import chip_of

    return chip_of(f"TPU {target.family}" if target.platform == "tpu" else
                   GPU_KINDS[target.family].description)


def format_step(r, target=None) -> list[str]:
    from jaxllm.train.metrics import PLANNED_MFU, RATED_PEAKS, format_seconds, step_seconds

    head = f"  {r.step:<5}"
    if r.error:
        return [f"{head} refused by the compiler after {r.compile_seconds:.0f} s: {r.error}"]
    ratio = r.flops_per_step / r.model_flops_per_step if r.model_flops_per_step else 0.0
    timing = []
    if target is not None and r.step == "train":
        chip = target_chip(target)
        timing = ["        a step at " + " / ".join(f"{m:.0%}" for m in PLANNED_MFU)
                  + f" MFU of {RATED_PEAKS[chip].name}'s rated peak: " + format_seconds(
                      step_seconds(r.model_flops_per_step, target.devices, chip))]
    return [
        f"{head} {_gib(r.total)} of {_gib(r.device_memory)} per device "
        f"(arguments {_gib(r.arguments)}, temporaries {_gib(r.temporaries)}): "
        + ("fits" if r.fits else "DOES NOT FIT"),
        f"        compiled in {r.compile_seconds:.1f} s; collectives: {_counts(r.collectives)}; "
        f"Pallas kernels: {_counts(r.kernels)}",
        f"        FLOPs/step {r.flops_per_step:.3e} traced vs {r.model_flops_per_step:.3e} model "
        f"({ratio:.2f}x)" + (f"; {r.uncounted_kernels} kernel calls not counted"
                             if r.uncounted_kernels else ""),
        *timing,
    ]


def verdict(target, reports) -> tuple[int, str]:
    bad = [r for r in reports if not r.fits]
    if not bad:
        return 0, f"fits: every stage fits on {target.name}"
    worst = max(bad, key=lambda r: r.total)
    refused = re.search(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", worst.error)
    if refused:
        need = (f"needs more than {refused[1]} GiB per device (its temporaries alone), "
                f"{refused[2]} GiB available (the compiler refused)")
    elif worst.error:
        need = "over the device's memory (the compiler refused)"
    else:
        need = f"needs {_gib(worst.total)} per device, {_gib(worst.device_memory)} available"
    names = ", ".join(sorted({f"{r.stage} ({r.step})" for r in bad}))
    return 1, (f"does not fit: stage {worst.stage} ({worst.step} step) {need} on {target.name}; "
               f"not fitting: {names}. Try a bigger target, config.mesh, "
               "config.model.remat=full, config.optimizer.grad_accum or a smaller batch")


def to_json(target, devices, reports) -> dict:
    from jaxllm.train.metrics import step_seconds

    stages = []
    for r in reports:
        if r.step == "train":
            stages.append(r.to_json())
            stages[-1]["step_seconds_at_mfu"] = step_seconds(
                r.model_flops_per_step, target.devices, target_chip(target))
        else:
            stages[-1]["eval"] = r.to_json()
    return {"target": target.name, "devices": len(devices),
            "device_kind": devices[0].device_kind, "stages": stages}


def main(argv: list[str], overrides: list[str]) -> None:
    from jaxllm.compile.program import compile_stages
    from jaxllm.compile.targets import TargetError, compile_only_devices, parse_target
    from jaxllm.config.cli import fail
    from jaxllm.config.load import load_config
    from jaxllm.config.schema import ConfigError, stage_names
    from jaxllm.config.validate import validate
    from jaxllm.parallel import sharding

    F = flags.FLAGS
    logging.set_verbosity(logging.WARNING)
    say = (lambda _: None) if F.json else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        target = parse_target(F.target)
        config = load_config(F.config, overrides)
        validate(config)
        names = [n for n in stage_names(config) if config.stages[n].steps]
        if F.stage:
            if F.stage not in stage_names(config):
                raise ConfigError(f"--stage={F.stage}: the config's stages are "
                                  f"{', '.join(stage_names(config))}")
            names = [F.stage]
        devices = compile_only_devices(target)
        say(f"target  {target.describe()}, {_gib(target.device_memory)} each")
        sizes = sharding.mesh_shape(config.mesh, len(devices))
        say("mesh    " + (" × ".join(f"{a}={n}" for a, n in zip(sharding.MESH_AXES, sizes,
                                                              strict=True) if n > 1) or "1"))
        reports = compile_stages(config, devices, target.device_memory, names,
                                 eval_step=F.eval, progress=say)
    except (ConfigError, TargetError) as e:
        fail(e)
    code, line = verdict(target, reports)
    if F.json:
        print(json.dumps(to_json(target, devices, reports), indent=1))
    else:
        stage = None
        for r in reports:
            if r.stage != stage:
                stage = r.stage
                s = config.stages[stage]
                print(f"{stage}: seq_len {s.seq_len}, batch {s.batch_size}, grad_accum "
                      f"{config.optimizer.grad_accum}, remat {config.model.remat}")
            print("\n".join(format_step(r, target)))
        print(line)
    if code:
        print(f"error: {line}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    from jaxllm.config.cli import run_with_overrides

    flags.DEFINE_string("config", None, "Config file, optionally with :VARIANT; then any number "
                        "of --config.KEY=VALUE overrides.")
    flags.DEFINE_string("target", None, "Hardware to compile for: v4-N, v5p-N (N TensorCores), "
                        "v5e-N, v6e-N (N chips), h100xN, h200xN (N GPUs, 8 a host).")
    flags.DEFINE_string("stage", None, "Compile this stage only (default: every stage with "
                        "steps).")
    flags.DEFINE_bool("eval", True, "Compile each stage's eval step too.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of a report.")
    flags.mark_flags_as_required(["config", "target"])
    run_with_overrides(main)

"""The compile table of docs/compiling.md: every mesh variant of every config in configs/,
compiled ahead of time for its target by `python -m jaxllm.compile`, one row per stage and step.

    python -m benchmarks.compile_table [--only=REGEX] [--eval] [--results=FILE]

A variant's name is its target (`v5p_256` → `v5p-256`, `h100_64` → `h100x64`). Each config
and stage is one `jaxllm.compile --json` process, whose result is appended to --results
(default benchmarks/compile_results.jsonl) as it finishes: a second run prints the rows
already there and compiles only the missing ones (delete the file to start again). Qwen2-72B
takes a minute a step on a 2-core VM and the whole table about 25 minutes; it needs the
`aot` extra (pip install -e '.[aot]').

Prints the versions (jax, libtpu, CUDA plugin), the date, and one markdown table: per-device
GiB from the compiler (and its share of the device), fits, compile seconds, collectives,
Pallas kernels, compiled / model FLOPs and the compiler's versions. Exit 1 when a row does not
fit. The docs' table takes each platform's rows from the compiler whose `memory_analysis()`
agrees with its own buffer assignment, from two venvs into one results file:

    /venv-py3.12/bin/python -m benchmarks.compile_table --only=v5p   # jax 0.12, libtpu 0.0.52
    .venv/bin/python -m benchmarks.compile_table --only=h100         # jax 0.10.2, Python 3.11
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30
SHORT = {"all-gather": "AG", "all-reduce": "AR", "reduce-scatter": "RS", "all-to-all": "A2A",
         "ragged-all-to-all": "RA2A", "collective-permute": "CP", "collective-broadcast": "CB"}


def variants() -> list[tuple[str, str]]:
    """(config:variant, target) of every config file's MESHES."""
    rows = []
    for name in sorted(os.listdir(os.path.join(ROOT, "jaxllm", "configs"))):
        if not name.endswith(".py") or name.startswith("_"):
            continue
        path = os.path.join(ROOT, "jaxllm", "configs", name)
        spec = importlib.util.spec_from_file_location(f"config_{name[:-3]}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for variant in getattr(module, "MESHES", {}):
            family, count = variant.split("_")
            target = f"{family}x{count}" if family.startswith("h") else f"{family}-{count}"
            rows.append((f"configs/{name}:{variant}", target))
    return rows


def stages_of(config: str) -> list[str]:
    from jaxllm.config.load import load_config
    from jaxllm.config.schema import stage_names

    c = load_config(config)
    return [n for n in stage_names(c) if c.stages[n].steps]


def compile_one(config: str, target: str, stage: str, with_eval: bool) -> dict:
    command = [sys.executable, "-m", "jaxllm.compile", f"--config={config}",
               f"--target={target}", f"--stage={stage}", f"--eval={str(with_eval).lower()}",
               "--json"]
    print("$ python", " ".join(command[1:]), file=sys.stderr, flush=True)
    p = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if p.returncode not in (0, 1) or not p.stdout.strip():  # a crash, not a verdict
        errors = [x for x in p.stderr.splitlines() if "rror" in x] or p.stderr.splitlines()
        return {"config": config, "target": target, "stage": stage,
                "failed": (errors or ["no output"])[-1].strip()[:200]}
    [result] = json.loads(p.stdout)["stages"]
    return {"config": config, "target": target, "compiler": compiler(target), **result}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def compiler(target: str) -> str:
    """The versions that compile for `target` here: jax with libtpu or the CUDA plugin."""
    backend = (f"cuda plugin {_version('jax-cuda13-plugin')}" if target.startswith("h")
               else f"libtpu {_version('libtpu')}")
    return f"jax {_version('jax')}, {backend}"


def _row(r: dict, step: dict, kind: str) -> str:
    config = r["config"].removeprefix("configs/")
    if "failed" in r:
        return (f"| {config} | {r['target']} | {r['stage']} | | failed: {r['failed']} |||||||"
                f" {r.get('compiler', '')} |")
    if step.get("error"):
        return (f"| {config} | {r['target']} | {r['stage']} | {kind} | refused |  | no | "
                f"{step['compile_seconds']:.0f} | {step['error'][:80]} | | |")
    b, memory = step["bytes_per_device"], step["device_memory"]
    coll = ", ".join(f"{SHORT.get(k, k)} {v}" for k, v in step["collectives"].items())
    kernels = ", ".join(f"{k} {v}" for k, v in step["kernels"].items() if v) or "none"
    ratio = step["flops_per_step"] / step["model_flops_per_step"]
    return (f"| {config} | {r['target']} | {r['stage']} | {kind} | {b['total'] / GiB:.1f} | "
            f"{b['total'] / memory:.0%} | {'yes' if step['fits'] else '**no**'} | "
            f"{step['compile_seconds']:.0f} | {coll} | {kernels} | {ratio:.2f} | "
            f"{r.get('compiler', '')} |")


def versions() -> str:
    return (f"jax {_version('jax')}, libtpu {_version('libtpu')}, jax-cuda13-plugin "
            f"{_version('jax-cuda13-plugin')}; {datetime.date.today()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="regex on config:variant")
    parser.add_argument("--eval", action="store_true", help="compile the eval steps too")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks",
                                                          "compile_results.jsonl"))
    args = parser.parse_args()
    done = []
    if os.path.exists(args.results):
        with open(args.results) as f:
            done = [json.loads(line) for line in f if line.strip()]
    have = {(r["config"], r["target"], r["stage"]) for r in done}
    for config, target in variants():
        if not re.search(args.only, config):
            continue
        for stage in stages_of(config):
            if (config, target, stage) not in have:
                result = compile_one(config, target, stage, args.eval)
                with open(args.results, "a") as f:
                    f.write(json.dumps(result) + "\n")
                done.append(result)
    print(versions())
    print("| config | target | stage | step | GiB/device | of device | fits | compile s | "
          "collectives | kernels | FLOPs / model | compiler |")
    print("|---|---|---|---|--:|--:|---|--:|---|---|--:|---|")
    bad = 0
    for r in done:
        if not re.search(args.only, r["config"]):
            continue
        steps = [(r, "train")] + ([(r["eval"], "eval")] if "eval" in r else [])
        for step, kind in steps:
            print(_row(r, step, kind))
            bad += "failed" in r or not step.get("fits", False)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

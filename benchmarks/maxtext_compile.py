"""Per-chip memory of one train step compiled ahead of time for a TPU slice, jaxllm vs MaxText.

Both compile the step on this machine for the slice (compile-only TPU devices from libtpu),
from one jaxllm config: jaxllm through `python -m jaxllm.compile --json`, MaxText through its
`train_compile` with overrides that `maxtext_overrides` derives from the same config (model
shape, mesh, remat, scan, dtypes, AdamW, tokens per device per micro-step, flash attention
with ring context parallelism over `sequence`; the loss is MaxText's default, untiled). The table
shows each compiler's `memory_analysis()` per chip in GiB: arguments, temporaries, outputs not
aliased to donated inputs, and their total; then the ratio jaxllm / MaxText.

jaxllm is compiled twice: with its own venv's jax and libtpu, and with MaxText's (jaxllm installed
into MaxText's venv), so that one row compares the two programs under the same compiler. The
verdict is that row's: libtpu versions differ by a quarter in what they report for one program
(jaxllm's Qwen2-72B step: 36.6 GiB with libtpu 0.0.42.1, 27.6 GiB with 0.0.52).

MaxText's venv (it needs Python >= 3.12; maxtext 0.2.5 brings jax 0.12 and libtpu), with jaxllm
in it (no dependencies: MaxText's jax, flax, optax and grain are the ones to compile with):

    python3.12 -m venv /work/venv-maxtext
    /work/venv-maxtext/bin/pip install "maxtext[tpu]==0.2.5"
    /work/venv-maxtext/bin/pip install --no-deps -e .

Run with jaxllm's venv (the three compiles run one after the other, each a minute or two and
about 2.5 GB of memory on 2 CPU cores):

    .venv/bin/python -m benchmarks.maxtext_compile [--config=configs/qwen2_72b.py:v5p_256]
        [--target=v5p-256] [--stage=pretrain] [--maxtext-python=/work/venv-maxtext/bin/python]
        [--maxtext-override=KEY=VALUE ...]

Not the same in both: the attention kernels (jaxllm's Mosaic flash attention in its own ring
over `sequence`, MaxText's Tokamax splash attention in its ring), the loss (jaxllm's chunks of
`loss.chunk_size` tokens a row; `--maxtext-override=num_vocab_tiling=4` is MaxText's nearest,
but under context parallelism it gathers the micro-batch's hidden states, more memory than
none), and the jax and libtpu versions.
"""

from __future__ import annotations

import os

# The compiles run in the environment this script started with: importing jax (below) points
# TPU_LIBRARY_PATH at this venv's libtpu, which MaxText's newer jax would then load and fail on.
START_ENV = dict(os.environ)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from jaxllm.compile.targets import parse_target  # noqa: E402
from jaxllm.config.load import load_config  # noqa: E402
from jaxllm.parallel.sharding import MESH_AXES, mesh_shape  # noqa: E402

GiB = 2**30
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1.10  # jaxllm's total may exceed MaxText's by at most 10 %
SAME_JAX = "jaxllm (MaxText's jax)"  # jaxllm compiled in MaxText's venv: the fair comparison
REMAT = {"full": "full"}  # jaxllm's remat → MaxText's remat_policy (the ones that match)
# MaxText's CLI key for each jaxllm mesh axis.
MESH_KEYS = {"data": "ici_data_parallelism", "fsdp": "ici_fsdp_parallelism",
             "tensor": "ici_tensor_parallelism", "expert": "ici_expert_parallelism",
             "sequence": "ici_context_parallelism"}


def maxtext_overrides(config, stage_name: str, devices: int) -> dict:
    """MaxText `key=value` settings for the step jaxllm compiles for this config's stage."""
    m, s, opt = config.model, config.stages[stage_name], config.optimizer
    if m.family != "qwen2":
        raise SystemExit(f"model.family={m.family!r}: only dense qwen2 maps onto MaxText here")
    if m.remat not in REMAT:
        raise SystemExit(f"model.remat={m.remat!r}: MaxText has a match for {list(REMAT)}")
    axes = dict(zip(MESH_AXES, mesh_shape(config.mesh, devices), strict=True))
    settings = dict(
        decoder_block="qwen2", mlp_activations="[silu,linear]",
        base_emb_dim=m.hidden_size, base_num_query_heads=m.num_heads,
        base_num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, base_mlp_dim=m.intermediate_size,
        base_num_decoder_layers=m.num_layers, vocab_size=m.vocab_size,
        attention_bias=m.qkv_bias, logits_via_embedding=m.tie_embeddings,
        normalization_layer_epsilon=m.rms_norm_eps, rope_max_timescale=s.rope_theta,
        max_target_length=s.seq_len, gradient_accumulation_steps=opt.grad_accum,
        per_device_batch_size=s.batch_size / opt.grad_accum / devices,
        remat_policy=REMAT[m.remat], scan_layers=m.scan_layers,
        weight_dtype=m.param_dtype, mu_dtype=m.param_dtype, dtype=m.dtype,
        opt_type="adamw", adam_b1=opt.b1, adam_b2=opt.b2, adam_eps=opt.eps,
        adam_weight_decay=opt.weight_decay, gradient_clipping_threshold=opt.clip_norm,
        z_loss_multiplier=config.loss.z_loss,
        attention="flash", use_tokamax_splash=True, dcn_data_parallelism=1,
    )
    settings.update({MESH_KEYS[a]: n for a, n in axes.items()})
    if axes["sequence"] > 1:
        settings["context_parallel_strategy"] = "ring"
    return settings


def _cli_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def jaxllm_command(python: str, args) -> list[str]:
    return [python, "-m", "jaxllm.compile", f"--config={args.config}",
            f"--target={args.target}", f"--stage={args.stage}", "--eval=false", "--json"]


def maxtext_command(python: str, args, settings: dict) -> list[str]:
    fixed = [f"run_name={args.stage}_aot", "base_output_directory=/tmp/maxtext_compile",
             "enable_checkpointing=false", f"compile_topology={args.target}",
             "compile_topology_num_slices=1"]
    derived = [f"{k}={_cli_value(v)}" for k, v in settings.items()]
    return [python, "-m", "maxtext.trainers.pre_train.train_compile", *fixed, *derived]


def run(command: list[str], name: str, ok_codes=(0,)) -> tuple[str, float]:
    """Runs a compile; its stdout and the wall seconds. Exits with its stderr's tail on failure."""
    print(f"compiling with {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=START_ENV, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in ok_codes:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{shlex.join(command)}\n{tail}")
    return done.stdout, seconds


def jaxllm_memory(stdout: str) -> dict:
    """Bytes per device from `jaxllm.compile --json` (its first stage's train step)."""
    report = json.loads(stdout)["stages"][0]
    if "error" in report:
        raise SystemExit(f"jaxllm: the compiler refused the step: {report['error']}")
    return report["bytes_per_device"]


def maxtext_memory(stdout: str) -> dict:
    """Bytes per device from train_compile's `Memory analysis: CompiledMemoryStats(...)` line."""
    line = re.search(r"Memory analysis: CompiledMemoryStats\((.*)\)", stdout)
    if line is None:
        raise SystemExit("MaxText printed no 'Memory analysis' line")
    stats = {k: int(v) for k, v in re.findall(r"(\w+)_size_in_bytes=(\d+)", line[1])}
    outputs = stats["output"] - stats["alias"]
    return {"arguments": stats["argument"], "temporaries": stats["temp"], "outputs": outputs,
            "total": stats["argument"] + stats["temp"] + outputs}


def versions(python: str) -> dict:
    code = ("import importlib.metadata as m; "
            "print(m.version('jax'), m.version('jaxlib'), m.version('libtpu'))")
    jax, jaxlib, libtpu = subprocess.check_output([python, "-c", code], env=START_ENV,
                                                  text=True).split()
    return {"jax": jax, "jaxlib": jaxlib, "libtpu": libtpu}


def table(rows: list[tuple[str, dict, dict, float]]) -> list[str]:
    lines = ["| compiler | jax | libtpu | arguments GiB | temporaries GiB | outputs GiB "
             "| total GiB | compile s |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, memory, version, seconds in rows:
        sizes = " | ".join(f"{memory[k] / GiB:.2f}"
                           for k in ("arguments", "temporaries", "outputs", "total"))
        lines.append(f"| {name} | {version['jax']} | {version['libtpu']} | {sizes} "
                     f"| {seconds:.0f} |")
    return lines


def verdict(ours: dict, theirs: dict) -> str:
    """jaxllm's memory against MaxText's, both compiled by the same jax and libtpu."""
    ratio = {k: ours[k] / theirs[k] for k in ("arguments", "temporaries", "total")}
    within = "yes" if ratio["total"] <= TOLERANCE else "NO"
    return (f"{SAME_JAX} / MaxText: total {ratio['total']:.3f} "
            f"(arguments {ratio['arguments']:.3f}, temporaries {ratio['temporaries']:.3f}); "
            f"within MaxText + {TOLERANCE - 1:.0%}: {within}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/qwen2_72b.py:v5p_256")
    p.add_argument("--target", default="v5p-256", help="a TPU slice, as MaxText names it too")
    p.add_argument("--stage", default="pretrain")
    p.add_argument("--jaxllm-python", default=os.path.join(REPO, ".venv", "bin", "python"))
    p.add_argument("--maxtext-python", default="/work/venv-maxtext/bin/python")
    p.add_argument("--maxtext-override", action="append", default=[], metavar="KEY=VALUE",
                   help="replaces or adds one of MaxText's settings")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    target = parse_target(args.target)
    if target.platform != "tpu":
        raise SystemExit(f"--target={args.target}: MaxText's train_compile here is for TPU slices")
    config = load_config(os.path.join(REPO, args.config))
    settings = maxtext_overrides(config, args.stage, target.devices)
    for override in args.maxtext_override:  # MaxText refuses a key given twice
        key, _, value = override.partition("=")
        settings[key] = value
    pythons = {"jaxllm": args.jaxllm_python, SAME_JAX: args.maxtext_python,
               "MaxText": args.maxtext_python}
    commands = {"jaxllm": jaxllm_command(args.jaxllm_python, args),
                SAME_JAX: jaxllm_command(args.maxtext_python, args),
                "MaxText": maxtext_command(args.maxtext_python, args, settings)}
    if subprocess.run([args.maxtext_python, "-c", "import jaxllm"], env=START_ENV,
                      capture_output=True).returncode:
        raise SystemExit("jaxllm is not installed in MaxText's venv: "
                         f"{os.path.dirname(args.maxtext_python)}/pip install --no-deps -e {REPO}")
    rows, memory = [], {}
    for name in ("jaxllm", SAME_JAX, "MaxText"):
        stdout, seconds = run(commands[name], name, ok_codes=(0,) if name == "MaxText"
                              else (0, 1))  # jaxllm.compile exits 1 when a stage does not fit
        memory[name] = (maxtext_memory if name == "MaxText" else jaxllm_memory)(stdout)
        rows.append((name, memory[name], versions(pythons[name]), seconds))
    s = config.stages[args.stage]
    tokens = s.batch_size * s.seq_len // config.optimizer.grad_accum // target.devices
    print(f"{args.config} stage {args.stage} on {args.target} ({target.devices} chips): "
          f"{tokens} tokens per chip per micro-step, grad_accum {config.optimizer.grad_accum}, "
          f"remat {config.model.remat}\n")
    print("\n".join(table(rows)))
    print("\n" + verdict(memory[SAME_JAX], memory["MaxText"]) + "\n")
    for name, command in commands.items():
        print(f"{name}:\n    {shlex.join(command)}")


if __name__ == "__main__":
    main()

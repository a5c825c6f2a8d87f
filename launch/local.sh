#!/usr/bin/env bash
# Runs N jaxllm processes on this machine, joined over gloo (CPU collectives): a way to try
# multi-host training without a cluster.
#
#   launch/local.sh N --config=configs/tiny.py --workdir=runs/local [--config.KEY=VALUE ...]
#
# Each process sees its own CPU devices (JAX_NUM_CPU_DEVICES, default 1). Process 0 writes the
# logs; every process's output goes to WORKDIR/process_I.log as well. If one process exits
# with an error, the others are stopped and the script exits non-zero.
set -uo pipefail
if [ $# -lt 1 ] || ! [[ $1 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES [jaxllm.main flags...]" >&2
  exit 2
fi
n=$1; shift
port=${PORT:-$((20000 + RANDOM % 20000))}
workdir=""
for arg in "$@"; do
  case $arg in --workdir=*) workdir=${arg#--workdir=} ;; esac
done
[ -n "$workdir" ] || { echo "$0: --workdir=DIR is required" >&2; exit 2; }
mkdir -p "$workdir"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${JAX_NUM_CPU_DEVICES:-1}"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

pids=()
for ((i = 0; i < n; i++)); do
  python -m jaxllm.main --coordinator_address="127.0.0.1:$port" --num_processes="$n" \
    --process_id="$i" "$@" > >(tee "$workdir/process_$i.log") 2>&1 &
  pids+=($!)
done

status=0
# Wait for the first process to finish; a failure stops the rest.
while [ ${#pids[@]} -gt 0 ]; do
  wait -n -p done_pid "${pids[@]}"
  rc=$?
  remaining=()
  for pid in "${pids[@]}"; do [ "$pid" != "$done_pid" ] && remaining+=("$pid"); done
  pids=("${remaining[@]}")
  if [ "$rc" -ne 0 ]; then
    echo "$0: process $done_pid exited with $rc; stopping the others" >&2
    status=$rc
    [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null
  fi
done
exit $status

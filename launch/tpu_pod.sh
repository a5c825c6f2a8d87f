#!/usr/bin/env bash
# Trains on a Cloud TPU VM pod slice: ships this checkout to every worker, installs it with
# jax[tpu], starts jaxllm.main on all workers at once and collects each worker's log.
#
#   TPU_NAME=my-v5p-256 ZONE=us-east5-a launch/tpu_pod.sh \
#       --config=configs/qwen2_72b.py:v5p_256 --workdir=/mnt/shared/runs/qwen2-72b
#
# Optional: PROJECT (gcloud project), LOG_DIR (default logs/TPU_NAME-DATE).
# The workdir must be a file system every worker sees at the same path (Filestore / NFS, or a
# gcsfuse mount): checkpoints are written by all workers, logs by worker 0. JAX finds its peers
# from the TPU metadata itself (jax.distributed.initialize() with no arguments).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
[ $# -gt 0 ] || { echo "usage: TPU_NAME=... ZONE=... $0 --config=... --workdir=..." >&2; exit 2; }
gcloud_tpu=(gcloud compute tpus tpu-vm --zone="$ZONE" ${PROJECT:+--project="$PROJECT"})
log_dir=${LOG_DIR:-logs/$TPU_NAME-$(date +%Y%m%d-%H%M%S)}
workers=$("${gcloud_tpu[@]}" describe "$TPU_NAME" --format='value(networkEndpoints.len())' \
  2>/dev/null || true)
[ -n "$workers" ] || workers=$("${gcloud_tpu[@]}" describe "$TPU_NAME" --format=json |
  python3 -c 'import json, sys; print(len(json.load(sys.stdin)["networkEndpoints"]))')
echo "$TPU_NAME: $workers workers"

repo=$(cd "$(dirname "$0")/.." && pwd)
tarball=$(mktemp /tmp/jaxllm.XXXXXX.tgz)
tar czf "$tarball" -C "$repo" --exclude=.git --exclude=.venv --exclude=runs .
"${gcloud_tpu[@]}" scp "$tarball" "$TPU_NAME":/tmp/jaxllm.tgz --worker=all

args=$(printf '%q ' "$@")
status=0
"${gcloud_tpu[@]}" ssh "$TPU_NAME" --worker=all --command "
  set -e
  rm -rf ~/jaxllm && mkdir -p ~/jaxllm && tar xzf /tmp/jaxllm.tgz -C ~/jaxllm && cd ~/jaxllm
  python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . 'jax[tpu]'
  python -m jaxllm.main $args > ~/jaxllm_worker.log 2>&1" || status=$?

mkdir -p "$log_dir"
for ((i = 0; i < workers; i++)); do
  "${gcloud_tpu[@]}" scp "$TPU_NAME":~/jaxllm_worker.log "$log_dir/worker_$i.log" \
    --worker="$i" || echo "could not fetch worker $i's log" >&2
done
echo "logs in $log_dir; exit status $status"
exit $status

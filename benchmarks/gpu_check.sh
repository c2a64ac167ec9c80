#!/usr/bin/env bash
# GPU-ready check, for a machine with NVIDIA GPUs (a few minutes):
#
#   bash benchmarks/gpu_check.sh              # in a fresh venv, installed as the Dockerfile does
#   VENV=.venv bash benchmarks/gpu_check.sh   # an existing venv that has tfdp
#
# 1. Installs the image's Python stack the way the Dockerfile's GPU variant
#    does (TensorFlow with its and-cuda extra at setup.py's pin, then tfdp),
#    unless VENV names one that already has it.
# 2. tfdp-preflight: the GPUs TensorFlow registered, the driver's CUDA, the
#    cuDNN and NCCL loaded, the strategy and its all-reduce.
# 3. A 30-step tfdp-train of the default model on every GPU of the machine;
#    its strategy line must place the replicas on GPUs, with NCCL when there
#    are several.
# Everything it prints also goes to $OUT/gpu_check.log (OUT defaults to a
# temporary directory). Exit status: 0 when the replicas ran on GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
LOG=$OUT/gpu_check.log
exec > >(tee "$LOG") 2>&1

if [[ -z "${VENV:-}" ]]; then
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { echo "gpu_check: needs Python 3.11 or newer (keras-hub), as the image has"; exit 2; }
  VENV=$(mktemp -d)/venv
  pin=$(python3 -c 'import re; print(re.search(r"\"tensorflow(>=[^\"]+)\"", open("setup.py").read()).group(1))')
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "tensorflow[and-cuda]$pin"
  "$VENV/bin/pip" install -q .
fi
export PATH=$VENV/bin:$PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "== tfdp-preflight"
tfdp-preflight --allreduce_mb=64

echo "== tfdp-train, 30 steps"
run=$(mktemp -d)/run
tfdp-train --model_dir="$run" --train_steps=30 --eval_every=30 --checkpoint_every=30 \
  --warmup_steps=5 --sample_tokens=0 | tee "$OUT/train.log"
line=$(grep -m1 '^strategy: ' "$OUT/train.log" || true)
gpus=$(grep -o 'device:GPU:[0-9]*' <<< "$line" | wc -l)
if [[ $gpus -eq 0 ]]; then
  echo "gpu_check: FAILED: tfdp-train placed no replica on a GPU ($line)"
  exit 1
fi
if [[ $gpus -gt 1 && $line != *"all-reduce: NCCL" ]]; then
  echo "gpu_check: FAILED: $gpus GPU replicas without NCCL ($line)"
  exit 1
fi
echo "gpu_check: passed: $gpus GPU replica(s); last step: $(grep '^step ' "$OUT/train.log" | tail -1)"

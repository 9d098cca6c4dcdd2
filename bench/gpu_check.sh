#!/usr/bin/env bash
# One call on a CUDA machine: model-only and end-to-end throughput of the torch path
# (bf16 autocast, BATCH chips per forward, 64 by default), printed against the targets:
#   model only >= 3,000 chips/s, pipeline end to end >= 1,500 chips/s on one H200.
# Usage (from the repository root, with the environment built by `make env`):
#   bash bench/gpu_check.sh [BATCH]
# On a machine without a package index whose own python3 has CUDA torch (BENCHMARKS.md,
# "One H200"): unpack the other dependencies as wheels into a folder on PYTHONPATH, then
#   PY=python3 PYTHONPATH=<wheels folder>:$PWD bash bench/gpu_check.sh
set -euo pipefail
BATCH="${1:-64}"
PY="${PY:-.venv/bin/python}"  # PY=python3 where the machine's own torch has CUDA
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0),
      "bf16" if torch.cuda.is_bf16_supported() else "fp16")
PY
echo "== model only (bench/model_bench.py, R50-FPN, 512² chips, batch $BATCH); target >= 3000 chips/s"
"$PY" bench/model_bench.py --device cuda --batch "$BATCH" --reps 5 --skip train
# The GPU actor needs few CPU threads: the rest of the machine's cores read chips
# (read tasks in flight = cluster CPUs - actor CPUs). A 16384² scene is 1,369 chips.
echo "== end to end (bench/pipeline_bench.py, one 16384² scene, one GPU actor); target >= 1500 chips/s"
"$PY" bench/pipeline_bench.py --backbone resnet50 --size 16384 --threads 2 --batch "$BATCH" --repeats 2 \
  --backend torch --gpus-per-actor 1

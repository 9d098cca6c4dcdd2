#!/usr/bin/env bash
# One call on a CUDA machine prints the GPU path's figures (issue 33), each against the raw
# forward (the network alone) of the same batch, BATCH chips of 512² (64 by default):
#   network only, postprocess only, model only, training images/s   (bench/model_bench.py)
#   end to end on one 16,384² scene, with the run report's stage seconds and bottleneck
#                                                                   (bench/pipeline_bench.py)
# Targets on one H200: model only >= 3,000 chips/s, end to end >= 1,500 chips/s.
# Usage (from the repository root, with the environment built by `make env`):
#   bash bench/gpu_check.sh [BATCH]
#   bash bench/gpu_check.sh --device cpu     # smoke test on a CPU: small sizes, a minute or two
# On a machine without a package index whose own python3 has CUDA torch (BENCHMARKS.md,
# "One H200"): unpack the other dependencies as wheels into a folder on PYTHONPATH, then
#   PY=python3 PYTHONPATH=<wheels folder>:$PWD bash bench/gpu_check.sh
set -euo pipefail
DEVICE=cuda
if [[ "${1:-}" == "--device" ]]; then
  DEVICE="$2"
  shift 2
fi
BATCH="${1:-64}"
PY="${PY:-.venv/bin/python}"  # PY=python3 where the machine's own torch has CUDA
if [[ "$DEVICE" == "cpu" ]]; then
  echo "== smoke test on the CPU (small sizes; these are not the GPU figures)"
  "$PY" bench/model_bench.py --device cpu --smoke
  "$PY" bench/pipeline_bench.py --backbone resnet18 --size 1024 --threads 2 --batch 2 --repeats 1 --backend torch
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0),
      "bf16" if torch.cuda.is_bf16_supported() else "fp16")
PY
echo "== network, postprocess, model only, training (bench/model_bench.py, R50-FPN, 512², batch $BATCH)"
echo "   target: model only >= 3000 chips/s"
"$PY" bench/model_bench.py --device cuda --batch "$BATCH" --reps 5 --ours-only
# The GPU actor needs few CPU threads: the rest of the machine's cores read chips
# (read tasks in flight = cluster CPUs - actor CPUs). A 16384² scene is 1,369 chips.
echo "== end to end (bench/pipeline_bench.py, one 16384² scene, one GPU actor); target >= 1500 chips/s"
"$PY" bench/pipeline_bench.py --backbone resnet50 --size 16384 --threads 2 --batch "$BATCH" --repeats 2 \
  --backend torch --gpus-per-actor 1

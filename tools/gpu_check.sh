#!/usr/bin/env bash
# The CUDA paths no CPU run exercises, in one go (about 5 minutes on one H100/H200-class GPU, at most 8):
# tools/gpu_check.py, run as tools/bench.py --gpu_check. bf16 autocast and torch.compile of flow_opd_loss, then one
# distill iteration (after a warm-up one) of a random SD3.5-Medium-sized transformer at 512 px, micro-batch 2, for
# our structure (with and without gradient checkpointing, and with the compiled core) and the released one, with
# peak torch.cuda.max_memory_allocated beside the memory plan's prediction and each iteration's ratio to its floor.
# No hub: random weights and random prompt embeddings. This script first checks the environment, so that a missing
# GPU or package says so in one line. Writes results/gpu_check.json (tools/BENCHMARKS.md, "GPU check") and prints
# the table. Extra arguments are tools/bench.py's flags (e.g. --max_sequence_length 256).
#   bash tools/gpu_check.sh                       # PYTHON=/path/to/python to choose the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if ! "$PY" -c "import torch, diffusers, peft" 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch, diffusers and peft; pip install -r requirements.txt, or set" \
         "PYTHON=/path/to/python of an environment that has them." >&2
    exit 2
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False). Run it on a machine" \
         "with an NVIDIA GPU and a CUDA build of torch (pip install -r requirements.txt there)." >&2
    exit 2
fi
exec timeout 480 "$PY" -m tools.bench --gpu_check --device cuda --config sd35m --out_json results/gpu_check.json "$@"

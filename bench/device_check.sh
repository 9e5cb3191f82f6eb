#!/usr/bin/env bash
# One prepared GPU check (docs/performance.md): run it whenever a CUDA machine is available, from the repository root:
#
#     bash bench/device_check.sh            # CUDA: correctness checks + figures, under 8 minutes on one H200
#
# It downloads nothing. It writes bench/results/device_check.json and .md (plus the input-pipeline JSON):
# the CUDA checks (every head, MHE in each classifier mode, the sharded head with NCCL at world size 1,
# AMP bf16 and fp16 with its GradScaler), sphere20 / sphere64 / iresnet100 training throughput in bf16
# channels_last with and without torch.compile (a backbone not registered in this checkout is skipped with
# a line saying so), the MHE overhead at 10,572 classes, the input-pipeline rate and nvJPEG decode, and the
# peak memory of each row. Without CUDA it runs the same code on the CPU at CI size (what tests/test_speed.py
# runs). Exit status 1 when a correctness check failed.
#
# Environment: PYTHON (default: .venv/bin/python when present, else python3), DEVICE_CHECK_OUT (default
# bench/results), DEVICE_CHECK_SIZE (full on CUDA, ci elsewhere), DEVICE_CHECK_BUDGET_S (default 420: no
# torch.compile row is started with under 120 s of it left).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${DEVICE_CHECK_OUT:-bench/results}"
BUDGET="${DEVICE_CHECK_BUDGET_S:-420}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TORCH_HOME="${TORCH_HOME:-/tmp/sfp_torch_home}"  # nothing is fetched from a hub

if [[ -n "${DEVICE_CHECK_SIZE:-}" ]]; then
    SIZE_ARGS=(--size "$DEVICE_CHECK_SIZE")
else
    SIZE_ARGS=()
fi
DEVICE=$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
echo "device_check: device $DEVICE, python $PYTHON, results in $OUT" >&2
if [[ "$DEVICE" == cuda ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi
# the whole check stays under 8 minutes: the figures stop starting compile rows at the budget, and a hard
# limit of 7.5 minutes ends a run that hangs (a stuck NCCL init, a compile that never returns)
timeout 450 "$PYTHON" bench/device_check.py --device "$DEVICE" --out "$OUT" --budget-s "$BUDGET" "${SIZE_ARGS[@]+"${SIZE_ARGS[@]}"}"

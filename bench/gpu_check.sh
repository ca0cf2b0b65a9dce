#!/usr/bin/env bash
# The GPU check, once: bench/gpu_check.py with the repository's venv under a hard time limit. It runs the real
# albert-pretrain per row and prints one Markdown table read from each run's metrics.jsonl and run-info.json (stdout;
# progress on stderr). It stops with one line when a module is missing or no CUDA device is visible.
#
#   bash bench/gpu_check.sh | tee gpu-check.md                      # one GPU, under 8 minutes
#   bash bench/gpu_check.sh --pretrain-rows z1-bf16,z2-bf16         # any gpu_check.py flag (--help lists them)
#   bash bench/gpu_check.sh --pretrain-data shards/                 # shards made elsewhere (albert-data shard)
#
# Environment:
#   GPU_CHECK_TIMEOUT  hard limit in seconds (default 480; gpu_check.py's --budget, 450 s, skips rows before it).
#                      Exit code 124 when it hits; the albert-pretrain runs share our process group and stop too.
#   VENV               the virtual environment (default: <repo>/.venv; VENV= uses the python on PATH)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV-$REPO/.venv}"
if [[ -n "$VENV" ]]; then
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "gpu_check.sh: no $VENV/bin/python (run 'make test' first, or set VENV= to use the python on PATH)" >&2
        exit 2
    fi
    export VIRTUAL_ENV="$VENV"
    export PATH="$VENV/bin:$PATH"  # also DeepSpeed's ninja for JIT-built ops
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$REPO"
exec timeout --signal=TERM --kill-after=15 "${GPU_CHECK_TIMEOUT:-480}" python3 bench/gpu_check.py "$@"

#!/usr/bin/env bash
# Run bench/gpu_check.py (step times, LAMB parity, fp16 loss scaling, ZeRO memory, and the real albert-pretrain per
# ZeRO stage and precision with exact resume and export: bench/gpu_check_pretrain.py) with the repository's venv,
# under a hard time limit. Its Markdown tables go to stdout, progress to stderr:
#
#   bash bench/gpu_check.sh | tee gpu-check.md                 # one GPU, under 8 minutes
#   bash bench/gpu_check.sh --budget 240 --sections 5           # any gpu_check.py flag (--help lists them)
#   bash bench/gpu_check.sh --pretrain-data shards/             # section 5 on shards made elsewhere (albert-data shard)
#
# Environment:
#   GPU_CHECK_TIMEOUT  hard limit in seconds (default 480 = 8 min; gpu_check.py's own --budget, default
#                      450 s, skips sections before this is reached). Exit code 124 when it hits; the
#                      albert-pretrain processes of section 5 share our process group, so they get the signal too.
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

export PYTHONUNBUFFERED=1  # tables and logs appear as they are written, also when the timeout stops the run
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

cd "$REPO"
# what the check imports beyond torch, asked first: a GPU image without them fails here with a clear line
python3 -c 'import deepspeed, safetensors, h5py' 2>/dev/null || {
    echo "gpu_check.sh: python3 cannot import deepspeed, safetensors and h5py; on an offline GPU machine carry the wheels" \
         "from bench/gpu_wheels.sh (docs/performance.md: GPU check)" >&2
    exit 2
}
# section 5 also needs transformers (does the export load?) and, to make its shards from the Wikipedia excerpt
# (.cache/corpora), albert-data's packages; without them its rows fail, each saying why
missing="$(python3 -c '
import importlib.util as u
print(" ".join(m for m in ("transformers", "sentencepiece", "blingfire", "mwparserfromhell") if u.find_spec(m) is None))')"
if [[ -n "$missing" ]]; then
    echo "gpu_check.sh: warning: python3 lacks $missing: section 5 (albert-pretrain end to end) will fail its rows" \
         "(carry their wheels; with shards made elsewhere, --pretrain-data DIR needs transformers only)" >&2
fi
exec timeout --signal=TERM --kill-after=15 "${GPU_CHECK_TIMEOUT:-480}" python3 bench/gpu_check.py "$@"

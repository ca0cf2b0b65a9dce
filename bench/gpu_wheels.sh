#!/usr/bin/env bash
# Fetch, here, the wheels that a GPU machine without network access needs for bench/gpu_check.sh and
# that its image lacks: DeepSpeed (built here from PyPI's sdist as a pure-Python wheel: its CUDA ops are
# JIT-built there), DeepSpeed's hjson and pydantic, and albert-data's blingfire, mwparserfromhell and sentencepiece.
# They go to .whl/ (git-ignored). The Wikipedia excerpt's cached copy, .cache/corpora, must be carried too.
#
#   bash bench/gpu_wheels.sh                 # for the GPU machine's Python 3.12
#   PY_VERSION=3.11 bash bench/gpu_wheels.sh
#
# Then, on the GPU machine, with .whl carried along:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 VENV= bash bench/gpu_check.sh
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
DEST="$REPO/.whl"
mkdir -p "$DEST"
DS_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$DS_VERSION"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
pure_and_binary() {
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
        "${PLATFORMS[@]}" -d "$DEST" "$@"
}
# the versions installed here, which this DeepSpeed is known to work with
# albert-data's own (the GPU check makes its shards there): blingfire, mwparserfromhell, sentencepiece
for pkg in hjson pydantic pydantic_core annotated_types typing_inspection typing_extensions blingfire mwparserfromhell sentencepiece; do
    version="$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))")"
    pure_and_binary "$pkg==$version"
done
ls -la "$DEST"

#!/usr/bin/env bash
# The wheel folder benchmarks/gpu_check.sh installs from, made on a machine WITH network:
#
#   bash benchmarks/gpu_wheels.sh [WHEELS_DIR]          # default ./wheels; PYTHON (default python3)
#
# Run it with the same Python version (and OS/CPU kind) as the GPU machine: compiled wheels (pyarrow, sentencepiece,
# ...) are picked for the running interpreter. Holds every package our code needs beyond torch, transformers, peft
# and triton, with their dependencies, pinned as in pyproject.toml. torch and the CUDA libraries are never
# downloaded: the GPU machine's own stay. GPTQModel ships no wheel on PyPI: it is built here, without CUDA
# extensions (BUILD_CUDA_EXT=0; peft-qalora trains on its torch kernel), as a pure-Python wheel, and refused if not.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${1:-./wheels}"
PY="${PYTHON:-python3}"
mkdir -p "$WHEELS"

mapfile -t REQUIRED < <(sed -e '/^#/d' -e '/^$/d' "$REPO/benchmarks/gpu_requirements.txt" | cut -d' ' -f2)
echo "requirements: ${REQUIRED[*]}"
pins=()
for name in torch transformers peft; do
  pins+=("$(grep -o "\"$name==[0-9.]*" "$REPO/pyproject.toml" | tr -d '"')")
done

# GPTQModel: built from its sdist without CUDA extensions
BUILD_CUDA_EXT=0 "$PY" -m pip wheel --no-deps --wheel-dir "$WHEELS" "gptqmodel==7.7.0"
ls "$WHEELS"/gptqmodel-7.7.0-py3-none-any.whl > /dev/null || {
  echo "gpu_wheels: the gptqmodel wheel built is not pure Python (py3-none-any): $(ls "$WHEELS"/gptqmodel-*)" >&2
  exit 1
}

# everything else as wheels, dependencies included; torch and the NVIDIA/CUDA runtime wheels are left out
# (downloaded with --no-deps from the resolved list, so torch's 2 GB never crosses)
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
"$PY" -m pip install --dry-run --ignore-installed --quiet --report "$report" \
  --only-binary=:all: --find-links "$WHEELS" "${REQUIRED[@]}" "${pins[@]}"
"$PY" - "$report" > "$WHEELS/.requirements.txt" <<'PY'
import json, sys
skip = ("torch", "triton", "nvidia-", "cuda-", "gptqmodel")
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if not meta["name"].lower().startswith(skip):
        print(f"{meta['name']}=={meta['version']}")
PY
"$PY" -m pip download --no-deps --only-binary=:all: --dest "$WHEELS" -r "$WHEELS/.requirements.txt"
echo "gpu_wheels: $(ls "$WHEELS" | wc -l) files, $(du -sh "$WHEELS" | cut -f1) in $WHEELS"

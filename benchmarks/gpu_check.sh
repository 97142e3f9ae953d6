#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md, "GPU check"): on a machine with one NVIDIA GPU, a Python with CUDA torch,
# transformers, peft and triton, and no network, install what is missing from a wheel folder, run the device tests
# (tests/test_device_agnostic.py) on CUDA, then time training steps of SmolLM2-135M and a 7B-shaped slice
# (benchmarks/gpu_check.py); all of it under 8 minutes (hard timeouts on every part).
#
#   bash benchmarks/gpu_check.sh [WHEELS_DIR]        # WHEELS_DIR: default ./wheels, made by benchmarks/gpu_wheels.sh
#
# Copy beside the repository: the wheel folder, and the asset cache holding smollm2-135m-instruct/ (no network: the
# model cannot be fetched there). The cache is $PEFT_QALORA_CACHE, default ./.cache of the repository; make it on a
# machine with network with `make demo`, or
#   python -c "from peft_qalora.assets import smollm2_dir; smollm2_dir()"
# and copy .cache/smollm2-135m-instruct (517 MB; 7B-shaped slice and the quantized SmolLM2 are built on the spot).
#
# Environment: PYTHON (default python3); PEFT_QALORA_CACHE; GPU_CHECK_DEVICE (cuda; cpu for a dry run without a GPU);
# GPU_CHECK_TINY=1 (time the tests' tiny model instead of the two models); GPU_CHECK_PYTEST_ARGS (default
# tests/test_device_agnostic.py); GPU_CHECK_RESULTS (default benchmarks/results); GPU_CHECK_BUDGET_S (default 450).
# Writes gpu_check.{json,md} there; exits 0 only if the tests passed and every timed step ran on the device.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
WHEELS="${1:-./wheels}"
PY="${PYTHON:-python3}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
RESULTS="${GPU_CHECK_RESULTS:-$REPO/benchmarks/results}"
read -r -a PYTEST_ARGS <<< "${GPU_CHECK_PYTEST_ARGS:-tests/test_device_agnostic.py}"
export PEFT_QALORA_CACHE="${PEFT_QALORA_CACHE:-$REPO/.cache}"
export PYTHONPATH="$REPO/src:$REPO/tests${PYTHONPATH:+:$PYTHONPATH}"  # the package from this checkout, no install
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-4}"
SECONDS=0
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

say() { printf '\n== %s (%ds)\n' "$*" "$SECONDS"; }

say "python and torch"
"$PY" - "$DEVICE" <<'PY'
import sys, torch
device = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU visible: {torch.cuda.is_available()}")
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU; check the driver (nvidia-smi) and that torch is a CUDA build, "
             "or set GPU_CHECK_DEVICE=cpu for a dry run.")
PY

say "missing packages (from $WHEELS, no index)"
# benchmarks/gpu_requirements.txt: what a CUDA box with torch, transformers, peft and triton lacks, by import name
# (their own dependencies come from the same folder)
missing=()
while read -r module requirement; do
  [[ -z "$module" || "$module" == \#* ]] && continue
  if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)"; then
    missing+=("$requirement")
  fi
done < benchmarks/gpu_requirements.txt
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  if [[ ! -d "$WHEELS" ]]; then
    echo "gpu_check: $WHEELS does not exist; make it on a machine with network: bash benchmarks/gpu_wheels.sh $WHEELS" >&2
    exit 2
  fi
  timeout 150 "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "${missing[@]}"
else
  echo "nothing missing"
fi
"$PY" -c "import peft_qalora, sys; print('peft_qalora from', peft_qalora.__file__)"

say "GPU"
if [[ "$DEVICE" == cuda* ]] && command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version,utilization.gpu --format=csv
else
  echo "no nvidia-smi query (device $DEVICE)"
fi

say "device tests on $DEVICE: ${PYTEST_ARGS[*]}"
tests_rc=0
tests_start=$SECONDS
PEFT_QALORA_TEST_DEVICE="$DEVICE" timeout 210 "$PY" -m pytest -q -p no:cacheprovider "${PYTEST_ARGS[@]}" \
  --junitxml "$WORK/junit.xml" || tests_rc=$?
tests_s=$((SECONDS - tests_start))
echo "pytest exit status $tests_rc after ${tests_s}s"

left=$((BUDGET - SECONDS))
((left < 60)) && left=60  # the report still gets written; the budget's margin absorbs this
say "training steps on $DEVICE (at most ${left}s)"
timing=(--device "$DEVICE" --results "$RESULTS" --pytest-junit "$WORK/junit.xml" --pytest-rc "$tests_rc"
        --pytest-seconds "$tests_s")
[[ "${GPU_CHECK_TINY:-0}" == 1 ]] && timing+=(--tiny)
timing_rc=0
timeout "$left" "$PY" benchmarks/gpu_check.py "${timing[@]}" || timing_rc=$?
((timing_rc == 124)) && echo "gpu_check: the timing part ran out of its ${left}s; $RESULTS/gpu_check.md has the rows done"

say "done: tests rc $tests_rc, timing rc $timing_rc; results in $RESULTS/gpu_check.{json,md}"
((tests_rc == 0 && timing_rc == 0))

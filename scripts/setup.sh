#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with every dependency, ONNX Runtime's
# headers for the custom-op library, and lsoftmax built (CUDA sources included when nvcc exists).
# Environment: PYTHON (default python3), LSOFTMAX_CUDA (AUTO/ON/OFF), LSOFTMAX_WERROR (OFF/ON).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch is pinned: this version is a CPU build on local disk; an unpinned torch pulls CUDA builds.
python -m pip install -q "torch==2.13.0" numpy onnx onnxruntime onnxscript "pybind11>=2.12" \
  "scikit-build-core>=0.10" cmake ninja pytest hypothesis ruff tqdm matplotlib scikit-learn protobuf
if [ -z "${ONNXRUNTIME_ROOT:-}" ]; then
  ONNXRUNTIME_ROOT="$(bash scripts/fetch_ort_headers.sh)" || {
    echo "setup: could not fetch ONNX Runtime headers; the ORT library will be skipped" >&2
    ONNXRUNTIME_ROOT=""
  }
fi
export ONNXRUNTIME_ROOT
if [ -d /usr/local/cuda/bin ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
python -m pip install -q --no-build-isolation -e .
python -c "import lsoftmax._core as c; print('lsoftmax built; CUDA compiled:', c.cuda_compiled)"

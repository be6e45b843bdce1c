#!/usr/bin/env bash
# Check the ONNX Runtime custom-op library against the oldest onnxruntime it supports.
#
# The main venv (newest onnxruntime) exports a corpus of models, inputs and torch outputs
# (tests/ort_compat.py generate); a second venv with only numpy + onnxruntime==$ORT_OLDEST runs
# them with and without liblsoftmax_ort.so (tests/ort_compat.py check): parity in every export
# mode, which implementation ran, bad attributes and bad labels. torch is not needed there.
# Environment: MAIN_PYTHON (the venv with lsoftmax built; default .venv/bin/python, else python),
# ORT_OLDEST (default 1.16.3), ORT_COMPAT_VENV (default build/ort-compat-venv).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
main_py="${MAIN_PYTHON:-}"
if [ -z "$main_py" ]; then
  if [ -x .venv/bin/python ]; then main_py=.venv/bin/python; else main_py="$(command -v python)"; fi
fi
oldest="${ORT_OLDEST:-1.16.3}"
venv="${ORT_COMPAT_VENV:-$root/build/ort-compat-venv}"
# onnxruntime wheels before 1.19 are built against numpy 1.x.
numpy_pin="numpy"
if [ "$(printf '%s\n' "$oldest" 1.19 | sort -V | head -n1)" != "1.19" ]; then numpy_pin="numpy<2"; fi

if [ ! -x "$venv/bin/python" ]; then
  base_py="$("$main_py" -c 'import sys; print(sys._base_executable)')"
  "$base_py" -m venv "$venv"
fi
# pip's cache is shared with the main install, so a re-run downloads nothing.
"$venv/bin/python" -m pip install -q --no-compile --disable-pip-version-check "onnxruntime==$oldest" "$numpy_pin"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$main_py" tests/ort_compat.py generate "$work" 2>&1 | grep -v -e '^W[0-9]' -e 'torchvision' || true
[ -f "$work/manifest.json" ] || { echo "ci_ort_compat: generating the corpus failed" >&2; exit 1; }
lib="$("$main_py" -c 'from lsoftmax import ort; print(ort.library_path())')"
echo "ci_ort_compat: $lib against onnxruntime $oldest"
"$venv/bin/python" tests/ort_compat.py check "$work" "$lib"

#!/usr/bin/env bash
# Rebuild the editable install after C++ changes. Serialized with a lock, because several
# developers may share one checkout and build directory.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
py="${VENV_PYTHON:-$(command -v python)}"
export ONNXRUNTIME_ROOT="${ONNXRUNTIME_ROOT:-$root/build/onnxruntime-headers}"
[ -f "$ONNXRUNTIME_ROOT/include/onnxruntime_cxx_api.h" ] || bash scripts/fetch_ort_headers.sh >/dev/null
export PATH="/usr/local/cuda/bin:$PATH"
export LSOFTMAX_WERROR="${LSOFTMAX_WERROR:-ON}"
exec flock /tmp/lsoftmax-build.lock "$py" -m pip install -q --no-build-isolation -e "$root"

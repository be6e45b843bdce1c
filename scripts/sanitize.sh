#!/usr/bin/env bash
# Build the core, its Python module and the ONNX Runtime library with AddressSanitizer and
# UndefinedBehaviorSanitizer (CPU only, in build/sanitize, apart from the editable install) and
# run the core, L-GM and ONNX Runtime tests against them. Any report fails the run.
#
# The Python process is not instrumented, so libasan is preloaded (reports go to stderr: pytest
# captures only Python-level output here); the sanitized lsoftmax._core
# is put in front of the installed one by a meta-path finder (tests import lsoftmax as usual),
# and the sanitized liblsoftmax_ort.so goes through LSOFTMAX_ORT_LIBRARY.
# Environment: SANITIZE_TESTS (pytest arguments; default: the core, L-GM and ORT tests).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
py="${VENV_PYTHON:-$root/.venv/bin/python}"
bin="$(dirname "$py")"
build="$root/build/sanitize"
ort_root="${ONNXRUNTIME_ROOT:-$root/build/onnxruntime-headers}"
[ -f "$ort_root/include/onnxruntime_cxx_api.h" ] || ort_root="$(bash scripts/fetch_ort_headers.sh)"
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
"$bin/cmake" -S "$root" -B "$build" -G Ninja -DCMAKE_MAKE_PROGRAM="$bin/ninja" \
  -DCMAKE_BUILD_TYPE=Sanitize -DCMAKE_CXX_FLAGS="-O1 -g $san" \
  -DCMAKE_SHARED_LINKER_FLAGS="$san" -DCMAKE_MODULE_LINKER_FLAGS="$san" \
  -DLSOFTMAX_CUDA=OFF -DLSOFTMAX_WERROR=ON -DLSOFTMAX_PYTHON=ON \
  -DPython_EXECUTABLE="$py" -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" \
  -DONNXRUNTIME_ROOT="$ort_root" >/dev/null
nice -n 10 "$bin/cmake" --build "$build"
core_so="$(find "$build" -name '_core*.so' | head -n1)"
ort_so="$(find "$build" -name 'liblsoftmax_ort.so' | head -n1)"
[ -n "$core_so" ] && [ -n "$ort_so" ] || { echo "sanitize: build produced no libraries" >&2; exit 1; }

tests=(${SANITIZE_TESTS:-tests/test_lsoftmax_core.py tests/test_lgm_core.py tests/test_ort_ops.py
  tests/test_reliability_core.py tests/test_reliability_ort.py})
# Leaks are Python's and torch's (interned objects, caches), not ours: leak checking is off.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export LSOFTMAX_ORT_LIBRARY="$ort_so" LSOFTMAX_SANITIZED_CORE="$core_so"
# libstdc++ is preloaded with libasan: the Python binary does not link it, and ASan's
# __cxa_throw interceptor must find the real one when it starts (else the first C++ exception
# aborts with "CHECK failed: real___cxa_throw").
preload="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libstdc++.so)"
LD_PRELOAD="$preload" nice -n 10 "$py" - "${tests[@]}" <<'PY'
import importlib.util
import os
import sys

CORE = os.environ["LSOFTMAX_SANITIZED_CORE"]


class SanitizedCore:
    """Loads lsoftmax._core from the sanitizer build instead of the installed one."""

    def find_spec(self, name, path=None, target=None):
        if name == "lsoftmax._core":
            return importlib.util.spec_from_file_location(name, CORE)
        return None


sys.meta_path.insert(0, SanitizedCore())
import pytest  # noqa: E402

import lsoftmax._core  # noqa: E402

assert lsoftmax._core.__file__ == CORE, lsoftmax._core.__file__
# The library-path test checks the installed library, which LSOFTMAX_ORT_LIBRARY overrides here.
skip = "tests/test_ort_ops.py::test_library_path_is_the_built_library"
args = ["-q", "-x", "--capture=sys", "-p", "no:cacheprovider", "--deselect", skip]
sys.exit(pytest.main([*args, *sys.argv[1:]]))
PY
echo "sanitize: no ASan/UBSan report"

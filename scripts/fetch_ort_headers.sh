#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ headers (the onnxruntime wheels ship none) into a folder and print
# the ONNXRUNTIME_ROOT to use. The build does this by itself when it finds no headers; this is
# for pointing other builds at them. Same code as the build: cmake/fetch_ort_headers.cmake
# (Debian's libonnxruntime-dev, pinned by SHA-256, unpacked by CMake; no apt state is touched).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/build/onnxruntime-headers}"
cmake -DDEST="$dest" -P "$root/cmake/fetch_ort_headers.cmake"

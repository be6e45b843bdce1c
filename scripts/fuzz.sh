#!/usr/bin/env bash
# Long fuzzing of every file reader (tests/test_fuzz.py): Caffe prototxt and caffemodel, MXNet
# symbol and params, the ONNX models given to `lsoftmax infer`. The test suite runs 30
# examples per reader with a fixed seed; this runs EXAMPLES (default 2000) per reader with
# fresh random seeds each time. Same bounds: 10 s per example, 1 GiB of peak-RSS growth.
# Usage: bash scripts/fuzz.sh [EXAMPLES] [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
examples="${1:-2000}"
shift || true
LSOFTMAX_FUZZ_EXAMPLES="$examples" LSOFTMAX_FUZZ_RANDOM=1 \
  nice -n 10 "${VENV_PYTHON:-.venv/bin/python}" -m pytest tests/test_fuzz.py -q -p no:cacheprovider \
  --hypothesis-show-statistics "$@"

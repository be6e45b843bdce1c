#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build lsoftmax with CUDA, run every GPU test and the GPU
# benchmarks, and print one summary table. Needs no network: it reports what the installed
# packages offer (a CUDA build of torch, onnxruntime-gpu, CuPy) and says what could not run.
#
#   bash benchmarks/gpu_check.sh            # full
#   QUICK=1 bash benchmarks/gpu_check.sh    # fewer benchmark repetitions
#   SKIP_BUILD=1 bash benchmarks/gpu_check.sh
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
py="${PYTHON:-$(command -v python || command -v python3)}"
export PATH="/usr/local/cuda/bin:$PATH"
log_dir="${LOG_DIR:-$(mktemp -d /tmp/lsoftmax-gpu-check.XXXXXX)}"
declare -a summary=()
add() { summary+=("$(printf '%-28s | %-5s | %s' "$1" "$2" "$3")"); }

echo "== environment (logs in $log_dir)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4 \
  | tee "$log_dir/nvidia-smi.txt"
gpu_name="$(head -1 "$log_dir/nvidia-smi.txt")"
nvcc --version 2>/dev/null | tail -1
"$py" - <<'EOF' 2>&1 | tee "$log_dir/env.txt"
import importlib.util
try:
    import torch
    print(f"torch {torch.__version__}, CUDA build: {torch.version.cuda}, "
          f"cuda available: {torch.cuda.is_available()}")
except Exception as e:
    print(f"torch: not importable ({e})")
try:
    import onnxruntime as ort
    providers = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}, providers: {providers}")
    if "CUDAExecutionProvider" not in providers:
        print("onnxruntime: NO CUDAExecutionProvider in this install (onnxruntime-gpu is needed); "
              "the ORT CUDA-EP tests will be skipped and the benchmark times the op's compute "
              "path directly instead")
except Exception as e:
    print(f"onnxruntime: not importable ({e})")
print("cupy:", "installed" if importlib.util.find_spec("cupy") else "not installed")
EOF
add "GPU" "info" "${gpu_name:-none found}"
add "packages" "info" "$(tr '\n' ';' < "$log_dir/env.txt" | cut -c1-160)"

echo "== build (LSOFTMAX_CUDA=ON)"
# The ONNX Runtime headers are fetched from Debian when missing; on a machine without network
# bring build/onnxruntime-headers along (the device tool's `carry`), or the build goes on
# without liblsoftmax_ort.so (CMake skips it) and the ORT tests report the missing library.
export ONNXRUNTIME_ROOT="${ONNXRUNTIME_ROOT:-$root/build/onnxruntime-headers}"
ort_headers="found"
if [ ! -f "$ONNXRUNTIME_ROOT/include/onnxruntime_cxx_api.h" ] \
  && ! bash scripts/fetch_ort_headers.sh "$ONNXRUNTIME_ROOT" >"$log_dir/ort_headers.txt" 2>&1; then
  ort_headers="MISSING (no network?): liblsoftmax_ort.so not built"
  echo "ONNX Runtime headers: $ort_headers"
fi
if [ -n "${SKIP_BUILD:-}" ]; then
  add "build" "skip" "SKIP_BUILD set"
elif LSOFTMAX_CUDA=ON LSOFTMAX_WERROR=ON flock /tmp/lsoftmax-build.lock \
  "$py" -m pip install -q --no-build-isolation -e "$root" >"$log_dir/build.txt" 2>&1; then
  add "build (CUDA ON, -Werror)" "ok" "archs 80,86,89,90; ORT headers: $ort_headers"
else
  add "build (CUDA ON, -Werror)" "FAIL" "see $log_dir/build.txt (needs scikit-build-core, pybind11, cmake)"
  tail -30 "$log_dir/build.txt"
fi

"$py" -c "import lsoftmax.cuda as c; print('lsoftmax.cuda.available():', c.available(), c.unavailable_reason())" \
  2>&1 | tee "$log_dir/available.txt"
add "lsoftmax.cuda.available()" "info" "$(tr '\n' ' ' < "$log_dir/available.txt" | cut -c1-120)"

run_tests() {  # name, log, pytest args...
  local name="$1" log="$2"
  shift 2
  "$py" -m pytest -q -rfEs -p no:cacheprovider "$@" >"$log" 2>&1
  local rc=$?
  local line
  line="$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$log" | tail -1)"
  if [ $rc -eq 0 ]; then add "$name" "ok" "$line"; else add "$name" "FAIL" "$line (log: $log)"; fi
  grep -E "^(FAILED|ERROR)" "$log" | head -20
}

echo "== GPU tests"
run_tests "tests: CUDA kernels/torch" "$log_dir/test_cuda.txt" tests/test_cuda.py
run_tests "tests: ORT CUDA EP" "$log_dir/test_ort_cuda.txt" tests/test_ort_cuda.py
run_tests "tests: L-GM CUDA" "$log_dir/test_lgm_cuda.txt" tests/test_lgm_cuda.py
run_tests "tests: all gpu-marked" "$log_dir/test_gpu_marked.txt" -m gpu tests
run_tests "tests: full suite" "$log_dir/test_all.txt" tests

echo "== benchmarks"
bench_args=(--json "$log_dir/bench.json")
[ -n "${QUICK:-}" ] && bench_args+=(--quick)
"$py" benchmarks/bench_gpu.py "${bench_args[@]}" 2>&1 | tee "$log_dir/bench.txt"
case "${PIPESTATUS[0]}" in
  0) add "benchmarks" "ok" "tables above; JSON: $log_dir/bench.json" ;;
  2) add "benchmarks" "skip" "$(tail -1 "$log_dir/bench.txt" | cut -c1-120)" ;;
  *) add "benchmarks" "FAIL" "see $log_dir/bench.txt" ;;
esac

echo
echo "== summary"
printf '%-28s | %-5s | %s\n' "step" "state" "detail"
printf '%s\n' "-----------------------------+-------+------------------------------------------"
printf '%s\n' "${summary[@]}"

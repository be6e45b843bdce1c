"""GPU benchmarks, side by side (ratios, not absolute claims):

1. training step on CUDA: ``LSoftmaxLinear``-style margin logits + cross-entropy, forward and
   backward, against ``nn.Linear(bias=False)`` + cross-entropy, N in {256, 4096}, D = 512,
   C in {10, 1000, 100000}; target ratio <= 1.05. Timed with CUDA events, the two variants
   interleaved, the median of the repetitions reported. Rows for the default settings
   (atomic grad_weight sums, synchronous label check), the asynchronous label check, no label
   check, and the deterministic mode.
2. ONNX Runtime inference on the CUDA EP: the ``ai.lsoftmax`` custom-op model against the
   portable (standard ops) model, inputs and outputs bound on the device; target >= 0.95
   (throughput of the custom op relative to the portable model). When the installed
   onnxruntime has no CUDA EP this says so and times the custom op's compute path (cuBLAS GEMM +
   the core's margin kernel, via torch and lsoftmax.cuda) against the plain GEMM instead.

Run: ``python benchmarks/bench_gpu.py [--quick] [--json out.json]`` (benchmarks/gpu_check.sh does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def _cuda_events_ms(fn: Callable[[], Any], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def side_by_side(a: Callable[[], Any], b: Callable[[], Any], reps: int) -> tuple[float, float]:
    """Median ms of ``a`` and ``b``, measured in alternating blocks after a warm-up."""
    for _ in range(3):
        a()
        b()
    torch.cuda.synchronize()
    ta: list[float] = []
    tb: list[float] = []
    block = max(1, reps // 5)
    for _ in range(5):
        ta += _cuda_events_ms(a, block)
        tb += _cuda_events_ms(b, block)
    return statistics.median(ta), statistics.median(tb)


TRAIN_MODES = (
    ("default", "sync", False),
    ("async-check", "async", False),
    ("check-off", "off", False),
    ("deterministic", "sync", True),
)


def _train_case(n: int, c: int, d: int, quick: bool) -> list[dict[str, Any]]:
    import lsoftmax.torch as lt
    from lsoftmax.torch.functional import lsoftmax_logits

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=gen, requires_grad=True)
    y = torch.randint(0, c, (n,), device="cuda", generator=gen)
    w = (torch.randn(c, d, device="cuda", generator=gen) * 0.05).requires_grad_(True)
    linear = torch.nn.Linear(d, c, bias=False, device="cuda")
    with torch.no_grad():
        linear.weight.copy_(w)

    def plain() -> None:
        F.cross_entropy(linear(x), y).backward()

    def margin() -> None:
        F.cross_entropy(lsoftmax_logits(x, w, y, 4, 0.0), y).backward()

    reps = 20 if quick or c == 100000 else 50
    rows = []
    try:
        for name, check, det in TRAIN_MODES:
            lt.set_label_check(check)
            lt.set_deterministic(det)
            t_m, t_p = side_by_side(margin, plain, reps)
            rows.append(
                {
                    "bench": "train fwd+bwd",
                    "mode": name,
                    "N": n,
                    "D": d,
                    "C": c,
                    "lsoftmax_ms": round(t_m, 4),
                    "linear_ms": round(t_p, 4),
                    "ratio": round(t_m / t_p, 3),
                    "target": "<= 1.05",
                }
            )
    finally:
        lt.set_label_check("sync")
        lt.set_deterministic(None)
    return rows


def bench_training(quick: bool) -> list[dict[str, Any]]:
    rows = []
    for n in (256, 4096):
        for c in (10, 1000, 100000):
            rows += _train_case(n, c, 512, quick)
            torch.cuda.empty_cache()
    return rows


def _export_head(path: Path, mode: str, d: int, c: int, labels: bool) -> None:
    from lsoftmax.exporters import export_onnx

    from lsoftmax.torch.functional import lsoftmax_logits

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(c, d) * 0.05)

        def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
            return lsoftmax_logits(x, self.weight, target, 4, 0.0)

    x = torch.randn(8, d)
    args: tuple[Any, ...] = (x, torch.randint(0, c, (8,))) if labels else (x,)
    export_onnx(Head(), args, path, mode=mode)


def _ort_session(path: Path) -> Any:
    import onnxruntime as ort

    from lsoftmax.ort import library_path

    so = ort.SessionOptions()
    so.register_custom_ops_library(library_path())
    providers = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), so, providers=providers)


def _ort_runner(sess: Any, feeds: dict[str, Any]) -> Callable[[], None]:
    import onnxruntime as ort

    binding = sess.io_binding()
    for name, value in feeds.items():
        # Features on the device; labels (small) on the host, where the custom op's CUDA kernel
        # takes them (the portable graph copies them up itself).
        device = "cpu" if value.dtype.kind == "i" else "cuda"
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cuda")

    def run() -> None:
        sess.run_with_iobinding(binding)

    return run


def _wall_ms(fn: Callable[[], None], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()  # run_with_iobinding returns when the outputs are ready
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def bench_ort(quick: bool) -> tuple[list[dict[str, Any]], str]:
    import numpy as np
    import onnxruntime as ort

    providers = ort.get_available_providers()
    rows: list[dict[str, Any]] = []
    if "CUDAExecutionProvider" not in providers:
        note = (
            f"onnxruntime {ort.__version__} offers {providers}: no CUDAExecutionProvider "
            "(install onnxruntime-gpu). Ran instead the custom op's CUDA compute path "
            "(cuBLAS GEMM via torch + lsoftmax.cuda.margin_forward_) against the plain GEMM."
        )
        return _bench_compute_path(quick), note
    note = f"onnxruntime {ort.__version__} with CUDAExecutionProvider"
    d = 512
    with tempfile.TemporaryDirectory() as tmp:
        for c in (10, 1000, 100000):
            for labels in (False, True):
                paths = {}
                for mode in ("custom", "portable"):
                    paths[mode] = Path(tmp) / f"head_{mode}_{c}_{labels}.onnx"
                    _export_head(paths[mode], mode, d, c, labels)
                for n in (256, 4096):
                    rng = np.random.default_rng(0)
                    feeds_arrays = [rng.standard_normal((n, d)).astype(np.float32)]
                    if labels:
                        feeds_arrays.append(rng.integers(0, c, n).astype(np.int64))
                    runs = {}
                    for mode, path in paths.items():
                        sess = _ort_session(path)
                        names = [i.name for i in sess.get_inputs()]
                        runs[mode] = _ort_runner(sess, dict(zip(names, feeds_arrays, strict=True)))
                    for fn in runs.values():
                        for _ in range(3):
                            fn()
                    reps = 10 if quick else 30
                    t_c: list[float] = []
                    t_p: list[float] = []
                    for _ in range(5):
                        t_c += _wall_ms(runs["custom"], reps // 5 or 1)
                        t_p += _wall_ms(runs["portable"], reps // 5 or 1)
                    mc, mp = statistics.median(t_c), statistics.median(t_p)
                    rows.append(
                        {
                            "bench": "ORT CUDA EP",
                            "mode": "margin logits" if labels else "plain logits",
                            "N": n,
                            "D": d,
                            "C": c,
                            "custom_ms": round(mc, 4),
                            "portable_ms": round(mp, 4),
                            "speed_ratio": round(mp / mc, 3),
                            "target": ">= 0.95",
                        }
                    )
    return rows, note


def _compute_path_case(n: int, c: int, d: int, quick: bool) -> dict[str, Any]:
    import lsoftmax.cuda as lc

    x = torch.randn(n, d, device="cuda")
    w = torch.randn(c, d, device="cuda") * 0.05
    y = torch.randint(0, c, (n,), device="cuda")
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    stream = torch.cuda.current_stream()

    def custom() -> None:
        logits = x @ w.t()
        lc.margin_forward_(logits, x, w, y, 4, 0.0, stream=stream, error_flag=flag)

    def gemm() -> None:
        _ = x @ w.t()

    t_c, t_g = side_by_side(custom, gemm, 10 if quick else 30)
    return {
        "bench": "ORT compute path (no CUDA EP)",
        "mode": "margin logits",
        "N": n,
        "D": d,
        "C": c,
        "custom_ms": round(t_c, 4),
        "portable_ms": round(t_g, 4),
        "speed_ratio": round(t_g / t_c, 3),
        "target": ">= 0.95 (vs plain GEMM)",
    }


def _bench_compute_path(quick: bool) -> list[dict[str, Any]]:
    return [_compute_path_case(n, c, 512, quick) for n in (256, 4096) for c in (10, 1000, 100000)]


def print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print(" | ".join(k.ljust(widths[k]) for k in keys))
    print("-+-".join("-" * widths[k] for k in keys))
    for r in rows:
        print(" | ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--skip-ort", action="store_true")
    args = parser.parse_args()

    import lsoftmax.cuda as lc

    if not torch.cuda.is_available():
        print(f"bench_gpu: torch {torch.__version__} has no usable CUDA: nothing to time")
        return 2
    if not lc.available():
        print(f"bench_gpu: lsoftmax cannot use the GPU: {lc.unavailable_reason()}")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    train = bench_training(args.quick)
    print_table(train)
    ort_rows: list[dict[str, Any]] = []
    note = "skipped (--skip-ort)"
    if not args.skip_ort:
        ort_rows, note = bench_ort(args.quick)
        print(f"\nONNX Runtime: {note}")
        print_table(ort_rows)
    if args.json:
        args.json.write_text(json.dumps({"train": train, "ort": ort_rows, "ort_note": note}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

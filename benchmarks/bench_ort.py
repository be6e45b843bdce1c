"""ONNX Runtime inference throughput (CPU): torch eager vs ORT portable / custom / function.

One model (an MLP with an ``LSoftmaxLinear`` head; default input 512 -> hidden 512 -> 1000
classes) is exported in the three modes and timed side by side: implementations interleaved in
rotating order within every round, warm-up first, medians reported, ratios relative to ORT
portable (> 1 = faster than portable).

    python benchmarks/bench_ort.py                      # batch 1 and 256, 1 and 2 threads
    python benchmarks/bench_ort.py --batches 1 64 256 --feat-dim 512 --classes 1000 --rounds 30
    python benchmarks/bench_ort.py --head-only          # the head alone: our kernel against Gemm
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from lsoftmax.exporters import export_onnx
from torch import nn

from lsoftmax import ort as lort
from lsoftmax.torch import LSoftmaxLinear

IMPLS = ("torch eager", "ORT portable", "ORT custom", "ORT function")


class HeadMLP(nn.Module):
    def __init__(
        self, in_features: int, feat_dim: int, classes: int, margin: int, head_only: bool = False
    ) -> None:
        super().__init__()
        self.body: nn.Module = nn.Identity()
        if not head_only:
            self.body = nn.Sequential(nn.Linear(in_features, feat_dim), nn.ReLU())
        self.head = LSoftmaxLinear(feat_dim, classes, margin=margin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _block(fn: Callable[[], object], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--in-features", type=int, default=512)
    p.add_argument("--feat-dim", type=int, default=512, help="D, the head's input size (512)")
    p.add_argument("--classes", type=int, default=1000, help="C (1000)")
    p.add_argument("--margin", type=int, default=4)
    p.add_argument("--rounds", type=int, default=25, help="timed rounds per batch size (25)")
    p.add_argument("--min-block", type=float, default=0.02, help="seconds per timed block")
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="intra-op (and torch) thread counts, one full table each, in the same run (1 2)",
    )
    p.add_argument(
        "--spinning",
        action="store_true",
        help="let ORT's intra-op threads spin between runs (default off: the sessions of one "
        "process would compete through their spinners)",
    )
    p.add_argument(
        "--head-only",
        action="store_true",
        help="time the LSoftmaxLinear head alone (input size --feat-dim), without the first layer",
    )
    args = p.parse_args()
    if args.head_only:
        args.in_features = args.feat_dim

    torch.manual_seed(0)
    model = HeadMLP(
        args.in_features, args.feat_dim, args.classes, args.margin, args.head_only
    ).eval()
    example = torch.randn(2, args.in_features)
    tmp = Path(tempfile.mkdtemp(prefix="bench_ort_"))
    paths = {}
    for mode in ("portable", "custom", "function"):
        paths[mode] = tmp / f"{mode}.onnx"
        export_onnx(model, example, paths[mode], mode=mode)
    for threads in args.threads:
        run_tables(args, model, paths, threads)


def run_tables(
    args: argparse.Namespace, model: nn.Module, paths: dict[str, Path], threads: int
) -> None:
    torch.set_num_threads(threads)

    def make(path: Path, library: bool) -> onnxruntime.InferenceSession:
        so = onnxruntime.SessionOptions()
        so.intra_op_num_threads = threads
        # Three sessions (and torch) live in this process, each with its own intra-op pool. A
        # spinning pool keeps its cores busy for a while after each run, so with spinning on the
        # session timed next would share the cores with the last one's spinners.
        so.add_session_config_entry("session.intra_op.allow_spinning", str(int(args.spinning)))
        if library:
            so.register_custom_ops_library(lort.library_path())
        return onnxruntime.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    sessions = {
        # The portable file needs no library; custom and function run our kernel.
        "ORT portable": make(paths["portable"], library=False),
        "ORT custom": make(paths["custom"], library=True),
        "ORT function": make(paths["function"], library=True),
    }

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"machine: {_cpu_name()}, {os.cpu_count()} logical cores, threads={threads}, "
        f"ORT spinning {'on' if args.spinning else 'off'}, load average {load}"
    )
    body = "" if args.head_only else f"{args.in_features} -> {args.feat_dim} (ReLU) -> "
    print(
        f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}; model "
        f"{body}LSoftmaxLinear({args.feat_dim}, {args.classes}, margin={args.margin}), float32, "
        "inference (no labels)"
    )
    header = (
        f"{'batch':>5}  {'implementation':<14} {'median/call':>12} {'samples/s':>12}  vs portable"
    )
    print(header)
    print("-" * len(header))
    for batch in args.batches:
        x = torch.randn(batch, args.in_features)
        xn = x.numpy()
        calls: dict[str, Callable[[], object]] = {}

        def eager(x: torch.Tensor = x) -> object:
            with torch.inference_mode():
                return model(x)

        calls["torch eager"] = eager
        for name, sess in sessions.items():
            feed = {sess.get_inputs()[0].name: xn}
            calls[name] = lambda sess=sess, feed=feed: sess.run(None, feed)
        ref = calls["torch eager"]()
        for name in sessions:
            got = calls[name]()[0]  # type: ignore[index]
            np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)  # type: ignore[union-attr]
        # Warm-up, and an inner repeat count so that one timed block lasts ~min_block seconds.
        inner = {}
        for name, fn in calls.items():
            for _ in range(3):
                fn()
            once = _block(fn, 3)
            inner[name] = max(1, int(args.min_block / max(once, 1e-7)))
        times: dict[str, list[float]] = {name: [] for name in calls}
        names = list(calls)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                times[name].append(_block(calls[name], inner[name]))
        base = statistics.median(times["ORT portable"])
        for name in IMPLS:
            med = statistics.median(times[name])
            rate, ratio = batch / med, base / med
            print(f"{batch:>5}  {name:<14} {med * 1e6:>10.1f}us {rate:>12.0f}  {ratio:>8.3f}x")
        print()


if __name__ == "__main__":
    main()

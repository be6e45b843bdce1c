"""Parity of the margin family on every backend: max relative error against a float64 reference.

    python benchmarks/parity_family.py [--n 64] [--d 32] [--c 10] [--seed 0]

For each kind (L-Softmax m=4, SphereFace m=4, CosFace m=0.35 s=30, ArcFace m=0.5 s=30, ArcFace
easy_margin, combined m1=1 m2=0.3 m3=0.2 s=30) and each backend (the numpy API over the core,
torch, ONNX Runtime running our kernel (custom file), the model-local function body (function
file, no library) and the standard-op graph (portable file)), the training logits (with labels;
lambda 0.3 for the kinds that use it) in float32 and float64, compared with an independent
float64 reference written here from the formulas (acos / cos, not the core's closed forms). The
metric is the tests' one: max |a - ref| / max |ref|. Prints one table (docs/margins.md shows
it).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import numpy as np

LAM = 0.3


def reference(x: np.ndarray, w: np.ndarray, t: np.ndarray, spec: Any, lam: float) -> np.ndarray:
    """Float64 logits of ``spec`` with labels, from the published formulas."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    nx = np.linalg.norm(x, axis=1)
    nw = np.linalg.norm(w, axis=1)
    cos = (x / nx[:, None]) @ (w / nw[:, None]).T
    if spec.kind == "lsoftmax":
        out, a = x @ w.T, nx * nw[t]
    elif spec.kind == "sphereface":
        out, a = nx[:, None] * cos, nx
    else:
        out, a = spec.s * cos, np.full(len(x), float(spec.s))
    rows = np.arange(len(x))
    c = np.clip(cos[rows, t], -1.0, 1.0)
    theta = np.arccos(c)
    if spec.kind in ("lsoftmax", "sphereface"):
        m = spec.m
        k = np.clip(np.floor(theta * m / math.pi), 0, m - 1)
        psi = (-1.0) ** k * np.cos(m * theta) - 2.0 * k
        phi = (lam * c + psi) / (1.0 + lam)
    elif spec.kind == "cosface":
        phi = c - spec.m
    elif spec.kind == "combined":
        phi = np.cos(spec.m1 * theta + spec.m2) - spec.m3
    else:
        arc = np.cos(theta + spec.m)
        if spec.easy_margin:
            phi = np.where(c > 0, arc, c)
        else:
            phi = np.where(theta + spec.m <= math.pi, arc, c - spec.m * math.sin(spec.m))
    out = out.copy()
    out[rows, t] = a * phi
    return out


def max_rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


Run = Callable[[np.ndarray, np.ndarray, np.ndarray], Any]


def backends(spec: Any, lam: float) -> dict[str, Run]:
    import onnxruntime
    import torch
    from lsoftmax.exporters import finalize
    from lsoftmax.exporters.domain import DOMAIN
    from lsoftmax.exporters.margin_family import margin_attributes
    from lsoftmax.exporters.translations import translation_table
    from onnx import TensorProto, helper

    from lsoftmax import core
    from lsoftmax import ort as lort
    from lsoftmax.torch.functional import margin_logits

    translation_table()  # registers the ai.lsoftmax schemas with onnx

    def onnx_run(mode: str) -> Run:
        def run(x: np.ndarray, w: np.ndarray, t: np.ndarray) -> Any:
            elem = TensorProto.DOUBLE if x.dtype == np.float64 else TensorProto.FLOAT
            inputs = [
                helper.make_tensor_value_info("X", elem, list(x.shape)),
                helper.make_tensor_value_info("W", elem, list(w.shape)),
                helper.make_tensor_value_info("labels", TensorProto.INT64, [len(t)]),
            ]
            attrs = margin_attributes(spec.kind, spec.params(), lam)
            node = helper.make_node("MarginLinear", ["X", "W", "labels"], ["Y"], domain=DOMAIN,
                                    **attrs)  # fmt: skip
            out = helper.make_tensor_value_info("Y", elem, [len(x), len(w)])
            model = helper.make_model(
                helper.make_graph([node], "parity", inputs, [out]),
                opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                ir_version=9,
            )
            data = finalize(model, mode).SerializeToString()
            sess = lort.session(data) if mode == "custom" else onnxruntime.InferenceSession(data)
            return sess.run(None, {"X": x, "W": w, "labels": t})[0]

        return run

    def torch_run(x: np.ndarray, w: np.ndarray, t: np.ndarray) -> Any:
        with torch.no_grad():
            out = margin_logits(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(t),
                                spec, lam=lam)  # fmt: skip
        return out.numpy()

    return {
        "numpy (core)": lambda x, w, t: core.forward(x, w, t, margin=spec, lam=lam),
        "torch (CPU)": torch_run,
        "ORT kernel (custom)": onnx_run("custom"),
        "ORT function body": onnx_run("function"),
        "ORT portable": onnx_run("portable"),
    }


def main(argv: list[str] | None = None) -> None:
    from lsoftmax import margins

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--c", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    x64 = rng.standard_normal((args.n, args.d))
    w64 = rng.standard_normal((args.c, args.d))
    t = rng.integers(0, args.c, args.n).astype(np.int64)
    specs = {
        "lsoftmax m=4": margins.LSoftmax(4),
        "sphereface m=4": margins.SphereFace(4),
        "cosface m=0.35 s=30": margins.CosFace(0.35, 30.0),
        "arcface m=0.5 s=30": margins.ArcFace(0.5, 30.0),
        "arcface easy": margins.ArcFace(0.5, 30.0, easy_margin=True),
        "combined 1,0.3,0.2 s=30": margins.Combined(1.0, 0.3, 0.2, 30.0),
    }
    print(f"max relative error vs the float64 reference (N={args.n}, D={args.d}, C={args.c}, "
          f"lambda {LAM} where used)")  # fmt: skip
    print(f"{'kind':<26}{'backend':<22}{'float32':>10}{'float64':>10}")
    for label, spec in specs.items():
        lam = LAM if spec.uses_lambda else 0.0
        for backend, run in backends(spec, lam).items():
            errs = []
            for dtype in (np.float32, np.float64):
                x, w = x64.astype(dtype), w64.astype(dtype)
                # The reference sees the inputs the backend saw (rounded to float32 there).
                errs.append(max_rel(run(x, w, t), reference(x, w, t, spec, lam)))
            print(f"{label:<26}{backend:<22}{errs[0]:>10.1e}{errs[1]:>10.1e}")


if __name__ == "__main__":
    main()

"""Function-mode export at the largest accepted margin (2^20): the standard-op body has
O(log m) nodes (binary search for the segment, doubling ladder for T_m), so the file stays small
and the export fast, and the body still matches the kernel and the float64 reference, in
ONNX Runtime and in onnx.reference (docs/reliability.md)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import TOL
from lsoftmax.exporters import export_onnx, finalize
from onnx.reference import ReferenceEvaluator
from reference import lsoftmax_reference, max_rel_err
from test_ort_ops import F32, F64, NP, op_model

from lsoftmax import core
from lsoftmax import ort as lort
from lsoftmax.torch.functional import lsoftmax_logits


def tol(dtype: int, margin: int) -> float:
    """The parity tolerance, widened with m: psi's slope in cos(theta) reaches m^2 while |psi|
    is ~2m, so rounding cos(theta) to the input's type alone (kernel and body alike) moves the
    margin logit by ~eps * m relative to the largest logit (2.9e-5 measured at m = 1000 in
    float32)."""
    return max(TOL[dtype], 2 * float(np.finfo(NP[dtype]).eps) * margin)


def _data(dtype: int, n: int = 12, d: int = 6, c: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(NP[dtype])
    w = rng.standard_normal((c, d)).astype(NP[dtype])
    y = rng.integers(0, c, n).astype(np.int64)
    x[0] = w[y[0]] * 2  # theta = 0 and pi: the first and the last segment
    x[1] = -w[y[1]]
    return x, w, y


def _body_nodes(model: onnx.ModelProto) -> int:
    return sum(len(f.node) for f in model.functions)


def test_body_size_does_not_grow_with_margin() -> None:
    sizes = {}
    for m in (2, 3, 1000, 2**19 + 12345, 2**20):
        model = finalize(onnx.load_from_string(op_model({"margin": m, "lambda": 0.5})), "function")
        sizes[m] = _body_nodes(model)
    # O(log m): two ladder steps and one search step per bit.
    assert max(sizes.values()) <= 600, sizes
    assert sizes[2**20] <= sizes[1000] * 3, sizes


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("margin", [2, 5, 7, 1000, 2**20 - 1, 2**20])
def test_body_matches_kernel_and_reference(margin: int, dtype: int) -> None:
    lam = 0.5
    custom = onnx.load_from_string(op_model({"margin": margin, "lambda": lam}, dtype=dtype))
    function = finalize(custom, "function").SerializeToString()
    x, w, y = _data(dtype, seed=margin % 97)
    feeds = {"X": x, "W": w, "labels": y}
    kernel = lort.session(custom.SerializeToString()).run(None, feeds)[0]
    so = onnxruntime.SessionOptions()
    if margin > 1000:
        # Known: ONNX Runtime's graph optimizations (even the basic level) change the segment
        # search at m ~ 2^20 near theta = pi (k off by 64 for cos = -1); the graph itself is
        # exact, as onnx.reference and ORT without optimizations show (docs/reliability.md).
        so.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    body = onnxruntime.InferenceSession(function, so).run(None, feeds)[0]
    ref = lsoftmax_reference(
        torch.from_numpy(x).double(), torch.from_numpy(w).double(), torch.from_numpy(y), margin, lam
    ).numpy()
    np.testing.assert_array_equal(kernel, core.forward(x, w, y, margin=margin, lam=lam))
    assert max_rel_err(body, ref) <= tol(dtype, margin)
    assert max_rel_err(body, kernel) <= tol(dtype, margin)
    evaluated = ReferenceEvaluator(onnx.load_from_string(function)).run(None, feeds)[0]
    assert max_rel_err(evaluated, ref) <= tol(dtype, margin)


def test_torch_export_at_largest_margin_is_small(tmp_path) -> None:
    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(5, 6))

        def forward(self, x, y):
            return lsoftmax_logits(x, self.weight, y, 2**20, 0.5)

    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    path = tmp_path / "m.onnx"
    export_onnx(Head().eval(), (x, y), str(path), mode="function")
    assert path.stat().st_size < 200_000  # 139 MB (2.1M nodes) before
    body = onnxruntime.InferenceSession(str(path))
    feeds = dict(zip([i.name for i in body.get_inputs()], [x.numpy(), y.numpy()], strict=True))
    kernel = lort.session(str(path)).run(None, feeds)[0]
    assert max_rel_err(body.run(None, feeds)[0], kernel) <= 1e-5


def test_margin_beyond_limit_is_refused_by_the_exporter() -> None:
    model = onnx.load_from_string(op_model({"margin": 2**20 + 1}))
    with pytest.raises(ValueError, match=r"margin must be an integer in \[1, 2\^20\]"):
        finalize(model, "function")

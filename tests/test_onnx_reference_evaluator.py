"""Every export mode runs in onnx's own ``onnx.reference.ReferenceEvaluator`` as well as in
ONNX Runtime, to parity tolerance (max relative error <= 1e-5 in float32, <= 1e-10 in float64).

``portable`` and ``function`` files must run in any conformant runtime, so they run there as
they are. A ``custom`` file needs a runtime that has our kernel: the evaluator gets one through
``new_ops`` (``onnx_models.reference_kernels``, over the numpy API). The L-GM op gets the same
check in ``test_lgm_onnx.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import TOL
from lsoftmax.exporters import export_onnx, finalize
from onnx.reference import ReferenceEvaluator
from onnx_models import MLP, WithLabels, copy_model, export_cache, inputs, reference_kernels
from reference import lsoftmax_reference, max_rel_err

from lsoftmax import ort as lort

LAM = 0.5  # exact in float32 (ONNX float attributes are float32)
MODES = ("portable", "custom", "function")
CASES = pytest.mark.parametrize(
    ("kind", "dtype"),
    [("mlp", torch.float32), ("mlp", torch.float64), ("cnn", torch.float32)],
    ids=["mlp-f32", "mlp-f64", "cnn-f32"],
)


def run_everywhere(
    proto: onnx.ModelProto, mode: str, arrays: list[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``finalize(proto, mode)`` run in the ReferenceEvaluator and in ONNX Runtime (portable and
    function files without our library, custom ones with it)."""
    model = finalize(copy_model(proto), mode)
    feeds = dict(zip([i.name for i in model.graph.input], arrays, strict=True))
    evaluator = ReferenceEvaluator(model, new_ops=reference_kernels() if mode == "custom" else None)
    data = model.SerializeToString()
    sess = lort.session(data) if mode == "custom" else onnxruntime.InferenceSession(data)
    return list(evaluator.run(None, feeds)), sess.run(None, feeds)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return export_cache(tmp_path_factory.mktemp("refeval"), LAM)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_labels", [False, True], ids=["plain", "labels"])
@CASES
def test_every_mode_in_reference_evaluator_and_ort(
    exported: Any, kind: str, dtype: torch.dtype, with_labels: bool, mode: str
) -> None:
    model, proto = exported(kind, dtype, with_labels)
    x, t = inputs(model, 5, dtype, seed=3)
    with torch.no_grad():
        feat = model.features(x).double()
        eager = WithLabels(model, 4, LAM)(x, t) if with_labels else model(x)
    weight = model.head.weight.detach().double()
    ref = lsoftmax_reference(feat, weight, t, 4, LAM) if with_labels else feat @ weight.T
    arrays = [x.numpy(), t.numpy()] if with_labels else [x.numpy()]
    (got_ref,), (got_ort,) = run_everywhere(proto, mode, arrays)
    assert got_ref.dtype == got_ort.dtype == x.numpy().dtype
    assert max_rel_err(got_ref, ref) <= TOL[dtype], "ReferenceEvaluator vs float64 reference"
    assert max_rel_err(got_ort, ref) <= TOL[dtype], "ONNX Runtime vs float64 reference"
    assert max_rel_err(got_ref, eager) <= TOL[dtype], "ReferenceEvaluator vs torch"


def test_inference_heads_of_several_margins_share_one_function(tmp_path: Any) -> None:
    """Without labels every margin is the plain logits: one function, no overloads (which the
    ReferenceEvaluator ignores), so an ensemble of inference heads runs there too."""

    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = MLP(margin=4), MLP(margin=2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.a(x), self.b(x)

    net = Two().eval()
    x, _ = inputs(net.a, 6, torch.float32, seed=5)
    proto = export_onnx(net, (x,), tmp_path / "two.onnx", mode="custom")
    with torch.no_grad():
        eager = net(x)
    function_file = finalize(copy_model(proto), "function")
    assert len(function_file.functions) == 1 and not function_file.functions[0].overload
    for mode in MODES:
        got_ref, got_ort = run_everywhere(proto, mode, [x.numpy()])
        for i in range(2):
            assert max_rel_err(got_ref[i], eager[i]) <= 1e-5, (mode, i)
            assert max_rel_err(got_ort[i], eager[i]) <= 1e-5, (mode, i)

"""The margin family in ONNX: ``ai.lsoftmax::MarginLinear`` in every export mode (portable,
function, custom), in ONNX Runtime (our kernel, or the function body without the library) and in
``onnx.reference.ReferenceEvaluator``, against the independent float64 reference and torch.

Parity: max relative error <= 1e-5 in float32 and <= 1e-10 in float64 (tests/reference.py's
metric). The parameters are chosen NOT to be exact in float32 (CosFace m = 0.35, ArcFace
m = 0.3, combined m1 = 1.1, lambda 0.3): the ``_lo`` attributes must carry them to float64
precision. Files
written before this op existed (``LSoftmaxLinear``) keep running unchanged:
``tests/fixtures/onnx_v1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import TOL
from lsoftmax.exporters import export_onnx, finalize
from lsoftmax.exporters.domain import DOMAIN
from lsoftmax.exporters.translations import translation_table
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from onnx_models import copy_model, reference_kernels
from reference import family_reference, max_rel_err

from lsoftmax import margins
from lsoftmax import ort as lort
from lsoftmax.torch import MarginLinear
from lsoftmax.torch.functional import margin_logits

ONNX_TYPE = {torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE}
MODES = ("portable", "function", "custom")
LAM = 0.3  # not exact in float32: lambda_lo carries the rest
SPECS: dict[str, margins.Margin] = {
    "lsoftmax": margins.LSoftmax(3),
    "sphereface": margins.SphereFace(4),
    "cosface": margins.CosFace(0.35, 30.0),
    "arcface": margins.ArcFace(0.3, 30.0),
    "arcface-easy": margins.ArcFace(0.3, 30.0, easy_margin=True),
    "combined": margins.Combined(1.1, 0.3, 0.15, 30.0),
}
N, D, C = 6, 5, 4
FIXTURE_V1 = Path(__file__).parent / "fixtures" / "onnx_v1"


def _ref_params(spec: margins.Margin) -> dict[str, Any]:
    p = spec.params()
    return {"m": p[0], "m1": p[1], "m2": p[2], "m3": p[3], "s": p[4], "easy_margin": bool(p[5])}


def _data(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(C, D, generator=g, dtype=torch.float64).to(dtype)
    # Every class and both sides of theta = pi/2 among the targets.
    t = torch.tensor([0, 1, 2, 3, 0, 2])
    return x, w, t


def node_model(dtype: torch.dtype, spec: margins.Margin, with_labels: bool, lam: float) -> Any:
    """One ``MarginLinear`` node (custom mode) written by the exporter's own translation."""
    translation_table()  # registers the schemas with onnx
    from lsoftmax.exporters.margin_family import margin_attributes

    attrs = margin_attributes(spec.kind, spec.params(), lam)
    inputs = [
        helper.make_tensor_value_info("X", ONNX_TYPE[dtype], ["N", D]),
        helper.make_tensor_value_info("W", ONNX_TYPE[dtype], [C, D]),
    ]
    if with_labels:
        inputs.append(helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"]))
    node = helper.make_node("MarginLinear", [i.name for i in inputs], ["Y"], domain=DOMAIN, **attrs)
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info("Y", ONNX_TYPE[dtype], ["N", C])]
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
        ir_version=9,
    )


def run_mode(proto: Any, mode: str, feeds: dict[str, np.ndarray]) -> tuple[Any, Any]:
    """(ReferenceEvaluator, ONNX Runtime) outputs of ``finalize(proto, mode)``; custom files run
    with our library (and the evaluator with the numpy kernels), the others without."""
    model = finalize(copy_model(proto), mode)
    onnx.checker.check_model(model, full_check=True)
    ev = ReferenceEvaluator(model, new_ops=reference_kernels() if mode == "custom" else None)
    data = model.SerializeToString()
    sess = lort.session(data) if mode == "custom" else onnxruntime.InferenceSession(data)
    return ev.run(None, feeds)[0], sess.run(None, feeds)[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(SPECS))
def test_every_kind_and_mode_matches_reference_and_torch(
    name: str, dtype: torch.dtype, mode: str
) -> None:
    spec = SPECS[name]
    x, w, t = _data(dtype)
    lam = LAM if spec.uses_lambda else 0.0
    ref = family_reference(x, w, t, spec.kind, _ref_params(spec), lam)
    eager = margin_logits(x, w, t, spec, lam=lam)
    proto = node_model(dtype, spec, True, lam)
    feeds = {"X": x.numpy(), "W": w.numpy(), "labels": t.numpy()}
    got_ref, got_ort = run_mode(proto, mode, feeds)
    assert got_ort.dtype == got_ref.dtype == x.numpy().dtype
    assert max_rel_err(eager, ref) <= TOL[dtype], "torch vs float64 reference"
    assert max_rel_err(got_ort, eager) <= TOL[dtype], "ONNX Runtime vs torch"
    assert max_rel_err(got_ort, ref) <= TOL[dtype], "ONNX Runtime vs float64 reference"
    assert max_rel_err(got_ref, ref) <= TOL[dtype], "ReferenceEvaluator vs float64 reference"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["lsoftmax", "sphereface", "arcface"])
def test_plain_logits_without_labels(name: str, mode: str) -> None:
    spec = SPECS[name]
    x, w, _ = _data(torch.float64, seed=1)
    ref = family_reference(x, w, None, spec.kind, _ref_params(spec))
    feeds = {"X": x.numpy(), "W": w.numpy()}
    got_ref, got_ort = run_mode(node_model(torch.float64, spec, False, 0.0), mode, feeds)
    assert max_rel_err(got_ort, ref) <= TOL[torch.float64]
    assert max_rel_err(got_ref, ref) <= TOL[torch.float64]


class Heads(torch.nn.Module):
    """One ``MarginLinear`` head per kind over a shared body: a single torch export covers every
    kind. Eval: the plain logits of each head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh())
        self.names = [n for n in SPECS if n != "arcface-easy"]
        self.heads = torch.nn.ModuleList(MarginLinear(D, C, margin=SPECS[n]) for n in self.names)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.body(x)
        return tuple(h(f) for h in self.heads)


class HeadsWithLabels(Heads):
    """The margin logits of each head through ``margin_logits`` (a float lambda)."""

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        f = self.body(x)
        return tuple(
            margin_logits(f, h.weight, target, SPECS[n], lam=LAM if SPECS[n].uses_lambda else 0.0)
            for n, h in zip(self.names, self.heads, strict=True)
        )


@pytest.fixture(scope="module")
def exported_heads(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, tuple[Any, Any]]:
    out = {}
    tmp = tmp_path_factory.mktemp("heads")
    x, _, t = _data(torch.float32, seed=2)
    for with_labels in (False, True):
        model = (HeadsWithLabels() if with_labels else Heads()).eval()
        args = (x, t) if with_labels else (x,)
        out[with_labels] = (model, export_onnx(model, args, tmp / "m.onnx", mode="custom"))
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_labels", [False, True], ids=["plain", "labels"])
def test_torch_export_every_kind_in_ort(
    exported_heads: dict[bool, tuple[Any, Any]], with_labels: bool, mode: str
) -> None:
    model, proto = exported_heads[with_labels]
    ops = [n.op_type for n in proto.graph.node if n.domain == DOMAIN]
    # L-Softmax heads keep exporting to LSoftmaxLinear; every other kind is a MarginLinear.
    assert ops.count("LSoftmaxLinear") == 1 and ops.count("MarginLinear") == len(model.names) - 1
    x, _, t = _data(torch.float32, seed=3)
    with torch.no_grad():
        eager = model(x, t) if with_labels else model(x)
    final = finalize(copy_model(proto), mode)
    data = final.SerializeToString()
    feeds = dict(zip([i.name for i in final.graph.input], [x.numpy(), t.numpy()], strict=False))
    lort.kernel_calls(reset=True)
    sess = lort.session(data) if mode != "portable" else onnxruntime.InferenceSession(data)
    got = sess.run(None, feeds)
    # custom and function files run our kernel once per head where the library is registered.
    assert lort.kernel_calls() == (0 if mode == "portable" else len(eager))
    for name, a, b in zip(model.names, got, eager, strict=True):
        assert max_rel_err(a, b) <= TOL[torch.float32], name


def _with(proto: Any, **attrs: Any) -> bytes:
    out = copy_model(proto)
    node = out.graph.node[0]
    for name, value in attrs.items():
        for a in list(node.attribute):
            if a.name == name:
                node.attribute.remove(a)
        if value is not None:
            node.attribute.append(helper.make_attribute(name, value))
    return out.SerializeToString()


@pytest.mark.parametrize(
    ("spec", "attrs", "message"),
    [
        ("cosface", {"kind": "softmax"}, "attribute 'kind': unknown margin kind 'softmax'"),
        ("cosface", {"kind": None}, "attribute 'kind' .* is required"),
        ("cosface", {"kind": 3}, "attribute 'kind' must be a string, got an int"),
        ("cosface", {"margin": 2}, "attribute 'margin' must be a float, got an int"),
        ("cosface", {"scale": -1.0}, "invalid attributes: cosface scale s must be .* > 0, got -1"),
        ("arcface", {"easy_margin": 2}, "attribute easy_margin must be 0 or 1, got 2"),
        ("lsoftmax", {"margin": 2.5}, "invalid attributes: margin must be an integer .* got 2.5"),
        ("sphereface", {"lambda": -1.0}, "invalid attributes: lambda must be >= 0"),
        ("cosface", {"scale_lo": float("nan")}, "attribute scale_lo must be finite"),
    ],
)
def test_bad_attributes_fail_at_session_creation(
    spec: str, attrs: dict[str, Any], message: str
) -> None:
    proto = node_model(torch.float32, SPECS[spec], True, 0.0)
    with pytest.raises(Exception, match=f"MarginLinear: {message}"):
        lort.session(_with(proto, **attrs))


def test_file_exported_before_margin_linear_runs_unchanged() -> None:
    """``lsoftmax_linear_v1.onnx`` was written by the exporter of commit ea6e8ea (an
    ``LSoftmaxLinear`` node with labels plus its model-local function, float64): it runs on our
    kernel with the library, on its function body without it, and in the ReferenceEvaluator,
    all matching the torch outputs saved with it."""
    model = onnx.load(FIXTURE_V1 / "lsoftmax_linear_v1.onnx")
    assert [n.op_type for n in model.graph.node if n.domain == DOMAIN] == ["LSoftmaxLinear"]
    saved = np.load(FIXTURE_V1 / "lsoftmax_linear_v1.npz")
    feeds = dict(zip([i.name for i in model.graph.input], [saved["x"], saved["t"]], strict=True))
    data = model.SerializeToString()
    lort.kernel_calls(reset=True)
    with_lib = lort.session(data).run(None, feeds)[0]
    assert lort.kernel_calls() == 1
    without = onnxruntime.InferenceSession(data).run(None, feeds)[0]
    evaluated = ReferenceEvaluator(model).run(None, feeds)[0]
    for got in (with_lib, without, evaluated):
        assert max_rel_err(got, saved["y"]) <= TOL[torch.float64]

"""``lsoftmax.exporters``: the three export modes, checks on every file, dynamic batch, opsets,
errors, function overloads, and the standard-op builder (the one home of the portable math)
against the numpy API on inputs in every segment, degenerate rows included.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from lsoftmax.exporters import MODES, TrainingOpError, check, export_onnx, finalize
from lsoftmax.exporters.functions import attach_functions
from lsoftmax.exporters.portable import NodeBuilder, build_lsoftmax_linear
from onnx import TensorProto, helper
from onnx_models import MLP, WithLabels, feeds, inputs, make
from reference import max_rel_err

from lsoftmax import core
from lsoftmax import ort as lort
from lsoftmax.torch.functional import lsoftmax_logits


def _domains(model: onnx.ModelProto) -> set[str]:
    return {n.domain for n in model.graph.node}


def _plain_ort(path: Path | bytes) -> onnxruntime.InferenceSession:
    src = path if isinstance(path, bytes) else str(path)
    return onnxruntime.InferenceSession(src, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_exports_checks_and_runs(mode: str, tmp_path: Path) -> None:
    model = make("mlp", torch.float32)
    net = WithLabels(model, 3, 0.5)
    x, t = inputs(model, 4, torch.float32)
    path = tmp_path / f"{mode}.onnx"
    export_onnx(net, (x, t), path, mode=mode)
    saved = onnx.load(path)
    check(saved)  # full checker + strict shape inference, on the file as saved
    assert saved.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in saved.graph.output] == ["logits"]
    if mode == "portable":
        assert _domains(saved) <= {""}
        assert all(i.domain != "ai.lsoftmax" for i in saved.opset_import)
        sessions = [_plain_ort(path), lort.session(path)]
    elif mode == "custom":
        assert "ai.lsoftmax" in _domains(saved) and not saved.functions
        sessions = [lort.session(path)]
        with pytest.raises(Exception, match="LSoftmaxLinear"):
            _plain_ort(path)
    else:
        assert "ai.lsoftmax" in _domains(saved)
        assert [(f.domain, f.name) for f in saved.functions] == [("ai.lsoftmax", "LSoftmaxLinear")]
        assert saved.ir_version == 9
        sessions = [_plain_ort(path), lort.session(path)]
    x2, t2 = inputs(model, 11, torch.float32, seed=5)
    with torch.no_grad():
        eager = net(x2, t2)
    for sess in sessions:
        assert max_rel_err(sess.run(None, feeds(sess, x2, t2))[0], eager) <= 1e-5


def test_static_batch_opset_and_batch_one_example(tmp_path: Path) -> None:
    model = make("mlp", torch.float32)
    x, _ = inputs(model, 1, torch.float32)
    fixed = export_onnx(model, x, tmp_path / "a.onnx", mode="function", dynamic_batch=False)
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    dyn = export_onnx(model, (x,), tmp_path / "b.onnx", mode="portable", opset=21)
    assert dyn.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [i.version for i in dyn.opset_import if i.domain == ""] == [21]
    sess = _plain_ort(tmp_path / "b.onnx")
    x5, _ = inputs(model, 5, torch.float32)
    with torch.no_grad():
        assert max_rel_err(sess.run(None, feeds(sess, x5))[0], model(x5)) <= 1e-5


def test_argument_errors(tmp_path: Path) -> None:
    model = make("mlp", torch.float32)
    x, _ = inputs(model, 2, torch.float32)
    with pytest.raises(ValueError, match="mode must be one of portable, custom, function"):
        export_onnx(model, x, tmp_path / "m.onnx", mode="fast")
    with pytest.raises(ValueError, match="opset must be an int >= 18"):
        export_onnx(model, x, tmp_path / "m.onnx", opset=13)
    with pytest.raises(TypeError, match="example_inputs"):
        export_onnx(model, [x, "label"], tmp_path / "m.onnx")
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        export_onnx(lambda v: v, x, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="mode must be one of"):
        finalize(onnx.ModelProto(), "other")


def test_training_mode_export_explains_what_to_do(tmp_path: Path) -> None:
    class Train(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = MLP(margin=4)

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.net.head(self.net.features(x), t)

    net = Train().train()
    x, t = inputs(net.net, 3, torch.float32)
    with pytest.raises(TrainingOpError, match=r"model\.eval\(\)") as info:
        export_onnx(net, (x, t), tmp_path / "t.onnx")
    assert "lsoftmax_logits" in str(info.value)
    assert not (tmp_path / "t.onnx").exists()


def test_several_heads_get_function_overloads(tmp_path: Path) -> None:
    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Parameter(torch.randn(5, 6))
            self.b = torch.nn.Parameter(torch.randn(4, 6))

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return (
                lsoftmax_logits(x, self.a, t, 2, 0.5),
                lsoftmax_logits(x, self.b, t, 3, 0.0),
                lsoftmax_logits(x, self.b, None, 3),
            )

    torch.manual_seed(0)
    net = TwoHeads().eval()
    x, t = torch.randn(6, 6), torch.tensor([0, 1, 2, 3, 0, 1])
    proto = export_onnx(net, (x, t), tmp_path / "two.onnx", mode="function")
    assert proto.ir_version == 10
    overloads = sorted(f.overload for f in proto.functions)
    assert overloads == ["m2_labels", "m3_labels", "plain"]
    assert sorted(n.overload for n in proto.graph.node if n.domain) == overloads
    with torch.no_grad():
        refs = net(x, t)
    lort.kernel_calls(reset=True)
    path = tmp_path / "two.onnx"
    for sess in (lort.session(path), _plain_ort(path)):
        outs = sess.run(None, feeds(sess, x, t))
        for got, ref in zip(outs, refs, strict=True):
            assert max_rel_err(got, ref) <= 1e-5
        assert lort.kernel_calls() == 3  # 3 kernel runs with the library, none without


def test_function_file_checks_in_a_fresh_process(tmp_path: Path) -> None:
    """Without our schema registered, the checker and strict shape inference use the
    model-local function body."""
    model = make("mlp", torch.float64)
    x, t = inputs(model, 3, torch.float64)
    export_onnx(WithLabels(model, 5, 2.0), (x, t), tmp_path / "f.onnx", mode="function")
    code = (
        "import onnx, sys; m = onnx.load(sys.argv[1]); "
        "onnx.checker.check_model(m, full_check=True); "
        "onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True); print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "f.onnx")], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


# --- the standard-op builder on its own (no torch export) --------------------------------------


def _builder_model(margin: int, lam: float, dtype: int, with_function: bool) -> bytes:
    b = NodeBuilder()
    if with_function:
        node = helper.make_node(
            "LSoftmaxLinear",
            ["X", "W", "labels"],
            ["Y"],
            domain="ai.lsoftmax",
            margin=margin,
            **{"lambda": lam},
        )
        nodes = [node]
    else:
        build_lsoftmax_linear(b, ["X", "W", "labels"], "Y", {"margin": margin, "lambda": lam})
        nodes = b.nodes
    graph = helper.make_graph(
        nodes,
        "builder",
        [
            helper.make_tensor_value_info("X", dtype, ["N", "D"]),
            helper.make_tensor_value_info("W", dtype, ["C", "D"]),
            helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"]),
        ],
        [helper.make_tensor_value_info("Y", dtype, ["N", "C"])],
    )
    opsets = [helper.make_opsetid("", 18)]
    if with_function:
        opsets.append(helper.make_opsetid("ai.lsoftmax", 1))
    model = helper.make_model(graph, opset_imports=opsets, ir_version=9)
    if with_function:
        attach_functions(model)
    check(model)
    return model.SerializeToString()


def _segment_inputs(margin: int, dtype: type, n_per_segment: int = 3) -> tuple[np.ndarray, ...]:
    """Rows placed in every segment k (theta in (k pi/m, (k+1) pi/m)), plus a zero row."""
    rng = np.random.default_rng(margin)
    d, c = 8, 4
    w = rng.standard_normal((c, d))
    rows, labels = [], []
    for k in range(margin):
        for j in range(n_per_segment):
            theta = (k + (j + 1) / (n_per_segment + 1)) * math.pi / margin
            t = int(rng.integers(0, c))
            u = w[t] / np.linalg.norm(w[t])
            v = rng.standard_normal(d)
            v -= v.dot(u) * u
            v /= np.linalg.norm(v)
            rows.append((math.cos(theta) * u + math.sin(theta) * v) * rng.uniform(0.5, 3.0))
            labels.append(t)
    rows.append(np.zeros(d))
    labels.append(0)
    return np.asarray(rows).astype(dtype), w.astype(dtype), np.asarray(labels, np.int64)


@pytest.mark.parametrize("with_function", [False, True], ids=["portable", "function-body"])
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE], ids=["f32", "f64"])
@pytest.mark.parametrize("margin", range(1, 9))
def test_builder_matches_numpy_api_in_every_segment(
    margin: int, dtype: int, with_function: bool
) -> None:
    np_dtype = np.float32 if dtype == TensorProto.FLOAT else np.float64
    x, w, y = _segment_inputs(margin, np_dtype)
    for lam in (0.0, 0.5, 1000.0):
        # Without the library: the function body runs (the portable graph has no custom node).
        sess = _plain_ort(_builder_model(margin, lam, dtype, with_function))
        got = sess.run(None, {"X": x, "W": w, "labels": y})[0]
        want = core.forward(x, w, y, margin=margin, lam=lam)
        tol = 1e-5 if np_dtype == np.float32 else 1e-10
        assert max_rel_err(got, want) <= tol, lam
        np.testing.assert_array_equal(got[-1], want[-1])  # the zero row: plain logits


def test_builder_rejects_bad_constants() -> None:
    with pytest.raises(ValueError, match="margin"):
        build_lsoftmax_linear(NodeBuilder(), ["X", "W", "y"], "Y", {"margin": 0})
    with pytest.raises(ValueError, match="lambda"):
        build_lsoftmax_linear(NodeBuilder(), ["X", "W", "y"], "Y", {"margin": 2, "lambda": -1.0})

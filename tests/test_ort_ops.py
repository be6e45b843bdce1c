"""The ai.lsoftmax ONNX Runtime library on graphs built with onnx.helper: results against the
numpy API and a float64 reference, dtypes, optional labels, dynamic batch, and bad models and
inputs (clear errors naming the attribute or input, at session creation or run time; no crash).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import TOL
from onnx import TensorProto, helper
from reference import lsoftmax_reference, max_rel_err

from lsoftmax import core
from lsoftmax import ort as lort

F32, F64 = TensorProto.FLOAT, TensorProto.DOUBLE
NP = {F32: np.float32, F64: np.float64}


def op_model(
    attrs: dict[str, object],
    *,
    dtype: int = F32,
    label_type: int | None = TensorProto.INT64,
    d: int = 6,
    c: int = 5,
    opset: int = 18,
) -> bytes:
    """``Y = LSoftmaxLinear(X[N, d], W[c, d], labels[N]?)`` with ``attrs``, batch symbolic."""
    names = ["X", "W"] + (["labels"] if label_type is not None else [])
    node = helper.make_node("LSoftmaxLinear", names, ["Y"], domain="ai.lsoftmax", **attrs)
    ins = [
        helper.make_tensor_value_info("X", dtype, ["N", d]),
        helper.make_tensor_value_info("W", dtype, [c, d]),
    ]
    if label_type is not None:
        ins.append(helper.make_tensor_value_info("labels", label_type, ["N"]))
    graph = helper.make_graph(
        [node], "op", ins, [helper.make_tensor_value_info("Y", dtype, ["N", c])]
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("ai.lsoftmax", 1)],
        ir_version=8,
    )
    return model.SerializeToString()


def data(n: int, dtype: int, d: int = 6, c: int = 5, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(NP[dtype])
    w = rng.standard_normal((c, d)).astype(NP[dtype])
    y = rng.integers(0, c, n).astype(np.int64)
    return x, w, y


def reference(x: np.ndarray, w: np.ndarray, y: np.ndarray, margin: int, lam: float) -> np.ndarray:
    return lsoftmax_reference(
        torch.from_numpy(x).double(), torch.from_numpy(w).double(), torch.from_numpy(y), margin, lam
    ).numpy()


@pytest.mark.parametrize("label_type", [TensorProto.INT64, TensorProto.INT32], ids=["i64", "i32"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("margin", range(1, 9))
def test_margin_logits_match_reference(margin: int, dtype: int, label_type: int) -> None:
    lam = 0.25
    sess = lort.session(
        op_model({"margin": margin, "lambda": lam}, dtype=dtype, label_type=label_type)
    )
    for n in (1, 5, 40):  # dynamic batch through one session
        x, w, y = data(n, dtype, seed=n + margin)
        labels = y.astype(np.int32 if label_type == TensorProto.INT32 else np.int64)
        got = sess.run(None, {"X": x, "W": w, "labels": labels})[0]
        assert got.dtype == NP[dtype] and got.shape == (n, 5)
        assert max_rel_err(got, reference(x, w, y, margin, lam)) <= TOL[dtype]
        np.testing.assert_allclose(
            got, core.forward(x, w, labels, margin=margin, lam=lam), rtol=0, atol=TOL[dtype] * 10
        )


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_without_labels_is_plain_gemm(dtype: int) -> None:
    sess = lort.session(op_model({"margin": 4}, dtype=dtype, label_type=None))
    for n in (7, 1):  # ORT's Gemm; the core's single-row product (lsoftmax::plain_logits)
        x, w, _ = data(n, dtype)
        got = sess.run(None, {"X": x, "W": w})[0]
        assert max_rel_err(got, x.astype(np.float64) @ w.astype(np.float64).T) <= TOL[dtype]


def test_lambda_defaults_to_zero_and_empty_batch_works() -> None:
    sess = lort.session(op_model({"margin": 3}))
    x, w, y = data(4, F32)
    got = sess.run(None, {"X": x, "W": w, "labels": y})[0]
    assert max_rel_err(got, reference(x, w, y, 3, 0.0)) <= 1e-5
    empty = sess.run(None, {"X": x[:0], "W": w, "labels": y[:0]})[0]
    assert empty.shape == (0, 5)


def test_degenerate_rows_keep_plain_logit() -> None:
    sess = lort.session(op_model({"margin": 4, "lambda": 0.0}, dtype=F64))
    x, w, y = data(3, F64)
    x[1] = 0.0
    got = sess.run(None, {"X": x, "W": w, "labels": y})[0]
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[1], np.zeros(5))


def test_kernel_call_counter_counts_runs() -> None:
    sess = lort.session(op_model({"margin": 2}))
    x, w, y = data(3, F32)
    lort.kernel_calls(reset=True)
    for _ in range(3):
        sess.run(None, {"X": x, "W": w, "labels": y})
    assert lort.kernel_calls() == 3


# --- bad models: fail at session creation, naming the attribute ---------------------------------


@pytest.mark.parametrize(
    ("attrs", "needle"),
    [
        ({"margin": 0}, "margin"),
        ({"margin": -3}, "margin"),
        ({"lambda": 1.0}, "margin"),  # margin missing
        ({"margin": 2.0}, "margin"),  # margin of the wrong attribute type
        ({"margin": 2, "lambda": -1.0}, "lambda"),
        ({"margin": 2, "lambda": math.nan}, "lambda"),
        ({"margin": 2, "lambda": 1}, "lambda"),  # int-typed lambda
    ],
    ids=[
        "margin0",
        "margin-neg",
        "margin-missing",
        "margin-float",
        "lambda-neg",
        "lambda-nan",
        "lambda-int",
    ],
)
def test_bad_attribute_fails_at_session_creation(attrs: dict[str, object], needle: str) -> None:
    with pytest.raises(Exception, match=needle) as info:
        lort.session(op_model(attrs))
    assert "LSoftmaxLinear" in str(info.value)


# --- bad inputs: fail at run time, naming the input ---------------------------------------------


@pytest.fixture(scope="module")
def ok_session() -> onnxruntime.InferenceSession:
    return lort.session(op_model({"margin": 2}))


@pytest.mark.parametrize(
    "labels",
    [np.array([0, 1, 5]), np.array([0, -1, 2]), np.array([0, 1])],
    ids=["too-large", "negative", "short"],
)
def test_bad_labels_fail_at_run_time(
    ok_session: onnxruntime.InferenceSession, labels: np.ndarray
) -> None:
    x, w, _ = data(3, F32)
    with pytest.raises(Exception, match="labels"):
        ok_session.run(None, {"X": x, "W": w, "labels": labels})


def test_2d_labels_fail_at_run_time() -> None:
    model = onnx.load_from_string(op_model({"margin": 2}))
    model.graph.input[2].type.tensor_type.shape.dim.add().dim_value = 3  # labels (N, 3)
    sess = lort.session(model.SerializeToString())
    x, w, _ = data(3, F32)
    with pytest.raises(Exception, match=r"input labels must have shape \(3,\)"):
        sess.run(None, {"X": x, "W": w, "labels": np.zeros((3, 3), np.int64)})


def test_float_labels_fail_at_run_time_naming_the_input() -> None:
    sess = lort.session(op_model({"margin": 2}, label_type=F32))
    x, w, _ = data(3, F32)
    with pytest.raises(Exception, match="labels must be int64 or int32, got float32"):
        sess.run(None, {"X": x, "W": w, "labels": np.zeros(3, np.float32)})


def test_mismatched_features_fail_naming_the_inputs() -> None:
    model = onnx.load_from_string(op_model({"margin": 2}))
    model.graph.input[1].type.tensor_type.shape.dim[1].dim_param = "D2"
    sess = lort.session(model.SerializeToString())
    x, _, y = data(3, F32)
    with pytest.raises(Exception, match="input X has 6 features per row but input W has 4"):
        sess.run(None, {"X": x, "W": np.ones((5, 4), np.float32), "labels": y})


def test_risky_cases_do_not_crash_the_process() -> None:
    """Every bad case in a fresh interpreter: each must raise a Python exception, and the
    interpreter must exit normally (a crash would give a signal exit code)."""
    script = textwrap.dedent(
        """
        import math, numpy as np, onnx, sys
        sys.path.insert(0, sys.argv[1])
        from test_ort_ops import op_model, data, F32, F64
        from lsoftmax import ort as lort
        raised = 0
        for attrs in ({"margin": 0}, {"lambda": 1.0}, {"margin": 2, "lambda": -1.0},
                      {"margin": 2, "lambda": math.nan}, {"margin": 1 << 30}):
            try:
                lort.session(op_model(attrs))
            except Exception:
                raised += 1
        x, w, _ = data(3, F32)
        sess = lort.session(op_model({"margin": 5}))
        for labels in (np.array([0, 1, 99]), np.array([-5, 0, 0]), np.array([0]),
                       np.array([2**62, 0, 0])):
            try:
                sess.run(None, {"X": x, "W": w, "labels": labels})
            except Exception:
                raised += 1
        fsess = lort.session(op_model({"margin": 5}, label_type=F32))
        try:
            fsess.run(None, {"X": x, "W": w, "labels": np.full(3, np.nan, np.float32)})
        except Exception:
            raised += 1
        print("raised", raised)
        """
    )
    tests_dir = str(__import__("pathlib").Path(__file__).resolve().parent)
    # cwd is tests/, not the checkout: `python -c` puts the cwd first on sys.path, and from the
    # checkout root it would import the source tree instead of the installed package (CI's wheel).
    proc = subprocess.run(
        [sys.executable, "-c", script, tests_dir],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tests_dir,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "raised 10" in proc.stdout, proc.stdout + proc.stderr[-2000:]


# --- lsoftmax.ort helpers -------------------------------------------------------------------------


def test_library_path_is_the_built_library() -> None:
    path = lort.library_path()
    assert path.endswith("liblsoftmax_ort.so")
    from lsoftmax import _core

    assert __import__("os").path.dirname(path) == __import__("os").path.dirname(_core.__file__)


def test_provider_shorthands_and_unknown_provider() -> None:
    assert lort.resolve_providers(None) == ["CPUExecutionProvider"]
    assert lort.resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert lort.resolve_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="unknown execution provider 'tpu'"):
        lort.resolve_providers("tpu")
    with pytest.raises(ValueError, match="unknown execution provider"):
        lort.session(op_model({"margin": 2}), providers="nope")


def test_cuda_shorthand_without_cuda_provider_is_a_clear_error() -> None:
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert "CUDAExecutionProvider" in lort.resolve_providers("cuda")
    else:
        with pytest.raises(ValueError, match="CUDAExecutionProvider is not available"):
            lort.resolve_providers("cuda")


def test_session_options_and_missing_file(tmp_path: object) -> None:
    sess = lort.session(op_model({"margin": 2}), intra_op_num_threads=1)
    assert sess.get_session_options().intra_op_num_threads == 1
    with pytest.raises(ValueError, match="unknown SessionOptions attribute 'bogus'"):
        lort.session(op_model({"margin": 2}), bogus=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lort.session(str(tmp_path) + "/missing.onnx")


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_constant_weight_path_matches_reference(dtype: int) -> None:
    """With W an initializer (a constant input, read in place by both products)."""
    x, w, y = data(9, dtype, d=6, c=5, seed=4)
    model = onnx.load_from_string(op_model({"margin": 3, "lambda": 0.5}, dtype=dtype))
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "W"))
    del model.graph.input[1]
    sess = lort.session(model.SerializeToString())
    for n in (1, 9):
        got = sess.run(None, {"X": x[:n], "labels": y[:n]})[0]
        assert max_rel_err(got, reference(x[:n], w, y[:n], 3, 0.5)) <= TOL[dtype]
    plain = onnx.load_from_string(op_model({"margin": 3}, dtype=dtype, label_type=None))
    plain.graph.initializer.append(onnx.numpy_helper.from_array(w, "W"))
    del plain.graph.input[1]
    got = lort.session(plain.SerializeToString()).run(None, {"X": x})[0]
    assert max_rel_err(got, x.astype(np.float64) @ w.astype(np.float64).T) <= TOL[dtype]

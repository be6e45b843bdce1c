"""torch eager vs the numpy API vs the float64 reference vs ONNX Runtime, in every export mode.

Models: an MLP and a small CNN with an ``LSoftmaxLinear`` head (``onnx_models.py``); margins
1..6; float32 (max relative error <= 1e-5) and float64 (<= 1e-10). Each graph is exported once
(``mode="custom"``, ~2 s) and turned into the three modes with ``finalize``; margin sweeps
reuse the exported graph with the margin attribute changed (``with_margin``); the exporter's own
per-mode path is tested in ``test_exporters.py``.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import TOL
from lsoftmax.exporters import finalize
from onnx_models import WithLabels, copy_model, export_cache, feeds, inputs, with_margin
from reference import lsoftmax_reference, max_rel_err

from lsoftmax import core
from lsoftmax import ort as lort

MODES = ("portable", "custom", "function")
# ONNX Runtime's CPU Conv is float32-only, so the CNN runs in float32 only.
CASES = pytest.mark.parametrize(
    ("kind", "dtype"),
    [("mlp", torch.float32), ("mlp", torch.float64), ("cnn", torch.float32)],
    ids=["mlp-f32", "mlp-f64", "cnn-f32"],
)
LAM = 0.5  # exact in float32 (ONNX float attributes are float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(kind, dtype, with_labels) -> (model, custom-mode proto), exported on first use."""
    return export_cache(tmp_path_factory.mktemp("parity"), LAM)


def _session(proto: onnx.ModelProto, mode: str) -> onnxruntime.InferenceSession:
    return lort.session(finalize(copy_model(proto), mode).SerializeToString())


@pytest.mark.parametrize("mode", MODES)
@CASES
def test_inference_logits(exported: Any, kind: str, dtype: torch.dtype, mode: str) -> None:
    model, proto = exported(kind, dtype, False)
    sess = _session(proto, mode)
    weight = model.head.weight.detach().numpy()
    for batch in (1, 4, 13):  # several batch sizes through one exported file
        x, _ = inputs(model, batch, dtype, seed=batch)
        got = sess.run(None, feeds(sess, x))[0]
        with torch.no_grad():
            eager = model(x)
            feat = model.features(x).numpy()
        assert got.dtype == feat.dtype and got.shape == (batch, weight.shape[0])
        assert max_rel_err(got, eager) <= TOL[dtype]
        assert max_rel_err(got, core.forward(feat, weight, margin=4)) <= TOL[dtype]
        ref = feat.astype(np.float64) @ weight.astype(np.float64).T
        assert max_rel_err(got, ref) <= TOL[dtype]


@pytest.mark.parametrize("margin", range(1, 7))
@CASES
def test_margin_logits(exported: Any, kind: str, dtype: torch.dtype, margin: int) -> None:
    model, proto = exported(kind, dtype, True)
    proto = with_margin(proto, margin)
    x, t = inputs(model, 9, dtype, seed=10 + margin)
    with torch.no_grad():
        eager = WithLabels(model, margin, LAM)(x, t)
        feat = model.features(x)
    weight = model.head.weight.detach()
    ref = lsoftmax_reference(feat.double(), weight.double(), t, margin, LAM)
    numpy_api = core.forward(feat.numpy(), weight.numpy(), t.numpy(), margin=margin, lam=LAM)
    assert max_rel_err(eager, ref) <= TOL[dtype]
    assert max_rel_err(numpy_api, ref) <= TOL[dtype]
    plain = (feat.double() @ weight.double().t()).numpy()
    rows = np.arange(len(t))
    for mode in MODES:
        sess = _session(proto, mode)
        got = sess.run(None, feeds(sess, x, t))[0]
        assert max_rel_err(got, ref) <= TOL[dtype], mode
        assert max_rel_err(got, eager) <= TOL[dtype], mode
        if margin > 1:  # the margin really changed the target logits (and only those)
            changed = np.abs(got - plain) > 1e-3 * np.abs(plain).max()
            assert changed[rows, t.numpy()].any(), mode
            changed[rows, t.numpy()] = False
            assert not changed.any(), mode


def test_one_session_four_threads(exported: Any) -> None:
    model, proto = exported("mlp", torch.float32, True)
    sess = _session(with_margin(proto, 4), "function")
    cases = [inputs(model, b, torch.float32, seed=b) for b in (2, 7, 16, 33)]
    expected = [sess.run(None, feeds(sess, x, t))[0] for x, t in cases]
    results: dict[int, list[np.ndarray]] = {i: [] for i in range(4)}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for r in range(20):
                x, t = cases[(i + r) % 4]
                results[i].append(sess.run(None, feeds(sess, x, t))[0])
        except BaseException as e:  # surfaced below, with the thread's traceback
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for i in range(4):
        assert len(results[i]) == 20
        for r, out in enumerate(results[i]):
            np.testing.assert_array_equal(out, expected[(i + r) % 4])


def test_function_mode_runs_kernel_with_library_and_body_without(exported: Any) -> None:
    model, proto = exported("mlp", torch.float64, True)
    fn_proto = finalize(with_margin(proto, 3), "function")
    assert [f.name for f in fn_proto.functions] == ["LSoftmaxLinear"]
    data = fn_proto.SerializeToString()
    x, t = inputs(model, 6, torch.float64)
    ref = lsoftmax_reference(model.features(x).detach(), model.head.weight.detach(), t, 3, LAM)

    lort.kernel_calls(reset=True)
    with_lib = lort.session(data)
    out_kernel = with_lib.run(None, feeds(with_lib, x, t))[0]
    out_kernel = with_lib.run(None, feeds(with_lib, x, t))[0]
    assert lort.kernel_calls() == 2

    without = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    out_body = without.run(None, feeds(without, x, t))[0]
    assert lort.kernel_calls() == 2  # the function body ran, not our kernel
    assert max_rel_err(out_kernel, ref) <= 1e-10
    assert max_rel_err(out_body, ref) <= 1e-10

    # Portable files never call the kernel, even with the library registered.
    portable = lort.session(finalize(with_margin(proto, 3), "portable").SerializeToString())
    out_portable = portable.run(None, feeds(portable, x, t))[0]
    assert lort.kernel_calls() == 2
    assert max_rel_err(out_portable, ref) <= 1e-10

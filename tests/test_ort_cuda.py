"""ONNX Runtime CUDA EP: the ``ai.lsoftmax::LSoftmaxLinear`` CUDA kernel against the CPU EP and
the float64 reference, with every ``LSoftmaxLinear`` node placed on the CUDA EP (checked in the
session profile, so a silent CPU fallback fails the test), and bad labels reported as errors.

Needs an NVIDIA GPU and onnxruntime-gpu; ``benchmarks/gpu_check.sh`` runs it on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from conftest import TOL, needs_ort_cuda
from helpers import ep_session, kernel_placements
from lsoftmax.exporters import finalize
from onnx_models import export_cache, feeds, inputs, with_margin
from reference import lsoftmax_reference, max_rel_err

pytestmark = [pytest.mark.gpu, needs_ort_cuda]
LAM = 0.5
CASES = pytest.mark.parametrize(
    ("kind", "dtype"),
    [("mlp", torch.float32), ("mlp", torch.float64), ("cnn", torch.float32)],
    ids=["mlp-f32", "mlp-f64", "cnn-f32"],
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return export_cache(tmp_path_factory.mktemp("ort_cuda"), LAM)


def _session(proto: onnx.ModelProto, provider: str, profile_dir: Path | None = None) -> Any:
    return ep_session(proto.SerializeToString(), provider, profile_dir)


@pytest.mark.parametrize("mode", ["custom", "function"])
@pytest.mark.parametrize("with_labels", [False, True])
@CASES
def test_cuda_ep_matches_cpu_ep_and_runs_on_cuda(
    exported: Any, kind: str, dtype: torch.dtype, with_labels: bool, mode: str, tmp_path: Path
) -> None:
    model, proto = exported(kind, dtype, with_labels)
    for margin in range(1, 9):
        graph = finalize(with_margin(proto, margin), mode)
        cuda = _session(graph, "cuda", tmp_path)
        cpu = _session(graph, "cpu")
        x, t = inputs(model, 13, dtype, seed=margin)
        args = (x, t) if with_labels else (x,)
        got = cuda.run(None, feeds(cuda, *args))[0]
        want = cpu.run(None, feeds(cpu, *args))[0]
        assert got.dtype == want.dtype and got.shape == want.shape
        # cuDNN may pick a different convolution algorithm than the CPU EP (e.g. Winograd):
        # the CNN's features then differ by more than float32 rounding before our node.
        tol = TOL[dtype] if kind == "mlp" else 1e-4
        assert max_rel_err(got, want) <= tol
        placements = kernel_placements(cuda, "LSoftmaxLinear")
        assert placements and set(placements) == {"CUDAExecutionProvider"}, placements


@CASES
def test_cuda_ep_margin_logits_match_reference(
    exported: Any, kind: str, dtype: torch.dtype
) -> None:
    model, proto = exported(kind, dtype, True)
    sess = _session(proto, "cuda")
    x, t = inputs(model, 9, dtype, seed=5)
    got = sess.run(None, feeds(sess, x, t))[0]
    with torch.no_grad():
        feat = model.features(x)
    ref = lsoftmax_reference(feat, model.head.weight.detach(), t, 4, LAM)
    assert max_rel_err(got, ref) <= (TOL[dtype] if kind == "mlp" else 1e-4)


def test_cuda_ep_bad_labels_are_an_error(exported: Any) -> None:
    model, proto = exported("mlp", torch.float32, True)
    sess = _session(proto, "cuda")
    x, t = inputs(model, 4, torch.float32)
    bad = t.numpy().copy()
    bad[1] = 99
    with pytest.raises(Exception, match=r"labels\[1\] = 99 is out of range"):
        sess.run(None, feeds(sess, x, bad))
    # The session is still usable after the error.
    got = sess.run(None, feeds(sess, x, t))[0]
    assert np.isfinite(got).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_cuda_ep_lgm_non_finite_log_var_is_an_error(bad: float) -> None:
    """As on the CPU EP: the device flag is read back and the run raises, instead of NaN
    outputs (docs/reliability.md)."""
    from onnx_models import lgm_node_model

    sess = ep_session(lgm_node_model(onnx.TensorProto.FLOAT, alpha=0.5), "cuda")
    feeds_ok = {
        "X": np.ones((3, 3), np.float32),
        "means": np.zeros((2, 3), np.float32),
        "log_var": np.zeros((2, 3), np.float32),
        "labels": np.array([0, 1, 0], np.int64),
    }
    bad_feeds = dict(feeds_ok, log_var=feeds_ok["log_var"].copy())
    bad_feeds["log_var"][1, 2] = bad
    with pytest.raises(Exception, match="LGMLogits: log_var has a non-finite entry"):
        sess.run(None, bad_feeds)
    assert all(np.isfinite(o).all() for o in sess.run(None, feeds_ok))  # still usable

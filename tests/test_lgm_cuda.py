"""L-GM on CUDA: the torch ops on GPU tensors against the CPU core and the float64 reference
(both variance kinds, with and without labels and log-determinant), gradcheck on the GPU, bitwise
reproducible parameter gradients, device-side data checks, and the ONNX Runtime CUDA-EP
``LGMLogits`` kernel against the CPU EP with no CPU fallback; and, on every machine, the errors
without a GPU, the checks made before any launch and the torch glue (run on CPU tensors with
stand-in launchers).

GPU tests carry the ``gpu`` marker; ``benchmarks/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from conftest import CUDA_READY, TOL, needs_ort_cuda, needs_torch_cuda
from helpers import FAKE_STREAM, ep_session, fake_cuda_runtime, kernel_placements
from onnx_models import lgm_node_model
from reference import max_rel_err
from test_lgm_core import lgm_reference_grads, make_case

from lsoftmax import _core
from lsoftmax.torch import set_label_check
from lsoftmax.torch.lgm import ops as lgm_mod

gpu = pytest.mark.gpu
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
KINDS = pytest.mark.parametrize("isotropic", [False, True], ids=["diag", "iso"])
ALPHA = 0.75


@pytest.fixture(autouse=True)
def _defaults() -> Any:
    """Every test starts from the default label check and exact float32 GEMMs."""
    set_label_check("sync")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32
    set_label_check("sync")


def _case(isotropic: bool, dtype: torch.dtype, **kw: Any) -> tuple[torch.Tensor, ...]:
    x, means, log_var, labels = make_case(isotropic=isotropic, **kw)
    return (
        torch.from_numpy(x).to(dtype),
        torch.from_numpy(means).to(dtype),
        torch.from_numpy(log_var).to(dtype),
        torch.from_numpy(labels),
    )


def _run_op(
    device: str,
    x: torch.Tensor,
    means: torch.Tensor,
    log_var: torch.Tensor,
    labels: torch.Tensor | None,
    logdet: bool,
    gz: torch.Tensor,
    gl: torch.Tensor,
) -> list[torch.Tensor]:
    """(logits, loglik, grad_x, grad_means, grad_log_var) of lsoftmax::lgm_logits on `device`."""
    leaves = [t.detach().to(device).requires_grad_(True) for t in (x, means, log_var)]
    y = None if labels is None else labels.to(device)
    logits, loglik = torch.ops.lsoftmax.lgm_logits(*leaves, y, ALPHA, logdet)
    grads = torch.autograd.grad((logits, loglik), leaves, (gz.to(device), gl.to(device)))
    return [t.detach().cpu() for t in (logits, loglik, *grads)]


# --- GPU: torch ops ---------------------------------------------------------------------------


@gpu
@needs_torch_cuda
@DTYPES
@KINDS
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "nolabels"])
@pytest.mark.parametrize("logdet", [True, False], ids=["logdet", "nologdet"])
@pytest.mark.parametrize("center", [0.0, 1e4], ids=["origin", "far"])
def test_cuda_matches_cpu_core_and_reference(
    dtype: torch.dtype, isotropic: bool, with_labels: bool, logdet: bool, center: float
) -> None:
    # Far from the origin the expansion cancels, and the direct fallback has to run.
    x, means, log_var, labels = _case(isotropic, dtype, n=40, c=7, d=9, center=center, spread=3.0)
    y = labels if with_labels else None
    gen = torch.Generator().manual_seed(3)
    gz = torch.randn(40, 7, generator=gen, dtype=torch.float64).to(dtype)
    gl = torch.randn(40, generator=gen, dtype=torch.float64).to(dtype)
    got = _run_op("cuda", x, means, log_var, y, logdet, gz, gl)
    cpu = _run_op("cpu", x, means, log_var, y, logdet, gz, gl)
    ref = lgm_reference_grads(x, means, log_var, y, ALPHA, logdet, gz, gl)
    names = ("logits", "loglik", "grad_x", "grad_means", "grad_log_var")
    for name, g, c, r in zip(names, got, cpu, ref, strict=True):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert max_rel_err(g, r) <= TOL[dtype], f"{name} vs reference"
        assert max_rel_err(g, c.double()) <= 2 * TOL[dtype], f"{name} vs CPU core"


@gpu
@needs_torch_cuda
def test_no_label_prediction_matches_cpu_exactly() -> None:
    x, means, log_var, _ = _case(False, torch.float64, n=64, c=9, d=5, seed=4)
    dev = [t.cuda() for t in (x, means, log_var)]
    _, ll_gpu = torch.ops.lsoftmax.lgm_logits(*dev, None, 0.0, False)
    _, ll_cpu = torch.ops.lsoftmax.lgm_logits(x, means, log_var, None, 0.0, False)
    assert max_rel_err(ll_gpu.cpu(), ll_cpu) <= 1e-12


@gpu
@needs_torch_cuda
@KINDS
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "nolabels"])
def test_gradcheck_float64_on_gpu(isotropic: bool, with_labels: bool) -> None:
    x, means, log_var, labels = _case(isotropic, torch.float64, n=6, c=3, d=4, seed=2)
    y = labels.cuda() if with_labels else None
    leaves = [t.cuda().requires_grad_(True) for t in (x, means, log_var)]

    def fn(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.ops.lsoftmax.lgm_logits(a, b, c, y, ALPHA, True)

    assert torch.autograd.gradcheck(fn, leaves)


@gpu
@needs_torch_cuda
@KINDS
def test_parameter_gradients_are_bitwise_reproducible(isotropic: bool) -> None:
    # Many rows per class: the own-class sums and column sums would differ run to run with
    # atomics; the fixed-order sums must not.
    x, means, log_var, labels = _case(isotropic, torch.float32, n=3000, c=4, d=33, seed=6)
    gen = torch.Generator().manual_seed(0)
    gz = torch.randn(3000, 4, generator=gen)
    gl = torch.randn(3000, generator=gen)
    first = _run_op("cuda", x, means, log_var, labels, True, gz, gl)
    for _ in range(3):
        again = _run_op("cuda", x, means, log_var, labels, True, gz, gl)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


@gpu
@needs_torch_cuda
def test_bad_labels_and_log_var_on_cuda() -> None:
    x, means, log_var, labels = (t.cuda() for t in _case(False, torch.float32, n=5, c=3, d=2))
    bad = labels.clone()
    bad[2] = 7
    with pytest.raises(ValueError, match=r"labels\[2\] = 7 is out of range \[0, 3\)"):
        torch.ops.lsoftmax.lgm_logits(x, means, log_var, bad, ALPHA, True)
    lv = log_var.clone()
    lv[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"log_var\[1, 1\] is not finite"):
        torch.ops.lsoftmax.lgm_logits(x, means, lv, labels, ALPHA, True)
    # "off": no check, no error; the good rows are still right.
    set_label_check("off")
    logits, _ = torch.ops.lsoftmax.lgm_logits(x, means, log_var, bad, ALPHA, True)
    want, _ = torch.ops.lsoftmax.lgm_logits(x, means, log_var, labels, ALPHA, True)
    keep = torch.tensor([0, 1, 3, 4], device="cuda")
    assert torch.equal(logits[keep], want[keep])


@gpu
@needs_torch_cuda
def test_lgm_loss_module_trains_on_cuda() -> None:
    from lsoftmax.torch.lgm import LGMLoss

    torch.manual_seed(0)
    loss_fn = LGMLoss(4, 3, alpha=0.5).cuda()
    feat = torch.randn(32, 3, device="cuda", requires_grad=True)
    target = torch.randint(0, 4, (32,), device="cuda")
    loss, logits = loss_fn(feat, target)
    loss.backward()
    assert logits.shape == (32, 4) and torch.isfinite(loss)
    assert feat.grad is not None and torch.isfinite(feat.grad).all()
    assert loss_fn.means.grad is not None and torch.isfinite(loss_fn.log_var.grad).all()


# --- GPU: ONNX Runtime CUDA EP ----------------------------------------------------------------


def _lgm_model(dtype: int, c: int, d: int, dv: int, with_labels: bool, logdet: int) -> bytes:
    labels_type = onnx.TensorProto.INT64 if with_labels else None
    return lgm_node_model(dtype, c, d, dv, labels_type, alpha=ALPHA, include_logdet=logdet)


@gpu
@needs_ort_cuda
@DTYPES
@KINDS
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "nolabels"])
@pytest.mark.parametrize("logdet", [1, 0], ids=["logdet", "nologdet"])
def test_ort_cuda_ep_matches_cpu_ep_and_runs_on_cuda(
    dtype: torch.dtype, isotropic: bool, with_labels: bool, logdet: int, tmp_path: Path
) -> None:
    x, means, log_var, labels = _case(isotropic, dtype, n=23, c=6, d=5, seed=8)
    onnx_type = onnx.TensorProto.DOUBLE if dtype == torch.float64 else onnx.TensorProto.FLOAT
    model = _lgm_model(onnx_type, 6, 5, log_var.shape[1], with_labels, logdet)
    feeds = {"X": x.numpy(), "means": means.numpy(), "log_var": log_var.numpy()}
    if with_labels:
        feeds["labels"] = labels.numpy().astype(np.int64)
    cuda = ep_session(model, "cuda", tmp_path)
    got = cuda.run(None, feeds)
    want = ep_session(model, "cpu").run(None, feeds)
    y = labels if with_labels else None
    ref = lgm_reference_grads(
        x, means, log_var, y, ALPHA, bool(logdet), torch.zeros(23, 6), torch.zeros(23)
    )
    for g, w, r in zip(got, want, ref[:2], strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert max_rel_err(g, r) <= TOL[dtype]
        assert max_rel_err(g, w.astype(np.float64)) <= 2 * TOL[dtype]
    placements = kernel_placements(cuda, "LGMLogits")
    assert placements and set(placements) == {"CUDAExecutionProvider"}, placements


@gpu
@needs_ort_cuda
def test_ort_cuda_ep_bad_labels_are_an_error() -> None:
    x, means, log_var, labels = _case(False, torch.float32, n=4, c=3, d=5)
    sess = ep_session(_lgm_model(onnx.TensorProto.FLOAT, 3, 5, 5, True, 1), "cuda")
    feeds = {"X": x.numpy(), "means": means.numpy(), "log_var": log_var.numpy()}
    bad = labels.numpy().astype(np.int64)
    bad[1] = 99
    with pytest.raises(Exception, match=r"labels\[1\] = 99 is out of range"):
        sess.run(None, {**feeds, "labels": bad})
    good = sess.run(None, {**feeds, "labels": labels.numpy().astype(np.int64)})
    assert all(np.isfinite(o).all() for o in good)


# --- every machine: no-GPU errors and checks made before any launch ---------------------------

FAKE = 1 << 20  # a non-null address that is never dereferenced: every case fails before a launch


def _m(rows: int, cols: int, dtype: str = "float32") -> tuple[int, int, int, int, int, str]:
    return (FAKE, rows, cols, cols, 1, dtype)


@pytest.mark.skipif(CUDA_READY, reason="a usable GPU is present: this checks the no-GPU errors")
def test_without_a_gpu_the_cuda_entry_points_error_clearly() -> None:
    expected = "driver|device|NVIDIA" if _core.cuda_compiled else "built without CUDA"
    with pytest.raises(RuntimeError, match=expected):
        _core.cuda_lgm_backward_workspace_size(8, 3, 4, 4)
    with pytest.raises(RuntimeError, match=expected):
        _core.cuda_lgm_prepare(_m(3, 4), _m(3, 4), FAKE, _m(3, 4), _m(3, 4), FAKE)


PREPARE_ERRORS = [
    ({"log_var": _m(2, 4)}, ValueError, r"log_var has shape \(2, 4\).*\(C, D\) or \(C, 1\)"),
    ({"means": _m(3, 4, "float16")}, ValueError, "float32 or float64"),
    ({"precision": _m(3, 4, "float64")}, ValueError, "precision is float64"),
    ({"scaled_means": _m(3, 5)}, ValueError, r"scaled_means has shape \(3, 5\)"),
    ({"means": _m(3, 4, "int8")}, TypeError, "means must be float32"),
    ({"offset": 0}, ValueError, "offset is a null pointer"),
]


@pytest.mark.skipif(not _core.cuda_compiled, reason="checks of the CUDA build's entry points")
@pytest.mark.parametrize(("over", "exc", "match"), PREPARE_ERRORS)
def test_prepare_checks_before_launch(over: dict[str, Any], exc: type, match: str) -> None:
    args: dict[str, Any] = {
        "means": _m(3, 4),
        "log_var": _m(3, 4),
        "offset": FAKE,
        "precision": _m(3, 4),
        "scaled_means": _m(3, 4),
        "class_terms": FAKE,
    }
    args.update(over)
    with pytest.raises(exc, match=match):
        _core.cuda_lgm_prepare(**args)


FORWARD_ERRORS = [
    ({"alpha": -1.0}, ValueError, "alpha must be a finite number >= 0"),
    ({"alpha": float("nan")}, ValueError, "alpha"),
    ({"x": _m(5, 3)}, ValueError, "x has 3 features per row but means has 4"),
    ({"logits": _m(5, 2)}, ValueError, r"logits has shape \(5, 2\), expected \(5, 3\)"),
    ({"sq_term": None}, ValueError, r"sq_term has shape \(0, 0\), expected \(5, 3\)"),
    ({"labels": (FAKE, 4, 1, "int64")}, ValueError, "labels has 4 entries but x has 5 rows"),
    ({"labels": (FAKE, 5, 1, "int16")}, TypeError, "labels must be int32 or int64"),
    ({"x": (FAKE, 5, 4, 4, -1, "float32")}, ValueError, "x has a negative stride"),
]


@pytest.mark.skipif(not _core.cuda_compiled, reason="checks of the CUDA build's entry points")
@pytest.mark.parametrize(("over", "exc", "match"), FORWARD_ERRORS)
def test_forward_checks_before_launch(over: dict[str, Any], exc: type, match: str) -> None:
    args: dict[str, Any] = {
        "x": _m(5, 4),
        "means": _m(3, 4),
        "log_var": _m(3, 4),
        "offset": FAKE,
        "class_terms": FAKE,
        "sq_term": _m(5, 3),
        "labels": (FAKE, 5, 1, "int64"),
        "logits": _m(5, 3),
        "loglik": FAKE,
        "alpha": 0.5,
        "include_logdet": True,
    }
    args.update(over)
    with pytest.raises(exc, match=match):
        _core.cuda_lgm_forward_(**args)


@pytest.mark.skipif(not _core.cuda_compiled, reason="checks of the CUDA build's entry points")
def test_backward_coeffs_checks_workspace_before_launch() -> None:
    with pytest.raises(ValueError, match="workspace has 8 bytes, the L-GM backward needs"):
        _core.cuda_lgm_backward_coeffs(
            _m(5, 3), FAKE, _m(5, 3), FAKE, None, 0.5, True, _m(5, 3),
            FAKE, FAKE, FAKE, FAKE, FAKE, 8,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"coeff has shape \(5, 2\)"):
        _core.cuda_lgm_backward_coeffs(
            _m(5, 3), FAKE, _m(5, 3), FAKE, None, 0.5, True, _m(5, 2),
            FAKE, FAKE, FAKE, FAKE, FAKE, 1 << 20,
        )  # fmt: skip


def test_other_devices_have_no_kernel() -> None:
    x = torch.empty(2, 3, device="meta")
    with pytest.raises(NotImplementedError, match="CPU and on CUDA devices"):
        lgm_mod._forward(x, torch.empty(4, 3, device="meta"), torch.empty(4, 3, device="meta"),
                         None, 0.0, True)  # fmt: skip


# --- every machine: the torch CUDA glue on CPU tensors with stand-in launchers ----------------


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple, dict]]:
    """lgm/ops.py's CUDA path run on CPU tensors: torch.cuda's stream/device calls and the _core
    launchers are stand-ins that record what they are given."""
    calls: list[tuple[str, tuple, dict]] = []
    fake_cuda_runtime(monkeypatch)
    for name in (
        "cuda_lgm_prepare",
        "cuda_lgm_forward_",
        "cuda_lgm_backward_coeffs",
        "cuda_lgm_backward_assemble",
    ):
        monkeypatch.setattr(_core, name, lambda *a, _n=name, **k: calls.append((_n, a, k)))
    monkeypatch.setattr(_core, "cuda_lgm_backward_workspace_size", lambda n, c, d, dv: 512 + n)
    # A build without CUDA raises from every cuda_* entry, the size queries included.
    monkeypatch.setattr(_core, "cuda_lgm_class_terms_bytes", lambda c: 24 * c)
    lgm_mod._cuda_workspace_bytes.cache_clear()
    yield calls
    lgm_mod._cuda_workspace_bytes.cache_clear()


def test_torch_glue_forward_marshals_pointers_strides_stream(fake_cuda: list) -> None:
    base = torch.zeros(5, 8, dtype=torch.float64)
    x = base[:, ::2]  # strides (8, 2)
    means, log_var = torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0], dtype=torch.int32)
    logits, loglik = lgm_mod._cuda_forward(x, means, log_var, y, 0.5, False)
    (p_name, p_args, p_kw), (f_name, f_args, f_kw) = fake_cuda
    assert (p_name, f_name) == ("cuda_lgm_prepare", "cuda_lgm_forward_")
    assert p_args[0] == (means.data_ptr(), 3, 4, 4, 1, "float64")
    assert p_args[1] == (log_var.data_ptr(), 3, 1, 1, 1, "float64")
    assert p_args[3][1:] == (3, 1, 1, 1, "float64") and p_args[4][1:] == (3, 4, 4, 1, "float64")
    assert f_args[0] == (x.data_ptr(), 5, 4, 8, 2, "float64")
    assert f_args[3] == p_args[2] and f_args[4] == p_args[5]  # offset and class terms
    assert f_args[5] is None  # isotropic: no sq_term
    assert f_args[6] == (y.data_ptr(), 5, 1, "int32")
    assert f_args[7] == (logits.data_ptr(), 5, 3, 3, 1, "float64")
    assert f_args[8] == loglik.data_ptr() and f_args[9:] == (0.5, False)
    assert f_kw["stream"] == FAKE_STREAM == p_kw["stream"]
    assert f_kw["error_flag"] != 0 and f_kw["error_flag"] == p_kw["error_flag"]

    fake_cuda.clear()
    set_label_check("off")
    lgm_mod._cuda_forward(x, means, torch.zeros(3, 4, dtype=torch.float64), None, 0.0, True)
    f_args, f_kw = fake_cuda[1][1:]
    assert f_kw["error_flag"] == 0 and f_args[6] is None
    assert f_args[5] is not None and f_args[5][1:3] == (5, 3)  # diagonal: sq_term (N, C)


@pytest.mark.parametrize(
    ("bit", "match"),
    [(1, r"labels\[1\] = 5 is out of range \[0, 3\)"), (2, r"log_var\[2, 1\] is not finite")],
)
def test_torch_glue_raises_on_flagged_input(
    fake_cuda: list, monkeypatch: pytest.MonkeyPatch, bit: int, match: str
) -> None:
    def flagging(*args: Any, **kw: Any) -> None:
        ctypes.c_int32.from_address(kw["error_flag"]).value |= bit  # what the kernels do

    monkeypatch.setattr(_core, "cuda_lgm_forward_", flagging)
    log_var = torch.zeros(3, 2)
    if bit == 2:
        log_var[2, 1] = float("nan")
    y = torch.tensor([0, 5, 1])
    with pytest.raises(ValueError, match=match):
        lgm_mod._cuda_forward(torch.zeros(3, 2), torch.zeros(3, 2), log_var, y, 0.0, True)


def test_torch_glue_backward_buffers_and_workspace(fake_cuda: list) -> None:
    n, c, d = 6, 3, 4
    x, means, log_var = torch.zeros(n, d), torch.zeros(c, d), torch.zeros(c, d)
    g, logits = torch.zeros(n, c), torch.zeros(n, c)
    gl = torch.zeros(2 * n)[::2]  # non-contiguous: made contiguous before the launch
    y = torch.zeros(n, dtype=torch.int64)
    gx, gm, glv = lgm_mod._cuda_backward(g, gl, logits, x, means, log_var, y, 0.25, True)
    names = [name for name, _, _ in fake_cuda]
    assert names == ["cuda_lgm_prepare", "cuda_lgm_backward_coeffs", "cuda_lgm_backward_assemble"]
    c_args, c_kw = fake_cuda[1][1:]
    a_args, a_kw = fake_cuda[2][1:]
    assert c_args[0] == (g.data_ptr(), n, c, c, 1, "float32")
    assert c_args[1] != gl.data_ptr()  # the contiguous copy
    assert c_args[4] == (y.data_ptr(), n, 1, "int64") and c_args[5:7] == (0.25, True)
    assert c_args[13] == 512 + n == a_args[16]  # workspace bytes, one buffer for both steps
    assert c_args[12] == a_args[15] != 0
    assert c_args[8:12] == a_args[4:8]  # colsum, grad_h, own, cls feed the assembly
    assert a_args[12:15] == (
        (gx.data_ptr(), n, d, d, 1, "float32"),
        (gm.data_ptr(), c, d, d, 1, "float32"),
        (glv.data_ptr(), c, d, d, 1, "float32"),
    )
    assert c_kw["stream"] == a_kw["stream"] == FAKE_STREAM
    assert c_kw["error_flag"] == a_kw["error_flag"] != 0

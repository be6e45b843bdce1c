"""CUDA: the kernels against the CPU core and the float64 reference, determinism, the torch ops on
GPU tensors (autograd, gradcheck, torch.compile, CUDA graphs), the framework-neutral entry points
(``__cuda_array_interface__`` and DLPack); and, on every machine, the errors without a GPU and
the parsing of array interfaces (fake objects, checked before anything is launched).

GPU tests carry the ``gpu`` marker; ``benchmarks/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import copy
import ctypes
import math
import os
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA_READY, TOL, needs_gpu, needs_torch_cuda
from helpers import FAKE_STREAM, fake_cuda_runtime
from reference import lsoftmax_reference, max_rel_err, reference_with_grads, segment_case

import lsoftmax.cuda as lc
from lsoftmax import _core, core
from lsoftmax.schedules import Constant, Exponential, Onset, Scaled, Schedule, StepUp
from lsoftmax.torch import LSoftmaxLinear, _kernels, set_deterministic, set_label_check
from lsoftmax.torch._kernels import deterministic_enabled
from lsoftmax.torch.functional import lsoftmax_logits

gpu = pytest.mark.gpu
MARGINS = list(range(1, 9))
LAM = 0.5


@pytest.fixture(autouse=True)
def _defaults() -> Any:
    """Every test starts from the default settings and exact float32 GEMMs."""
    set_deterministic(None)
    set_label_check("sync")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32
    set_deterministic(None)
    set_label_check("sync")


def _case(margin: int, dtype: Any, *, classes: int = 3, per_segment: int = 4, d: int = 37):
    """numpy (x, w, y) with rows in every segment and several rows per class."""
    x, w, y, _ = segment_case(
        margin, per_segment=per_segment, num_classes=classes, features=d, seed=margin
    )
    return x.numpy().astype(dtype), w.numpy().astype(dtype), y.numpy()


def _grad(n: int, c: int, dtype: Any, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, c)).astype(dtype)


def _ref(x: Any, w: Any, y: Any, margin: int, g: Any) -> tuple[torch.Tensor, ...]:
    def as_t(a: Any) -> torch.Tensor:
        return torch.from_numpy(a) if isinstance(a, np.ndarray) else a.detach().cpu()

    return reference_with_grads(as_t(x), as_t(w), as_t(y), margin, LAM, as_t(g))


# --- the core through lsoftmax.cuda and DeviceArray (a GPU, no CUDA build of torch needed) ----


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("margin", MARGINS)
def test_forward_matches_cpu_core_and_reference(margin: int, dtype: Any) -> None:
    x, w, y = _case(margin, dtype)
    logits = (x @ w.T).astype(dtype)
    cpu = logits.copy()
    core.margin_forward_(cpu, x, w, y, margin, LAM)
    dev = lc.DeviceArray(logits)
    lc.margin_forward_(dev, lc.DeviceArray(x), lc.DeviceArray(w), lc.DeviceArray(y), margin, LAM)
    out = dev.numpy()
    ref = lsoftmax_reference(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(y), margin, LAM
    )
    assert max_rel_err(out, ref) <= TOL[dtype]
    assert max_rel_err(out, cpu) <= TOL[dtype]


def _device_backward(g, x, w, y, margin: int, deterministic: bool, gx0=None, gw0=None):
    gx = lc.DeviceArray((g @ w).astype(x.dtype) if gx0 is None else gx0)
    gw = lc.DeviceArray((g.T @ x).astype(x.dtype) if gw0 is None else gw0)
    args = [lc.DeviceArray(a) for a in (g, x, w, y)]
    lc.margin_backward_(*args, gx, gw, margin, LAM, deterministic=deterministic)
    return gx.numpy(), gw.numpy()


@gpu
@needs_gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("margin", MARGINS)
def test_backward_matches_cpu_core_and_reference(
    margin: int, dtype: Any, deterministic: bool
) -> None:
    x, w, y = _case(margin, dtype)
    g = _grad(x.shape[0], w.shape[0], dtype)
    gx, gw = _device_backward(g, x, w, y, margin, deterministic)
    cgx, cgw = (g @ w).astype(dtype), (g.T @ x).astype(dtype)
    core.margin_backward_(g, x, w, y, cgx, cgw, margin, LAM)
    _, rgx, rgw = _ref(x, w, y, margin, g)
    for out, cpu, ref in ((gx, cgx, rgx), (gw, cgw, rgw)):
        assert max_rel_err(out, ref) <= TOL[dtype]
        assert max_rel_err(out, cpu) <= TOL[dtype]


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_many_rows_per_class_deterministic_is_bitwise_stable(dtype: Any) -> None:
    # 2048 rows over 5 classes, 300 columns: several column tiles of the segmented scatter.
    rng = np.random.default_rng(1)
    n, c, d, margin = 2048, 5, 300, 4
    x = rng.standard_normal((n, d)).astype(dtype)
    w = rng.standard_normal((c, d)).astype(dtype)
    y = rng.integers(0, c, n)
    g = _grad(n, c, dtype)
    first = _device_backward(g, x, w, y, margin, True)
    second = _device_backward(g, x, w, y, margin, True)
    atomic = _device_backward(g, x, w, y, margin, False)
    cgx, cgw = (g @ w).astype(dtype), (g.T @ x).astype(dtype)
    core.margin_backward_(g, x, w, y, cgx, cgw, margin, LAM)
    for a, b, at, cpu in zip(first, second, atomic, (cgx, cgw), strict=True):
        assert np.array_equal(a, b)
        assert max_rel_err(a, cpu) <= 10 * TOL[dtype]
        assert max_rel_err(at, cpu) <= 10 * TOL[dtype]


@gpu
@needs_gpu
@pytest.mark.parametrize("margin", [2, 4, 8])
def test_float16_through_array_interface(margin: int) -> None:
    # The kernels read f from the logits they are given: the float64 core on the same
    # float16 logits (upcast) is the exact target, up to float32 math and one rounding.
    x, w, y = _case(margin, np.float16)
    logits = (x.astype(np.float32) @ w.astype(np.float32).T).astype(np.float16)
    dev = lc.DeviceArray(logits)
    lc.margin_forward_(dev, lc.DeviceArray(x), lc.DeviceArray(w), lc.DeviceArray(y), margin, LAM)
    exact = logits.astype(np.float64)
    core.margin_forward_(exact, x.astype(np.float64), w.astype(np.float64), y, margin, LAM)
    assert max_rel_err(dev.numpy(), exact) <= TOL[torch.float16]

    g = _grad(x.shape[0], w.shape[0], np.float16)
    gx0 = (g.astype(np.float32) @ w.astype(np.float32)).astype(np.float16)
    gw0 = (g.T.astype(np.float32) @ x.astype(np.float32)).astype(np.float16)
    gx, gw = _device_backward(g, x, w, y, margin, False, gx0, gw0)
    egx, egw = gx0.astype(np.float64), gw0.astype(np.float64)
    f64 = [a.astype(np.float64) for a in (g, x, w)]
    core.margin_backward_(f64[0], f64[1], f64[2], y, egx, egw, margin, LAM)
    assert max_rel_err(gx, egx) <= TOL[torch.float16]
    assert max_rel_err(gw, egw) <= TOL[torch.float16]


@gpu
@needs_gpu
def test_bad_label_raises_with_sync_check_and_sets_flag_without() -> None:
    x, w, y = _case(4, np.float32)
    y = y.copy()
    y[2] = 7  # 3 classes
    logits = (x @ w.T).astype(np.float32)
    args = (lc.DeviceArray(x), lc.DeviceArray(w), lc.DeviceArray(y))
    with pytest.raises(ValueError, match=r"labels\[2\] = 7 is out of range \[0, 3\)"):
        lc.margin_forward_(lc.DeviceArray(logits), *args, 4, LAM)
    flag = lc.DeviceArray(np.zeros(1, np.int32))
    dev = lc.DeviceArray(logits)
    lc.margin_forward_(dev, *args, 4, LAM, error_flag=flag)
    assert flag.numpy()[0] == 1
    out = dev.numpy()
    assert out[2, :].tolist() == logits[2, :].tolist()  # the bad row is left alone
    good = np.arange(len(y)) != 2
    cpu = logits[good].copy()
    core.margin_forward_(cpu, x[good], w, y[good], 4, LAM)
    assert max_rel_err(out[good], cpu) <= 1e-5


# --- torch CUDA tensors ------------------------------------------------------------------------


def _torch_case(margin: int, dtype: torch.dtype, classes: int = 3):
    x, w, y, _ = segment_case(margin, per_segment=4, num_classes=classes, features=37, seed=margin)
    return x.to("cuda", dtype), w.to("cuda", dtype), y.cuda()


@gpu
@needs_torch_cuda
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margin", MARGINS)
def test_torch_op_parity(margin: int, dtype: torch.dtype, deterministic: bool) -> None:
    set_deterministic(deterministic)
    x, w, y = _torch_case(margin, dtype)
    x.requires_grad_(True)
    w.requires_grad_(True)
    out = lsoftmax_logits(x, w, y, margin, LAM)
    g = torch.randn(out.shape, dtype=dtype, device="cuda", generator=None)
    out.backward(g)
    ref, rgx, rgw = _ref(x, w, y, margin, g)
    assert max_rel_err(out.detach().cpu(), ref) <= TOL[dtype]
    assert max_rel_err(x.grad.cpu(), rgx) <= TOL[dtype]
    assert max_rel_err(w.grad.cpu(), rgw) <= TOL[dtype]


@gpu
@needs_torch_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("margin", [1, 2, 4, 8])
def test_torch_op_16bit(margin: int, dtype: torch.dtype) -> None:
    # Exact target: the float64 CPU core applied to the very GEMM results torch produced.
    x, w, y = _torch_case(margin, dtype)
    plain = torch.ops.lsoftmax.linear(x, w, None, margin, 0.0)
    out = torch.ops.lsoftmax.linear(x, w, y, margin, LAM)
    assert out.dtype == dtype
    exact = plain.double().cpu().numpy()
    x64, w64 = x.double().cpu().numpy(), w.double().cpu().numpy()
    core.margin_forward_(exact, x64, w64, y.cpu().numpy(), margin, LAM)
    assert max_rel_err(out.double().cpu(), torch.from_numpy(exact)) <= TOL[dtype]

    g = torch.randn(out.shape, device="cuda").to(dtype)
    lam = torch.tensor(LAM, dtype=torch.float64)
    gx, gw = torch.ops.lsoftmax.linear_backward(g, x, w, y, lam, margin)
    egx = torch.mm(g, w).double().cpu().numpy()
    egw = torch.mm(g.t(), x).double().cpu().numpy()
    core.margin_backward_(
        g.double().cpu().numpy(), x64, w64, y.cpu().numpy(), egx, egw, margin, LAM
    )
    assert gx.dtype == dtype and gw.dtype == dtype
    assert max_rel_err(gx.double().cpu(), torch.from_numpy(egx)) <= TOL[dtype]
    assert max_rel_err(gw.double().cpu(), torch.from_numpy(egw)) <= TOL[dtype]


@gpu
@needs_torch_cuda
def test_torch_deterministic_mode_is_bitwise_stable_and_matches_atomics() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, c, d = 4096, 7, 512
    x = torch.randn(n, d, device="cuda", generator=gen)
    w = torch.randn(c, d, device="cuda", generator=gen)
    y = torch.randint(0, c, (n,), device="cuda", generator=gen)
    g = torch.randn(n, c, device="cuda", generator=gen)
    lam = torch.tensor(LAM, dtype=torch.float64)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.lsoftmax.linear_backward(g, x, w, y, lam, 4)

    set_deterministic(True)
    a, b = run(), run()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    set_deterministic(False)
    atomic = run()
    for det, at in zip(a, atomic, strict=True):
        assert max_rel_err(at.cpu(), det.cpu()) <= 1e-5


def test_deterministic_setting_follows_torch_when_unset() -> None:
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert deterministic_enabled()
        set_deterministic(False)
        assert not deterministic_enabled()
        set_deterministic(None)
        torch.use_deterministic_algorithms(False)
        assert not deterministic_enabled()
    finally:
        torch.use_deterministic_algorithms(prev)
    with pytest.raises(TypeError, match="mode must be a bool or None"):
        set_deterministic("yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode must be one of"):
        set_label_check("never")


@gpu
@needs_torch_cuda
@pytest.mark.parametrize("margin", MARGINS)
def test_gradcheck_float64_on_gpu(margin: int) -> None:
    x, w, y, _ = segment_case(margin, per_segment=2, num_classes=4, features=5, seed=margin)
    x = x.cuda().requires_grad_(True)
    w = w.cuda().requires_grad_(True)
    y = y.cuda()
    assert torch.autograd.gradcheck(lambda a, b: lsoftmax_logits(a, b, y, margin, LAM), (x, w))


@gpu
@needs_torch_cuda
def test_bad_labels_on_cuda() -> None:
    x, w, y = _torch_case(4, torch.float32)
    y = y.clone()
    y[3] = -1
    with pytest.raises(ValueError, match=r"labels\[3\] = -1 is out of range \[0, 3\)"):
        lsoftmax_logits(x, w, y, 4, LAM)
    set_label_check("off")
    out = lsoftmax_logits(x, w, y, 4, LAM)
    plain = x @ w.t()
    assert torch.equal(out[3], plain[3])


def _loss(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lsoftmax_logits(x, w, y, 4, LAM), y)


@gpu
@needs_torch_cuda
def test_torch_compile_on_cuda() -> None:
    from torch.utils._triton import has_triton

    x, w, y = _torch_case(4, torch.float32)
    w.requires_grad_(True)
    loss = _loss(x, w, y)
    (grad,) = torch.autograd.grad(loss, w)
    backend = "inductor" if has_triton() else "aot_eager"
    compiled = torch.compile(_loss, fullgraph=True, backend=backend)
    closs = compiled(x, w, y)
    (cgrad,) = torch.autograd.grad(closs, w)
    assert max_rel_err(closs.detach().cpu(), loss.detach().cpu()) <= 1e-6
    assert max_rel_err(cgrad.cpu(), grad.cpu()) <= 1e-6


@gpu
@needs_torch_cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_graph_capture_of_forward_and_backward(deterministic: bool) -> None:
    set_deterministic(deterministic)
    n, c, d = 64, 10, 32
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(c, d, device="cuda", generator=gen, requires_grad=True)
    static_x = torch.randn(n, d, device="cuda", generator=gen)
    static_y = torch.randint(0, c, (n,), device="cuda", generator=gen)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture, as torch requires
            w.grad = None
            _loss(static_x, w, static_y).backward()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    w.grad = None
    with torch.cuda.graph(graph):
        static_loss = _loss(static_x, w, static_y)
        static_loss.backward()

    for seed in (1, 2):
        gen.manual_seed(seed)
        static_x.copy_(torch.randn(n, d, device="cuda", generator=gen))
        static_y.copy_(torch.randint(0, c, (n,), device="cuda", generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        wr = w.detach().clone().requires_grad_(True)
        eager = _loss(static_x, wr, static_y)
        eager.backward()
        assert max_rel_err(static_loss.detach().cpu(), eager.detach().cpu()) <= 1e-6
        assert max_rel_err(w.grad.cpu(), wr.grad.cpu()) <= 1e-6


@gpu
@needs_torch_cuda
def test_array_interface_with_torch_tensors_and_strides() -> None:
    x, w, y = _torch_case(4, torch.float32)
    wide = torch.zeros(x.shape[0], 2 * x.shape[1], device="cuda")
    wide[:, ::2] = x
    xs = wide[:, ::2]  # column stride 2
    logits = xs @ w.t()
    expected = lsoftmax_logits(x, w, y, 4, LAM)
    stream = torch.cuda.current_stream()
    lc.margin_forward_(logits, xs, w, y, 4, LAM, stream=stream)
    assert max_rel_err(logits.cpu(), expected.cpu()) <= 1e-6

    g = torch.randn_like(logits)
    gx, gw = g @ w, g.t() @ xs
    lc.margin_backward_(g, xs, w, y, gx, gw, 4, LAM, deterministic=True)
    lam = torch.tensor(LAM, dtype=torch.float64)
    egx, egw = torch.ops.lsoftmax.linear_backward(g, x, w, y, lam, 4)
    assert max_rel_err(gx.cpu(), egx.cpu()) <= 1e-6
    assert max_rel_err(gw.cpu(), egw.cpu()) <= 1e-6


class DLPackOnly:
    """Hides a tensor's __cuda_array_interface__, so lsoftmax.cuda must read it through DLPack."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def __dlpack__(self, stream: Any = None) -> Any:
        return self.t.__dlpack__(stream=stream)

    def __dlpack_device__(self) -> Any:
        return self.t.__dlpack_device__()


@gpu
@needs_torch_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dlpack_and_bfloat16_interface_paths(dtype: torch.dtype) -> None:
    x, w, y = _torch_case(4, dtype)
    expected = torch.ops.lsoftmax.linear(x, w, y, 4, LAM)
    via_cai = x @ w.t()  # bfloat16: typestr '<V2'
    lc.margin_forward_(via_cai, x, w, y, 4, LAM)
    via_dlpack = x @ w.t()
    lc.margin_forward_(*(DLPackOnly(t) for t in (via_dlpack, x, w, y)), 4, LAM)
    torch.cuda.synchronize()
    assert torch.equal(via_cai, expected)
    assert torch.equal(via_dlpack, expected)


@gpu
@needs_torch_cuda
def test_cupy_arrays_if_installed() -> None:
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    x, w, y = _case(4, np.float32)
    cx, cw, cy = cupy.asarray(x), cupy.asarray(w), cupy.asarray(y)
    logits = cx @ cw.T
    lc.margin_forward_(logits, cx, cw, cy, 4, LAM)
    ref = lsoftmax_reference(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(y), 4, LAM)
    assert max_rel_err(cupy.asnumpy(logits), ref) <= 1e-5


# --- everywhere: no-GPU behaviour and interface parsing ---------------------------------------


class FakeCAI:
    """An object with only a ``__cuda_array_interface__`` (the pointer is never dereferenced)."""

    def __init__(self, shape, typestr="<f4", ptr=1 << 20, strides=None, readonly=False, **extra):
        self.__cuda_array_interface__ = {
            "shape": tuple(shape),
            "typestr": typestr,
            "data": (ptr, readonly),
            "strides": strides,
            "version": 3,
            **extra,
        }


def _fwd_args(**over: Any) -> dict[str, Any]:
    args = {
        "logits": FakeCAI((4, 5), ptr=0x1000),
        "x": FakeCAI((4, 3), ptr=0x2000),
        "weight": FakeCAI((5, 3), ptr=0x3000),
        "labels": FakeCAI((4,), "<i8", ptr=0x4000),
        "margin": 4,
        "lam": 0.5,
    }
    args.update(over)
    return args


FORWARD_ERRORS = [
    ("x typestr", {"x": FakeCAI((4, 3), "<u4")}, TypeError, "x has typestr '<u4'"),
    ("x dtype mismatch", {"x": FakeCAI((4, 3), "<f8")}, TypeError, "weight is float32 but x is"),
    ("labels float", {"labels": FakeCAI((4,), "<f4")}, TypeError, "labels must be int32 or"),
    ("labels 2-D", {"labels": FakeCAI((4, 1), "<i8")}, ValueError, "labels must be 1-D"),
    ("x 3-D", {"x": FakeCAI((4, 3, 1))}, ValueError, "x must be 2-D"),
    ("features", {"weight": FakeCAI((5, 4))}, ValueError, "x has 3 features but weight has 4"),
    ("logits shape", {"logits": FakeCAI((4, 6))}, ValueError, r"logits has shape \(4, 6\)"),
    ("labels length", {"labels": FakeCAI((3,), "<i8")}, ValueError, r"labels has shape \(3,\)"),
    ("read-only", {"logits": FakeCAI((4, 5), readonly=True)}, ValueError, "logits must be writ"),
    ("odd stride", {"x": FakeCAI((4, 3), strides=(12, 3))}, ValueError, "not a multiple"),
    ("masked", {"x": FakeCAI((4, 3), mask=object())}, ValueError, "masked"),
    ("not an array", {"x": [[1.0]]}, TypeError, "x must be a CUDA array"),
    ("cpu tensor", {"x": torch.zeros(4, 3)}, TypeError, "x is not on a CUDA device"),
    ("margin", {"margin": 0}, ValueError, "margin must be"),
    ("lambda", {"lam": -1.0}, ValueError, "lambda must be >= 0"),
]


@pytest.mark.parametrize(
    ("over", "exc", "match"),
    [pytest.param(o, e, m, id=name) for name, o, e, m in FORWARD_ERRORS],
)
def test_forward_interface_errors_before_launch(
    over: dict[str, Any], exc: type[Exception], match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched: list[Any] = []
    monkeypatch.setattr(_core, "cuda_margin_forward_", lambda *a, **k: launched.append(a))
    with pytest.raises(exc, match=match):
        lc.margin_forward_(**_fwd_args(**over))
    assert not launched


def test_backward_interface_errors_before_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    launched: list[Any] = []
    monkeypatch.setattr(_core, "cuda_margin_backward_", lambda *a, **k: launched.append(a))
    good = {
        "grad_logits": FakeCAI((4, 5)),
        "x": FakeCAI((4, 3)),
        "weight": FakeCAI((5, 3)),
        "labels": FakeCAI((4,), "<i4"),
        "grad_x": FakeCAI((4, 3)),
        "grad_weight": FakeCAI((5, 3)),
        "margin": 2,
        "lam": 0.0,
    }
    cases = [
        ({"grad_weight": FakeCAI((5, 4))}, ValueError, r"grad_weight has shape \(5, 4\)"),
        ({"grad_x": FakeCAI((4, 3), "<f8")}, TypeError, "grad_x is float64 but x is float32"),
        ({"grad_logits": FakeCAI((5, 4))}, ValueError, r"grad_logits has shape \(5, 4\)"),
        ({"grad_x": FakeCAI((4, 3), readonly=True)}, ValueError, "grad_x must be writeable"),
        ({"workspace": FakeCAI((8,), strides=(8,))}, ValueError, "workspace must be contiguous"),
    ]
    for over, exc, match in cases:
        with pytest.raises(exc, match=match):
            lc.margin_backward_(**{**good, **over})
    assert not launched
    lc.margin_backward_(**good, workspace=FakeCAI((64,), "|u1", ptr=0x9000))
    assert len(launched) == 1


def test_interface_parsing_pointers_strides_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    monkeypatch.setattr(_core, "cuda_margin_forward_", lambda *a, **k: calls.append((a, k)))
    # x is a view with a row stride of 10 floats and a column stride of 2 (byte strides 40, 8).
    args = _fwd_args(
        x=FakeCAI((4, 3), ptr=0x2000, strides=(40, 8), stream=7),
        labels=FakeCAI((4,), "<i4", ptr=0x4000, strides=(8,)),
    )
    lc.margin_forward_(**args)
    (logits, x, w, labels, margin, lam), kw = calls[-1]
    assert logits == (0x1000, 4, 5, 5, 1, "float32")
    assert x == (0x2000, 4, 3, 10, 2, "float32")
    assert w == (0x3000, 5, 3, 3, 1, "float32")
    assert labels == (0x4000, 4, 2, "int32")
    assert (margin, lam) == (4, 0.5)
    assert kw == {"error_flag": 0, "stream": 7}  # the stream the producer named

    class TorchLikeStream:
        cuda_stream = 1234

    lc.margin_forward_(**args, stream=TorchLikeStream())
    assert calls[-1][1]["stream"] == 1234
    flag = FakeCAI((1,), "<i4", ptr=0x5000)
    lc.margin_forward_(**args, stream=99, error_flag=flag)
    assert calls[-1][1] == {"error_flag": 0x5000, "stream": 99}
    with pytest.raises(TypeError, match="error_flag must be a device int32"):
        lc.margin_forward_(**args, error_flag=FakeCAI((2,), "<i4"))


class FakeDLPack:
    """A CPU numpy array dressed as a CUDA one: exercises the DLPack capsule reader."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)  # kDLCUDA

    def __dlpack__(self, stream: Any = None) -> Any:
        return self.array.__dlpack__()


def test_dlpack_capsule_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(_core, "cuda_margin_forward_", lambda *a, **k: calls.append(a))
    base = np.zeros((4, 6), np.float64)
    xv = base[:, ::2]  # strides (6, 2) in elements
    logits = np.zeros((4, 5), np.float64)
    w = np.zeros((5, 3), np.float64)
    labels = np.zeros(4, np.int64)
    lc.margin_forward_(*(FakeDLPack(a) for a in (logits, xv, w, labels)), 3, 0.0)
    lg, x, wt, lb = calls[-1][:4]
    assert x == (base.ctypes.data, 4, 3, 6, 2, "float64")
    assert lg == (logits.ctypes.data, 4, 5, 5, 1, "float64")
    assert wt[0] == w.ctypes.data and lb == (labels.ctypes.data, 4, 1, "int64")

    class CpuDLPack(FakeDLPack):
        def __dlpack_device__(self) -> tuple[int, int]:
            return (1, 0)

    with pytest.raises(TypeError, match="x is not on a CUDA device"):
        lc.margin_forward_(
            FakeDLPack(logits), CpuDLPack(xv), FakeDLPack(w), FakeDLPack(labels), 3, 0.0
        )


@pytest.fixture
def fake_torch_cuda(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple, dict]]:
    """The torch CUDA glue of _kernels.py run on CPU tensors: torch.cuda's stream/device calls
    and the _core launchers are stand-ins that record what they are given."""
    calls: list[tuple[str, tuple, dict]] = []
    fake_cuda_runtime(monkeypatch)
    monkeypatch.setattr(_core, "cuda_margin_forward_", lambda *a, **k: calls.append(("f", a, k)))
    monkeypatch.setattr(_core, "cuda_margin_backward_", lambda *a, **k: calls.append(("b", a, k)))
    monkeypatch.setattr(_core, "cuda_backward_workspace_size", lambda n, c, dt, det: 1000 + n)
    _kernels._workspace_bytes.cache_clear()
    yield calls
    _kernels._workspace_bytes.cache_clear()


def test_torch_cuda_glue_marshals_pointers_strides_stream(fake_torch_cuda: list) -> None:
    base = torch.zeros(5, 8, dtype=torch.float64)
    x = base[:, ::2]  # strides (8, 2)
    w = torch.zeros(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0], dtype=torch.int32)
    logits = torch.zeros(5, 3, dtype=torch.float64)
    _kernels._cuda_forward_(logits, x, w, y, 4, 0.5)
    kind, args, kw = fake_torch_cuda[-1]
    assert kind == "f"
    assert args[:4] == (
        (logits.data_ptr(), 5, 3, 3, 1, "float64"),
        (x.data_ptr(), 5, 4, 8, 2, "float64"),
        (w.data_ptr(), 3, 4, 4, 1, "float64"),
        (y.data_ptr(), 5, 1, "int32"),
    )
    assert args[4:] == (4, 0.5)
    assert kw["stream"] == FAKE_STREAM and kw["check_labels"] and kw["error_flag"] != 0

    set_label_check("off")
    _kernels._cuda_forward_(logits, x, w, y, 4, 0.5)
    assert fake_torch_cuda[-1][2]["error_flag"] == 0
    assert not fake_torch_cuda[-1][2]["check_labels"]


def test_torch_cuda_glue_backward_workspace_and_modes(fake_torch_cuda: list) -> None:
    g = torch.zeros(5, 3)
    x, w = torch.zeros(5, 4), torch.zeros(3, 4)
    y = torch.zeros(5, dtype=torch.int64)
    gx, gw = torch.zeros(5, 4), torch.zeros(3, 4)
    _kernels._cuda_backward_(g, x, w, y, gx, gw, 4, 0.0)  # atomic: no workspace
    kw = fake_torch_cuda[-1][2]
    assert not kw["deterministic"] and kw["workspace"] == 0 and kw["workspace_bytes"] == 0
    set_deterministic(True)
    _kernels._cuda_backward_(g, x, w, y, gx, gw, 4, 0.0)
    kw = fake_torch_cuda[-1][2]
    assert kw["deterministic"] and kw["workspace"] != 0 and kw["workspace_bytes"] == 1005
    set_deterministic(False)
    h = [t.half() for t in (g, x, w, gx, gw)]  # 16-bit: always the workspace path
    _kernels._cuda_backward_(h[0], h[1], h[2], y, h[3], h[4], 4, 0.0)
    args, kw = fake_torch_cuda[-1][1:]
    assert args[0][5] == "float16" and kw["workspace_bytes"] == 1005
    _kernels._cuda_backward_(h[0], h[1], h[2], y, h[3], h[4], 1, 0.0)  # margin 1: no scatter
    assert fake_torch_cuda[-1][2]["workspace_bytes"] == 0


def test_torch_cuda_glue_raises_on_flagged_labels(
    fake_torch_cuda: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    def flagging_forward(*args: Any, **kw: Any) -> None:
        ctypes.c_int32.from_address(kw["error_flag"]).value = 1  # what the kernel does

    monkeypatch.setattr(_core, "cuda_margin_forward_", flagging_forward)
    y = torch.tensor([0, 5, 1])
    with pytest.raises(ValueError, match=r"labels\[1\] = 5 is out of range \[0, 3\)"):
        _kernels._cuda_forward_(torch.zeros(3, 3), torch.zeros(3, 2), torch.zeros(3, 2), y, 2, 0.0)
    with pytest.raises(TypeError, match="labels must be int32 or int64"):
        _kernels._cuda_forward_(
            torch.zeros(3, 3), torch.zeros(3, 2), torch.zeros(3, 2), y.to(torch.int16), 2, 0.0
        )


def test_cuda_build_requested_means_cuda_compiled() -> None:
    # CI builds with LSOFTMAX_CUDA=ON (.ci/run exports it): the CUDA code must then be in _core.
    requested = os.environ.get("LSOFTMAX_CUDA", "").upper() == "ON"
    assert _core.cuda_compiled or not requested
    assert isinstance(_core.cuda_compiled, bool)


@pytest.mark.skipif(CUDA_READY, reason="a usable GPU is present: this checks the no-GPU errors")
def test_without_a_gpu_everything_imports_and_errors_clearly() -> None:
    assert lc.available() is False
    assert lc.device_count() == 0
    reason = lc.unavailable_reason()
    assert reason
    expected = "driver|device|NVIDIA" if _core.cuda_compiled else "built without CUDA"
    assert _core.cuda_compiled or "built without CUDA" in reason
    with pytest.raises(RuntimeError, match=expected):
        lc.margin_forward_(**_fwd_args())
    with pytest.raises(RuntimeError, match=expected):
        lc.DeviceArray(np.zeros(3, np.float32))
    with pytest.raises(RuntimeError, match=expected):
        lc.backward_workspace_size(8, 3, "float32", True)


# --- lambda schedules on the device: LSoftmaxLinear without host syncs (CUDA graphs, compile) --


def _schedule_closed(kind: str, p: list[float], it: int) -> float:
    """The lambda schedules of lsoftmax/schedules.py, written out independently in float64."""
    if kind == "exponential":
        base, gamma, power, lambda_min, iteration = p
        return max(lambda_min, base * (1.0 + gamma * (iteration + it + 1)) ** (-power))
    if kind == "scaled":
        beta, scale, beta_min = p
        return max(beta_min, beta * scale**it)
    if kind == "onset":
        total, reach, at, warmup, base, lambda_min = p
        if it < warmup * total:
            return base
        frac = (it - warmup * total) / ((at - warmup) * total)
        return max(lambda_min, base * math.exp(frac * math.log(reach / base)))
    if kind == "stepup":
        value, gamma, every, max_value = p
        try:
            grown = value * gamma ** (it // int(every))
        except OverflowError:  # Python floats raise where IEEE gives inf
            grown = math.inf
        return min(max_value, grown)
    assert kind == "constant"
    return p[0]


SCHEDULES: list[Schedule] = [
    Exponential(),
    Exponential(base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0),
    Exponential(base=100.0, gamma=1e-3, power=2.0, iteration=500),
    Scaled(),
    Scaled(beta=1000.0, scale=0.5, beta_min=3.0),
    Constant(2.5),
    StepUp(0.1, 2.0, 3, 1.5),
    Onset(3752, reach=1.0, at=0.3, warmup=0.125),
    Onset(10, reach=5.0, at=0.5, warmup=0.0, base=100.0, lambda_min=2.0),
]
SCHEDULE_STEPS = (0, 1, 2, 3, 7, 100, 12345, 10**6)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_schedule_spec_matches_closed_form_and_schedules(schedule: Schedule) -> None:
    # _core.schedule_value evaluates the ScheduleSpec that the CUDA schedule kernel evaluates
    # (schedule_math.h), on the host: the device formulas checked where no GPU is.
    for it in SCHEDULE_STEPS:
        got = _core.schedule_value(schedule.kind, schedule.params(), it)
        expected = _schedule_closed(schedule.kind, schedule.params(), it)
        assert got == pytest.approx(expected, rel=1e-13, abs=0.0), it
        assert got == schedule.value(it), it  # one home: the same functions as the CPU path
        op = torch.ops.lsoftmax.schedule_lambda(torch.tensor(it), schedule.kind, schedule.params())
        assert op.item() == got


@pytest.mark.parametrize(
    ("kind", "params", "match"),
    [
        ("cosine", [1.0], "unknown schedule kind 'cosine'"),
        ("scaled", [1.0, 0.5], "scaled schedule takes 3 parameters, got 2"),
        ("exponential", [1.0, 1.0, 1.0, 0.0, 0.5], "iteration must be an integer"),
        ("exponential", [1.0, -1.0, 1.0, 0.0, 0.0], "gamma must be a finite number >= 0"),
        ("stepup", [0.1, 2.0, 0.0, 1.0], "step must be >= 1"),
        ("onset", [10.5, 1.0, 0.5, 0.0, 1000.0, 0.0], "total_steps must be an integer"),
        ("onset", [10.0, 1.0, 0.5, 0.6, 1000.0, 0.0], "at must be a fraction"),
        ("constant", [float("nan")], "value must be a finite number >= 0"),
    ],
)
def test_schedule_spec_errors_name_the_parameter(
    kind: str, params: list[float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        _core.schedule_value(kind, params, 0)


def test_torch_cuda_glue_schedule_and_bad_device_lambda(fake_torch_cuda: list, monkeypatch) -> None:
    recorded: list[tuple] = []
    monkeypatch.setattr(_core, "cuda_schedule_value_", lambda *a, **k: recorded.append((a, k)))
    step = torch.tensor(7, dtype=torch.int32)  # converted to the int64 the kernel reads
    out = _kernels.schedule_lambda_cuda(step, "scaled", [100, 0.5, 0])
    (args, kw) = recorded[-1]
    assert args[:2] == ("scaled", [100.0, 0.5, 0.0]) and kw["stream"] == FAKE_STREAM
    assert args[3] == out.data_ptr() and out.dtype == torch.float64 and out.dim() == 0
    with pytest.raises(ValueError, match="step must be a 0-d tensor"):
        _kernels.schedule_lambda_cuda(torch.zeros(2, dtype=torch.int64), "scaled", [1, 1, 0])
    # The forward's flag with the bad-lambda bit set: the sync check names lambda.
    flag = torch.tensor(_core.cuda_flag_bad_lambda, dtype=torch.int32)
    y = torch.tensor([0, 1])
    lam = torch.tensor(-1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"lambda must be >= 0 \(and not NaN\), got -1.0"):
        _kernels._report_labels(flag, y, 3, sync=True, lam=lam)
    # A float lambda goes by value, no device address.
    _kernels._cuda_forward_(torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(3, 2), y, 2, 0.5)
    assert fake_torch_cuda[-1][2]["lam_ptr"] == 0 and fake_torch_cuda[-1][1][5] == 0.5


def test_schedule_lambda_fake_follows_the_step_device() -> None:
    # torch.compile traces with fake tensors: a CUDA step must give a CUDA lambda there too.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        step = torch.zeros((), dtype=torch.int64, device="cuda")
        lam = torch.ops.lsoftmax.schedule_lambda(step, "scaled", Scaled().params())
    assert lam.device.type == "cuda" and lam.dtype == torch.float64 and lam.dim() == 0


@gpu
@needs_torch_cuda
@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_schedule_kernel_matches_cpu(schedule: Schedule) -> None:
    for it in SCHEDULE_STEPS:
        step = torch.tensor(it, device="cuda")
        lam = torch.ops.lsoftmax.schedule_lambda(step, schedule.kind, schedule.params())
        assert lam.device == step.device and lam.dtype == torch.float64 and lam.dim() == 0
        # CUDA's pow is within 2 ulp of the host's: not bitwise, far inside the float64 budget.
        assert lam.item() == pytest.approx(schedule.value(it), rel=1e-14, abs=0.0), it


def _module_pair(schedule: Schedule, dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    cpu = LSoftmaxLinear(8, 5, margin=4, schedule=schedule).to(dtype)
    return cpu, copy.deepcopy(cpu).cuda()


FAST = Exponential(base=100.0, gamma=0.5, power=1.0)  # lambda changes a lot from step to step


@gpu
@needs_torch_cuda
def test_module_on_cuda_matches_cpu_over_steps() -> None:
    cpu, dev = _module_pair(FAST)
    gen = torch.Generator().manual_seed(1)
    for it in range(5):
        x = torch.randn(16, 8, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 5, (16,), generator=gen)
        g = torch.randn(16, 5, generator=gen, dtype=torch.float64)
        out_c = cpu(x, y)
        out_d = dev(x.cuda(), y.cuda())
        out_c.backward(g)
        out_d.backward(g.cuda())
        assert int(dev.step) == int(cpu.step) == it + 1
        assert dev.current_lambda == pytest.approx(cpu.current_lambda, rel=1e-14)
        assert cpu.current_lambda == pytest.approx(
            _schedule_closed("exponential", FAST.params(), it)
        )
        ref = lsoftmax_reference(x, cpu.weight.detach(), y, 4, FAST.value(it))
        assert max_rel_err(out_d.detach().cpu(), ref) <= 1e-10
        assert max_rel_err(out_d.detach().cpu(), out_c.detach()) <= 1e-10
        assert max_rel_err(dev.weight.grad.cpu(), cpu.weight.grad) <= 1e-10


@gpu
@needs_torch_cuda
def test_device_lambda_by_address_matches_float_and_rejects_bad_values() -> None:
    x, w, y = _torch_case(4, torch.float32)
    lam = torch.tensor(LAM, dtype=torch.float64, device="cuda")
    by_value = torch.ops.lsoftmax.linear(x, w, y, 4, LAM)
    by_address = torch.ops.lsoftmax.margin_linear(x, w, y, lam, 4)
    assert torch.equal(by_address, by_value)  # the same float32 lambda, the same kernel
    bad = torch.tensor(-1.0, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match=r"lambda must be >= 0"):
        torch.ops.lsoftmax.margin_linear(x, w, y, bad, 4)
    set_label_check("off")  # no flag: the NaN target logits still show it
    out = torch.ops.lsoftmax.margin_linear(x, w, y, bad, 4)
    assert torch.isnan(out[torch.arange(len(y)), y.long()]).all()


def _module_loss(m: LSoftmaxLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(m(x, y), y)


@gpu
@needs_torch_cuda
def test_module_training_step_has_no_host_sync() -> None:
    _, m = _module_pair(FAST, torch.float32)
    x = torch.randn(32, 8, device="cuda")
    y = torch.randint(0, 5, (32,), device="cuda")
    set_label_check("async")  # the "sync" label check is a host sync by design
    _module_loss(m, x, y).backward()  # warm-up (allocator, workspace sizes)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            _module_loss(m, x, y).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(m.step) == 3


@gpu
@needs_torch_cuda
def test_module_training_step_captured_in_cuda_graph() -> None:
    _, m = _module_pair(FAST)  # float64: tight parity with the reference at every replay
    gen = torch.Generator(device="cuda").manual_seed(0)
    static_x = torch.randn(64, 8, device="cuda", generator=gen, dtype=torch.float64)
    static_y = torch.randint(0, 5, (64,), device="cuda", generator=gen)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture, as torch requires
            m.weight.grad = None
            _module_loss(m, static_x, static_y).backward()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    m.weight.grad = None
    with torch.cuda.graph(graph):
        static_logits = m(static_x, static_y)
        F.cross_entropy(static_logits, static_y).backward()
    assert int(m.step) == 3  # capture records the step's increment, it does not run it

    for replay in range(3):
        graph.replay()
        torch.cuda.synchronize()
        it = 3 + replay
        assert int(m.step) == it + 1  # replay advances the step...
        assert m.current_lambda == pytest.approx(FAST.value(it), rel=1e-14)
        w = m.weight.detach().cpu().requires_grad_(True)
        x, y = static_x.cpu(), static_y.cpu()
        ref = lsoftmax_reference(x, w, y, 4, FAST.value(it))
        (ref_grad,) = torch.autograd.grad(F.cross_entropy(ref, y), w)
        stale = lsoftmax_reference(x, w, y, 4, FAST.value(it - 1)).detach()
        logits = static_logits.detach().cpu()
        assert max_rel_err(logits, ref.detach()) <= 1e-10  # ...and lambda with it
        assert max_rel_err(logits, stale) > 1e-3
        assert max_rel_err(m.weight.grad.cpu(), ref_grad) <= 1e-10


@gpu
@needs_torch_cuda
def test_module_training_step_under_torch_compile_fullgraph() -> None:
    from torch.utils._triton import has_triton

    _, eager = _module_pair(FAST, torch.float32)
    compiled_m = copy.deepcopy(eager)
    backend = "inductor" if has_triton() else "aot_eager"
    step_fn = torch.compile(_module_loss, fullgraph=True, backend=backend)
    gen = torch.Generator(device="cuda").manual_seed(2)
    for it in range(3):
        x = torch.randn(32, 8, device="cuda", generator=gen)
        y = torch.randint(0, 5, (32,), device="cuda", generator=gen)
        eager.weight.grad = compiled_m.weight.grad = None
        loss = _module_loss(eager, x, y)
        loss.backward()
        closs = step_fn(compiled_m, x, y)
        closs.backward()
        assert int(compiled_m.step) == int(eager.step) == it + 1
        assert compiled_m.current_lambda == pytest.approx(FAST.value(it), rel=1e-14)
        assert max_rel_err(closs.detach().cpu(), loss.detach().cpu()) <= 1e-6
        assert max_rel_err(compiled_m.weight.grad.cpu(), eager.weight.grad.cpu()) <= 1e-6

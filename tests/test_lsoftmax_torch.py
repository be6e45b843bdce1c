"""The torch ops, functional form and module against the float64 reference; gradcheck,
torch.compile, torch.export and opcheck.

Parity is ``max_rel_err`` (``max|a - ref| / max|ref|``, see ``reference.py``): <= 1e-10 in
float64 and <= 1e-5 in float32.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TOL
from reference import max_rel_err, reference_with_grads, segment_case
from torch import Tensor, nn

from lsoftmax import core
from lsoftmax.schedules import Constant, Scaled
from lsoftmax.torch import LSoftmaxLinear
from lsoftmax.torch.functional import lsoftmax_logits

MARGINS = range(1, 9)
LAMBDAS = (0.0, 0.5, 1000.0)
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])

Path = Callable[[Tensor, Tensor, Tensor, int, float], Tensor]


def _op(x: Tensor, w: Tensor, y: Tensor, m: int, lam: float) -> Tensor:
    return torch.ops.lsoftmax.linear(x, w, y, m, lam)


def _margin_op(x: Tensor, w: Tensor, y: Tensor, m: int, lam: float) -> Tensor:
    return torch.ops.lsoftmax.margin_linear(x, w, y, torch.tensor(lam, dtype=torch.float64), m)


def _functional(x: Tensor, w: Tensor, y: Tensor, m: int, lam: float) -> Tensor:
    return lsoftmax_logits(x, w, y, m, lam)


def _functional_tensor_lam(x: Tensor, w: Tensor, y: Tensor, m: int, lam: float) -> Tensor:
    return lsoftmax_logits(x, w, y, m, torch.tensor(lam))


PATHS: dict[str, Path] = {
    "op": _op,
    "margin_op": _margin_op,
    "functional": _functional,
    "functional_tensor_lam": _functional_tensor_lam,
}


def _grads(path: Path, x: Tensor, w: Tensor, y: Tensor, m: int, lam: float, g: Tensor):
    xr = x.detach().clone().requires_grad_(True)
    wr = w.detach().clone().requires_grad_(True)
    out = path(xr, wr, y, m, lam)
    gx, gw = torch.autograd.grad(out, (xr, wr), g)
    return out.detach(), gx, gw


def _check_parity(
    path: Path, x: Tensor, w: Tensor, y: Tensor, m: int, lam: float, dtype: torch.dtype
) -> None:
    x, w = x.to(dtype), w.to(dtype)
    gen = torch.Generator().manual_seed(11)
    g = torch.randn(x.shape[0], w.shape[0], generator=gen, dtype=torch.float64).to(dtype)
    ref = reference_with_grads(x, w, y, m, lam, g)
    got = _grads(path, x, w, y, m, lam, g)
    for name, a, r in zip(("logits", "grad_x", "grad_weight"), got, ref, strict=True):
        assert a.dtype == dtype, name
        assert max_rel_err(a, r) <= TOL[dtype], name


def _module_grads(x: Tensor, w: Tensor, y: Tensor, m: int, lam: float, g: Tensor):
    layer = LSoftmaxLinear(w.shape[1], w.shape[0], margin=m, schedule=Constant(lam)).to(w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
    xr = x.detach().clone().requires_grad_(True)
    out = layer(xr, y)
    out.backward(g)
    assert int(layer.step) == 1
    return out.detach(), xr.grad, layer.weight.grad


# --- gradcheck --------------------------------------------------------------------------------


@pytest.mark.parametrize("margin", MARGINS)
def test_gradcheck_every_segment(margin: int) -> None:
    x, w, y, k = segment_case(margin, per_segment=2, num_classes=3, features=4, seed=margin)
    stats = core.margin_forward_(
        (x @ w.T).numpy(), x.numpy(), w.numpy(), y.numpy(), margin, 0.0, return_stats=True
    )
    assert set(stats["segment"].tolist()) == set(range(margin))
    np.testing.assert_array_equal(stats["segment"], k.numpy())
    x.requires_grad_(True)
    w.requires_grad_(True)
    for lam in (0.0, 0.5):
        assert torch.autograd.gradcheck(lambda a, b, lam=lam: _op(a, b, y, margin, lam), (x, w))
        assert torch.autograd.gradcheck(
            lambda a, b, lam=lam: _margin_op(a, b, y, margin, lam), (x, w)
        )
    assert torch.autograd.gradcheck(lambda a, b: _op(a, b, y.int(), margin, 1000.0), (x, w))
    assert torch.autograd.gradcheck(
        lambda a, b: torch.ops.lsoftmax.linear(a, b, None, margin, 0.0), (x, w)
    )


# --- parity with the reference ----------------------------------------------------------------


@DTYPES
@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("margin", MARGINS)
def test_paths_match_reference(margin: int, lam: float, dtype: torch.dtype) -> None:
    x, w, y, _ = segment_case(margin, per_segment=3, seed=100 + margin)
    gen = torch.Generator().manual_seed(12)
    x = torch.cat([x, torch.randn(5, x.shape[1], generator=gen, dtype=torch.float64)])
    y = torch.cat([y, torch.tensor([1, 1, 1, 0, 2])])
    for name, path in PATHS.items():
        try:
            _check_parity(path, x, w, y, margin, lam, dtype)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e
    xd, wd = x.to(dtype), w.to(dtype)
    g = torch.randn(x.shape[0], w.shape[0], generator=gen, dtype=torch.float64).to(dtype)
    ref = reference_with_grads(xd, wd, y, margin, lam, g)
    for name, a, r in zip(
        ("logits", "grad_x", "grad_weight"),
        _module_grads(xd, wd, y, margin, lam, g),
        ref,
        strict=True,
    ):
        assert a.dtype == dtype
        assert max_rel_err(a, r) <= TOL[dtype], f"module {name}"


@DTYPES
@pytest.mark.parametrize("margin", [1, 2, 4, 6])
def test_numpy_api_equals_torch_op(margin: int, dtype: torch.dtype) -> None:
    x, w, y, _ = segment_case(margin, per_segment=4, seed=200 + margin)
    x, w = x.to(dtype), w.to(dtype)
    g = torch.randn(x.shape[0], w.shape[0], dtype=torch.float64).to(dtype)
    got = _grads(_op, x, w, y, margin, 0.5, g)
    np_logits = core.forward(x.numpy(), w.numpy(), y.numpy(), margin=margin, lam=0.5)
    np_gx, np_gw = core.backward(g.numpy(), x.numpy(), w.numpy(), y.numpy(), margin=margin, lam=0.5)
    # The GEMMs come from two libraries (numpy's BLAS and torch's), so equal up to GEMM rounding.
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    for a, b in zip(got, (np_logits, np_gx, np_gw), strict=True):
        assert max_rel_err(a, b) <= tol


def test_plain_logits_without_target_or_in_eval() -> None:
    torch.manual_seed(0)
    layer = LSoftmaxLinear(5, 4, margin=3)
    x = torch.randn(6, 5)
    y = torch.randint(0, 4, (6,))
    plain = x @ layer.weight.detach().T
    torch.testing.assert_close(layer(x), plain, rtol=1e-6, atol=1e-6)
    assert int(layer.step) == 0  # no target: no training step
    margin_out = layer(x, y)
    assert int(layer.step) == 1
    assert not torch.allclose(margin_out, plain)
    layer.eval()
    torch.testing.assert_close(layer(x, y), plain, rtol=1e-6, atol=1e-6)
    assert int(layer.step) == 1
    torch.testing.assert_close(
        torch.ops.lsoftmax.linear(x, layer.weight, None, 3, 0.0), plain, rtol=1e-6, atol=1e-6
    )


# --- edge cases -------------------------------------------------------------------------------


@DTYPES
def test_edge_cases(dtype: torch.dtype) -> None:
    x, w, y, _ = segment_case(4, per_segment=2, seed=300)
    x[1] = 0.0  # zero feature row
    w[2] = 0.0  # zero weight row
    y[3] = 2
    x[4] = 2.0 * w[y[4]]  # theta = 0
    x[5] = -0.5 * w[y[5]]  # theta = pi
    for path in PATHS.values():
        _check_parity(path, x, w, y, 4, 0.0, dtype)
        out, gx, gw = _grads(
            path, x.to(dtype), w.to(dtype), y, 4, 0.0, torch.ones(8, 4, dtype=dtype)
        )
        assert torch.isfinite(out).all() and torch.isfinite(gx).all() and torch.isfinite(gw).all()
        torch.testing.assert_close(out[1], torch.zeros(4, dtype=dtype))
        torch.testing.assert_close(out[3, 2], torch.zeros((), dtype=dtype))
        # Batch of 1, one class, int32 labels.
        _check_parity(path, x[6:7], w, y[6:7].int(), 4, 0.5, dtype)
        _check_parity(path, x, w[:1], torch.zeros(8, dtype=torch.int32), 4, 0.5, dtype)


@DTYPES
def test_non_contiguous_inputs(dtype: torch.dtype) -> None:
    x, w, y, _ = segment_case(5, seed=400)
    x, w = x.to(dtype), w.to(dtype)
    x_v = x.T.contiguous().T
    w_v = torch.zeros(2 * w.shape[0], w.shape[1], dtype=dtype)
    w_v[::2] = w
    w_v = w_v[::2]
    y_v = torch.zeros(2 * len(y), dtype=torch.int64)
    y_v[::2] = y
    y_v = y_v[::2]
    assert not (x_v.is_contiguous() or w_v.is_contiguous() or y_v.is_contiguous())
    g = torch.randn(x.shape[0], w.shape[0], dtype=dtype)
    g_v = torch.randn(w.shape[0], x.shape[0], dtype=dtype).T
    g_v.copy_(g)
    for path in PATHS.values():
        ref = _grads(path, x, w, y, 5, 0.5, g)
        got = _grads(path, x_v, w_v, y_v, 5, 0.5, g_v)
        for a, b in zip(got, ref, strict=True):
            assert max_rel_err(a, b) <= TOL[dtype]


# --- module ------------------------------------------------------------------------------------


def test_module_margin_one_counts_steps() -> None:
    layer = LSoftmaxLinear(3, 2, margin=1, schedule=Scaled(beta=5.0, scale=0.5))
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    torch.testing.assert_close(layer(x, y), x @ layer.weight.detach().T)
    assert int(layer.step) == 1


# --- torch.compile, torch.export, opcheck ------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.head = LSoftmaxLinear(5, 4, margin=3, schedule=Scaled(beta=10.0, scale=0.5))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.head(torch.relu(self.fc(x)), y)


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x, y), y)


def test_compile_fullgraph_matches_eager() -> None:
    torch.manual_seed(0)
    eager = _Net().double()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for _ in range(3):
        x = torch.randn(8, 6, dtype=torch.float64)
        y = torch.randint(0, 4, (8,))
        out_e, out_c = eager(x, y), compiled(x, y)
        torch.testing.assert_close(out_c, out_e, rtol=1e-12, atol=1e-12)
        F.cross_entropy(out_e, y).backward()
        F.cross_entropy(out_c, y).backward()
        for (name, pe), pc in zip(
            eager.named_parameters(), compiled_model.parameters(), strict=True
        ):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-12, atol=1e-12, msg=name)
        assert int(compiled_model.head.step) == int(eager.head.step)
    assert int(eager.head.step) == 3
    compiled_model.eval()
    eager.eval()
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    torch.testing.assert_close(compiled(x, y), eager(x, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_export(train: bool) -> None:
    torch.manual_seed(1)
    model = _Net().train(train)
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    ep = torch.export.export(model, (x, y))
    graph = str(ep.graph)
    assert ("lsoftmax.margin_linear" in graph) == train
    assert "lsoftmax.linear" in graph or train
    exported = ep.module()
    for _ in range(2):
        torch.testing.assert_close(exported(x, y), reference(x, y), rtol=1e-6, atol=1e-6)
    if train:  # the step buffer advances in the exported program too
        assert int(exported.head.step) == int(reference.head.step) == 2


def _opcheck_cases() -> list[tuple[Any, tuple[Any, ...]]]:
    x, w, y, _ = segment_case(3, seed=500)
    x.requires_grad_(True)
    w.requires_grad_(True)
    lam = torch.tensor(0.5, dtype=torch.float64)
    g = torch.randn(x.shape[0], w.shape[0], dtype=torch.float64)
    return [
        (torch.ops.lsoftmax.linear.default, (x, w, y, 3, 0.5)),
        (torch.ops.lsoftmax.linear.default, (x, w, None, 3, 0.0)),
        (torch.ops.lsoftmax.linear.default, (x.float(), w.float(), y.int(), 4, 0.0)),
        (torch.ops.lsoftmax.margin_linear.default, (x, w, y, lam, 3)),
        (torch.ops.lsoftmax.linear_backward.default, (g, x.detach(), w.detach(), y, lam, 3)),
        (
            torch.ops.lsoftmax.schedule_lambda.default,
            (torch.tensor(3), "exponential", [1000.0, 2.5e-5, 35.0, 0.0, 0.0]),
        ),
        (
            torch.ops.lsoftmax.schedule_lambda.default,
            (torch.tensor(3), "scaled", [100.0, 0.99, 0.0]),
        ),
        (torch.ops.lsoftmax.schedule_lambda.default, (torch.tensor(0), "constant", [2.0])),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case: int) -> None:
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# --- bad input --------------------------------------------------------------------------------

_X = torch.randn(4, 3)
_W = torch.randn(5, 3)
_Y = torch.tensor([0, 1, 2, 4])


def _f(**kw: Any) -> Callable[[], Any]:
    a: dict[str, Any] = {"x": _X, "weight": _W, "target": _Y, "margin": 2, "lam": 0.0, **kw}
    return lambda: lsoftmax_logits(a["x"], a["weight"], a["target"], a["margin"], a["lam"])


def _o(**kw: Any) -> Callable[[], Any]:
    a: dict[str, Any] = {"x": _X, "weight": _W, "labels": _Y, "margin": 2, "lam": 0.0, **kw}
    return lambda: torch.ops.lsoftmax.linear(
        a["x"], a["weight"], a["labels"], a["margin"], a["lam"]
    )


def _mo(**kw: Any) -> Callable[[], Any]:
    a: dict[str, Any] = {
        "x": _X,
        "weight": _W,
        "labels": _Y,
        "margin": 2,
        "lam": torch.tensor(0.0, dtype=torch.float64),
        **kw,
    }
    return lambda: torch.ops.lsoftmax.margin_linear(
        a["x"], a["weight"], a["labels"], a["lam"], a["margin"]
    )


def _m(x: Tensor = _X, y: Tensor | None = _Y, **kw: Any) -> Callable[[], Any]:
    def call() -> Tensor:
        layer = LSoftmaxLinear(3, 5, **kw)
        return layer(x, y)

    return call


BAD_INPUTS: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("f labels negative", _f(target=torch.tensor([0, -1, 2, 4])), ValueError, r"labels\[1\]"),
    ("f labels >= C", _f(target=torch.tensor([0, 1, 5, 4])), ValueError, r"labels\[2\] = 5"),
    ("f labels float", _f(target=_Y.float()), TypeError, "target"),
    ("f labels bool", _f(target=_Y.bool()), TypeError, "target"),
    ("f labels length", _f(target=_Y[:3]), ValueError, "target"),
    ("f labels list", _f(target=[0, 1, 2, 4]), TypeError, "target"),
    ("f margin 0", _f(margin=0), ValueError, "margin"),
    ("f margin negative", _f(margin=-1), ValueError, "margin"),
    ("f margin float", _f(margin=2.0), TypeError, "margin"),
    ("f margin bool", _f(margin=True), TypeError, "margin"),
    ("f lam negative", _f(lam=-1.0), ValueError, "lam"),
    ("f lam NaN", _f(lam=math.nan), ValueError, "lam"),
    ("f lam tensor negative", _f(lam=torch.tensor(-1.0)), ValueError, "lambda"),
    ("f lam tensor NaN", _f(lam=torch.tensor(math.nan)), ValueError, "lambda"),
    ("f lam tensor 1-D", _f(lam=torch.tensor([1.0, 2.0])), ValueError, "lam"),
    ("f lam str", _f(lam="big"), TypeError, "lam"),
    ("f features", _f(x=_X[:, :2]), ValueError, "weight has 3"),
    ("f dtype", _f(x=_X.double()), TypeError, "weight is torch.float32"),
    ("f x int", _f(x=_X.long()), TypeError, "x must be float32 or float64"),
    ("f x 1-D", _f(x=_X[0]), ValueError, "x must be 2-D"),
    ("f x 3-D", _f(x=_X[None]), ValueError, "x must be 2-D"),
    ("f weight 3-D", _f(weight=_W[None]), ValueError, "weight must be 2-D"),
    ("f x numpy", _f(x=_X.numpy()), TypeError, "x must be a torch.Tensor"),
    ("op labels negative", _o(labels=torch.tensor([0, -1, 2, 4])), ValueError, "labels"),
    ("op labels >= C", _o(labels=torch.tensor([0, 1, 2, 5])), ValueError, "labels"),
    ("op labels float", _o(labels=_Y.double()), TypeError, "labels"),
    ("op labels bool", _o(labels=_Y.bool()), TypeError, "labels"),
    ("op labels length", _o(labels=_Y[:3]), ValueError, "labels"),
    ("op margin 0", _o(margin=0), ValueError, "margin"),
    ("op margin negative", _o(margin=-2), ValueError, "margin"),
    ("op lam negative", _o(lam=-1.0), ValueError, "lambda"),
    ("op lam NaN", _o(lam=math.nan), ValueError, "lambda"),
    ("op features", _o(x=_X[:, :2]), ValueError, "weight has 3"),
    ("op dtype", _o(x=_X.double()), TypeError, "weight is torch.float32"),
    ("op x 1-D", _o(x=_X[0]), ValueError, "x must be 2-D"),
    ("op x 3-D", _o(x=_X[None]), ValueError, "x must be 2-D"),
    ("margin_op labels >= C", _mo(labels=torch.tensor([0, 1, 2, 5])), ValueError, "labels"),
    ("margin_op margin 0", _mo(margin=0), ValueError, "margin"),
    (
        "margin_op lam negative",
        _mo(lam=torch.tensor(-1.0, dtype=torch.float64)),
        ValueError,
        "lambda",
    ),
    ("margin_op features", _mo(weight=_W[:, :2]), ValueError, "weight has 2"),
    ("module margin 0", _m(margin=0), ValueError, "margin"),
    ("module margin float", _m(margin=2.5), TypeError, "margin"),
    ("module margin bool", _m(margin=True), TypeError, "margin"),
    ("module schedule", _m(schedule=0.5), TypeError, "schedule"),
    ("module labels negative", _m(y=torch.tensor([0, 1, -1, 4])), ValueError, "labels"),
    ("module labels >= C", _m(y=torch.tensor([0, 1, 7, 4])), ValueError, "labels"),
    ("module labels float", _m(y=_Y.float()), TypeError, "target"),
    ("module dtype", _m(x=_X.double()), TypeError, "x is torch.float64"),
    ("module features", _m(x=_X[:, :2]), ValueError, "features"),
    ("module x 3-D, 1-D target", _m(x=_X[None]), ValueError, "target must have shape"),
]


@pytest.mark.parametrize(
    ("call", "exc", "match"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_raises(call: Callable[[], Any], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        call()


def test_lam_accepts_numpy_scalars() -> None:
    # np.float32 is no subclass of float; a lambda read from a numpy array must still work.
    from lsoftmax.torch.functional import lsoftmax_logits

    x = torch.randn(4, 6, dtype=torch.float64)
    w = torch.randn(3, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    want = lsoftmax_logits(x, w, y, 2, 0.5)
    for lam in (np.float32(0.5), np.float64(0.5)):
        torch.testing.assert_close(lsoftmax_logits(x, w, y, 2, lam), want)
    with pytest.raises(TypeError, match="lam"):
        lsoftmax_logits(x, w, y, 2, np.bool_(True))

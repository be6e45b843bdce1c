"""The numpy API (``lsoftmax.core``) and the core primitives against the float64 reference.

Parity is ``max_rel_err`` (``max|a - ref| / max|ref|``, see ``reference.py``): <= 1e-10 in
float64 and <= 1e-5 in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TOL
from reference import (
    angle_rows,
    max_rel_err,
    reference_with_grads,
    segment_case,
)

from lsoftmax import core

MARGINS = range(1, 9)
LAMBDAS = (0.0, 0.5, 1000.0)


def _check_parity(
    x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, margin: int, lam: float, dtype: Any
) -> None:
    """numpy forward/backward in ``dtype`` against the reference on the same (rounded) inputs."""
    xn, wn, yn = x.numpy().astype(dtype), w.numpy().astype(dtype), y.numpy()
    gen = torch.Generator().manual_seed(123)
    grad = torch.randn(x.shape[0], w.shape[0], generator=gen, dtype=torch.float64)
    gn = grad.numpy().astype(dtype)
    ref, ref_gx, ref_gw = reference_with_grads(
        torch.from_numpy(xn), torch.from_numpy(wn), y, margin, lam, torch.from_numpy(gn)
    )
    logits = core.forward(xn, wn, yn, margin=margin, lam=lam)
    gx, gw = core.backward(gn, xn, wn, yn, margin=margin, lam=lam)
    assert logits.dtype == gx.dtype == gw.dtype == np.dtype(dtype)
    tol = TOL[dtype]
    assert max_rel_err(logits, ref) <= tol
    assert max_rel_err(gx, ref_gx) <= tol
    assert max_rel_err(gw, ref_gw) <= tol


def _plain_grads(g: np.ndarray, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return g @ w, g.T @ x


@pytest.fixture
def threads() -> Iterator[Callable[[int], None]]:
    before = core.get_num_threads()
    yield core.set_num_threads
    core.set_num_threads(before)


# --- segments and parity ----------------------------------------------------------------------


@pytest.mark.parametrize("margin", MARGINS)
def test_stats_report_every_segment(margin: int) -> None:
    x, w, y, k = segment_case(margin, per_segment=3)
    xn, wn, yn = x.numpy(), w.numpy(), y.numpy()
    logits = xn @ wn.T
    plain = logits.copy()
    stats = core.margin_forward_(logits, xn, wn, yn, margin, 0.0, return_stats=True)
    assert set(stats["segment"].tolist()) == set(range(margin))
    np.testing.assert_array_equal(stats["segment"], k.numpy())
    nx = np.linalg.norm(xn, axis=1)
    nw = np.linalg.norm(wn[yn], axis=1)
    np.testing.assert_allclose(stats["norm_x"], nx, rtol=1e-14)
    np.testing.assert_allclose(stats["norm_w"], nw, rtol=1e-14)
    np.testing.assert_allclose(
        stats["cos_theta"], plain[np.arange(len(yn)), yn] / (nx * nw), rtol=0, atol=1e-14
    )
    # Only the target logit of each row is rewritten.
    off_target = np.ones_like(logits, dtype=bool)
    off_target[np.arange(len(yn)), yn] = False
    np.testing.assert_array_equal(logits[off_target], plain[off_target])


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("margin", MARGINS)
def test_numpy_api_matches_reference(margin: int, lam: float, dtype: Any) -> None:
    x, w, y, _ = segment_case(margin, per_segment=3, seed=margin)
    # Plus rows at random angles, several of them sharing a class.
    gen = torch.Generator().manual_seed(7)
    x = torch.cat([x, torch.randn(6, x.shape[1], generator=gen, dtype=torch.float64)])
    y = torch.cat([y, torch.tensor([0, 0, 1, 1, 1, 3])])
    _check_parity(x, w, y, margin, lam, dtype)


def test_forward_without_labels_is_plain_matmul() -> None:
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    np.testing.assert_array_equal(core.forward(x, w, margin=4), x @ w.T)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_margin_one_and_infinite_lambda_are_plain(dtype: Any) -> None:
    x, w, y, _ = segment_case(4)
    xn, wn, yn = x.numpy().astype(dtype), w.numpy().astype(dtype), y.numpy()
    g = np.random.default_rng(1).standard_normal((len(yn), wn.shape[0])).astype(dtype)
    plain_gx, plain_gw = _plain_grads(g, xn, wn)
    for margin, lam in ((1, 0.0), (1, 3.0), (4, math.inf), (4, 1e300)):
        logits = core.forward(xn, wn, yn, margin=margin, lam=lam)
        gx, gw = core.backward(g, xn, wn, yn, margin=margin, lam=lam)
        assert max_rel_err(logits, xn @ wn.T) <= TOL[dtype], (margin, lam)
        assert max_rel_err(gx, plain_gx) <= TOL[dtype], (margin, lam)
        assert max_rel_err(gw, plain_gw) <= TOL[dtype], (margin, lam)


def test_primitives_work_in_place() -> None:
    x, w, y, _ = segment_case(3)
    xn, wn, yn = x.numpy(), w.numpy(), y.numpy()
    g = np.random.default_rng(2).standard_normal((len(yn), wn.shape[0]))
    logits = xn @ wn.T
    assert core.margin_forward_(logits, xn, wn, yn, 3, 0.5) is None
    np.testing.assert_array_equal(logits, core.forward(xn, wn, yn, margin=3, lam=0.5))
    # margin_backward_ adds the margin terms to whatever grad_x / grad_weight hold.
    gx0, gw0 = _plain_grads(g, xn, wn)
    gx, gw = gx0 + 10.0, gw0 - 5.0
    core.margin_backward_(g, xn, wn, yn, gx, gw, 3, 0.5)
    ref_gx, ref_gw = core.backward(g, xn, wn, yn, margin=3, lam=0.5)
    np.testing.assert_allclose(gx - 10.0, ref_gx, rtol=0, atol=1e-12)
    np.testing.assert_allclose(gw + 5.0, ref_gw, rtol=0, atol=1e-12)


# --- edge cases -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_zero_rows_get_no_margin(dtype: Any) -> None:
    x, w, y, _ = segment_case(4, per_segment=2)
    x[1] = 0.0  # zero feature row
    w[2] = 0.0  # zero weight row
    y[3] = 2
    y[5] = 2
    xn, wn, yn = x.numpy().astype(dtype), w.numpy().astype(dtype), y.numpy()
    logits = xn @ wn.T
    plain = logits.copy()
    stats = core.margin_forward_(logits, xn, wn, yn, 4, 0.0, return_stats=True)
    degenerate = (yn == 2) | (np.arange(len(yn)) == 1)
    assert (stats["segment"][degenerate] == -1).all()
    assert (stats["segment"][~degenerate] >= 0).all()
    np.testing.assert_array_equal(logits[degenerate], plain[degenerate])
    g = np.random.default_rng(3).standard_normal(logits.shape).astype(dtype)
    gx, gw = core.backward(g, xn, wn, yn, margin=4, lam=0.0)
    assert np.isfinite(logits).all() and np.isfinite(gx).all() and np.isfinite(gw).all()
    plain_gx, plain_gw = _plain_grads(g, xn, wn)
    np.testing.assert_allclose(gx[1], plain_gx[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw[2], plain_gw[2], rtol=1e-5, atol=1e-6)
    _check_parity(x, w, y, 4, 0.0, dtype)


@pytest.mark.parametrize("margin", [2, 3, 4, 7])
def test_special_angles(margin: int) -> None:
    """theta = 0, theta = pi and theta exactly on every boundary k pi/m."""
    gen = torch.Generator().manual_seed(margin)
    w = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    thetas = torch.tensor([j * math.pi / margin for j in range(1, margin)], dtype=torch.float64)
    y = torch.arange(len(thetas)) % 3
    boundary = angle_rows(w, y, thetas, torch.full((len(thetas),), 1.5))
    exact = torch.stack([2.0 * w[0], -0.5 * w[1], 3.0 * w[2]])  # theta = 0, pi, 0
    x = torch.cat([boundary, exact])
    y = torch.cat([y, torch.tensor([0, 1, 2])])
    stats = core.margin_forward_(
        x.numpy() @ w.numpy().T, x.numpy(), w.numpy(), y.numpy(), margin, 0.0, return_stats=True
    )
    assert stats["segment"][-3:].tolist() == [0, margin - 1, 0]
    for dtype in (np.float64, np.float32):
        for lam in LAMBDAS:
            _check_parity(x, w, y, margin, lam, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_batch_of_one_and_one_class(dtype: Any) -> None:
    x, w, y, _ = segment_case(3, per_segment=1, num_classes=1)
    _check_parity(x[:1], w, y[:1], 3, 0.0, dtype)
    _check_parity(x, w, y, 3, 0.5, dtype)
    x, w, y, _ = segment_case(5, per_segment=1, num_classes=6)
    _check_parity(x[2:3], w, y[2:3], 5, 0.0, dtype)


def test_int32_and_int64_labels_agree() -> None:
    x, w, y, _ = segment_case(4)
    xn, wn = x.numpy(), w.numpy()
    g = np.random.default_rng(4).standard_normal((len(y), wn.shape[0]))
    out = {}
    for ldt in (np.int32, np.int64):
        yn = y.numpy().astype(ldt)
        out[ldt] = (
            core.forward(xn, wn, yn, margin=4),
            *core.backward(g, xn, wn, yn, margin=4, lam=0.0),
        )
    for a, b in zip(out[np.int32], out[np.int64], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_non_contiguous_inputs(dtype: Any) -> None:
    x, w, y, _ = segment_case(5)
    xn, wn, yn = x.numpy().astype(dtype), w.numpy().astype(dtype), y.numpy()
    n, c = len(yn), wn.shape[0]
    g = np.random.default_rng(5).standard_normal((n, c)).astype(dtype)
    # Views: x as a transpose, weight as every other row of a bigger array, labels strided,
    # grad_logits as a column slice.
    x_v = np.ascontiguousarray(xn.T).T
    w_big = np.zeros((2 * c, wn.shape[1]), dtype=dtype)
    w_big[::2] = wn
    w_v = w_big[::2]
    y_big = np.zeros(2 * n, dtype=np.int64)
    y_big[::2] = yn
    y_v = y_big[::2]
    g_big = np.zeros((n, 2 * c), dtype=dtype)
    g_big[:, 1::2] = g
    g_v = g_big[:, 1::2]
    assert not (x_v.flags.c_contiguous or w_v.flags.c_contiguous or y_v.flags.c_contiguous)
    assert not g_v.flags.c_contiguous
    tol = TOL[dtype]
    ref = core.forward(xn, wn, yn, margin=5, lam=0.5)
    assert max_rel_err(core.forward(x_v, w_v, y_v, margin=5, lam=0.5), ref) <= tol
    ref_g = core.backward(g, xn, wn, yn, margin=5, lam=0.5)
    got_g = core.backward(g_v, x_v, w_v, y_v, margin=5, lam=0.5)
    for a, b in zip(got_g, ref_g, strict=True):
        assert max_rel_err(a, b) <= tol
    # The primitives write into strided outputs in place: same values, bit for bit.
    logits = xn @ wn.T
    logits_v = np.zeros((c, n), dtype=dtype).T
    logits_v[...] = logits
    core.margin_forward_(logits, xn, wn, yn, 5, 0.5)
    core.margin_forward_(logits_v, x_v, w_v, y_v, 5, 0.5)
    np.testing.assert_array_equal(logits_v, logits)
    gx, gw = _plain_grads(g, xn, wn)
    gx_v, gw_v = np.zeros(gx.T.shape, dtype=dtype).T, np.zeros(gw.T.shape, dtype=dtype).T
    gx_v[...], gw_v[...] = gx, gw
    core.margin_backward_(g, xn, wn, yn, gx, gw, 5, 0.5)
    core.margin_backward_(g_v, x_v, w_v, y_v, gx_v, gw_v, 5, 0.5)
    np.testing.assert_array_equal(gx_v, gx)
    np.testing.assert_array_equal(gw_v, gw)


def test_empty_batch() -> None:
    w = np.ones((3, 2))
    x = np.zeros((0, 2))
    y = np.zeros(0, dtype=np.int64)
    assert core.forward(x, w, y, margin=2).shape == (0, 3)
    gx, gw = core.backward(np.zeros((0, 3)), x, w, y, margin=2, lam=0.0)
    assert gx.shape == (0, 2)
    np.testing.assert_array_equal(gw, np.zeros((3, 2)))


# --- bad input --------------------------------------------------------------------------------

_RNG = np.random.default_rng(0)
X = _RNG.standard_normal((4, 3))
W = _RNG.standard_normal((5, 3))
Y = np.array([0, 1, 2, 4])
G = np.ones((4, 5))


def _fwd(**kw: Any) -> Callable[[], Any]:
    args: dict[str, Any] = {"x": X, "weight": W, "labels": Y, "margin": 2, "lam": 0.0, **kw}
    return lambda: core.forward(
        args["x"], args["weight"], args["labels"], margin=args["margin"], lam=args["lam"]
    )


def _bwd(**kw: Any) -> Callable[[], Any]:
    args: dict[str, Any] = {
        "grad_logits": G,
        "x": X,
        "weight": W,
        "labels": Y,
        "margin": 2,
        "lam": 0.0,
        **kw,
    }
    return lambda: core.backward(
        args["grad_logits"],
        args["x"],
        args["weight"],
        args["labels"],
        margin=args["margin"],
        lam=args["lam"],
    )


def _prim_fwd(**kw: Any) -> Callable[[], Any]:
    args: dict[str, Any] = {
        "logits": X @ W.T,
        "x": X,
        "weight": W,
        "labels": Y,
        "margin": 2,
        "lam": 0.0,
        **kw,
    }
    return lambda: core.margin_forward_(
        args["logits"], args["x"], args["weight"], args["labels"], args["margin"], args["lam"]
    )


def _prim_bwd(**kw: Any) -> Callable[[], Any]:
    args: dict[str, Any] = {
        "grad_logits": G,
        "x": X,
        "weight": W,
        "labels": Y,
        "grad_x": np.zeros((4, 3)),
        "grad_weight": np.zeros((5, 3)),
        "margin": 2,
        "lam": 0.0,
        **kw,
    }
    return lambda: core.margin_backward_(
        args["grad_logits"],
        args["x"],
        args["weight"],
        args["labels"],
        args["grad_x"],
        args["grad_weight"],
        args["margin"],
        args["lam"],
    )


BAD_INPUTS: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("labels negative", _fwd(labels=np.array([0, -1, 2, 4])), ValueError, r"labels\[1\] = -1"),
    ("labels >= C", _fwd(labels=np.array([0, 1, 5, 4])), ValueError, r"labels\[2\] = 5"),
    ("labels float", _fwd(labels=Y.astype(np.float64)), TypeError, "labels"),
    ("labels bool", _fwd(labels=Y.astype(bool)), TypeError, "labels"),
    ("labels 2-D", _fwd(labels=Y[:, None]), ValueError, "labels"),
    ("labels length", _fwd(labels=Y[:3]), ValueError, "labels"),
    ("margin 0", _fwd(margin=0), ValueError, "margin"),
    ("margin negative", _fwd(margin=-3), ValueError, "margin"),
    ("margin huge", _fwd(margin=2**70), ValueError, "margin"),
    ("margin float", _fwd(margin=2.0), TypeError, "margin"),
    ("margin bool", _fwd(margin=True), TypeError, "margin"),
    ("lam negative", _fwd(lam=-0.5), ValueError, "lambda"),
    ("lam NaN", _fwd(lam=math.nan), ValueError, "lambda"),
    ("features mismatch", _fwd(x=X[:, :2]), ValueError, "weight has 3"),
    ("dtype mismatch", _fwd(x=X.astype(np.float32)), TypeError, "weight is float64"),
    ("x int", _fwd(x=X.astype(np.int64)), TypeError, "x must be float32 or float64"),
    ("x 1-D", _fwd(x=X[0]), ValueError, "x must be 2-D"),
    ("x 3-D", _fwd(x=X[None]), ValueError, "x must be 2-D"),
    ("weight 1-D", _fwd(weight=W[0]), ValueError, "weight must be 2-D"),
    ("x list", _fwd(x=X.tolist()), TypeError, "x must be a numpy array"),
    ("weight list", _fwd(weight=W.tolist()), TypeError, "weight must be a numpy array"),
    ("no classes", _fwd(weight=W[:0]), ValueError, "weight"),
    ("bwd labels negative", _bwd(labels=np.array([0, 1, -2, 4])), ValueError, "labels"),
    ("bwd labels float", _bwd(labels=Y.astype(np.float32)), TypeError, "labels"),
    ("bwd labels length", _bwd(labels=Y[:3]), ValueError, "labels"),
    ("bwd margin 0", _bwd(margin=0), ValueError, "margin"),
    ("bwd margin float", _bwd(margin=1.5), TypeError, "margin"),
    ("bwd lam NaN", _bwd(lam=math.nan), ValueError, "lambda"),
    ("bwd grad shape", _bwd(grad_logits=G[:, :4]), ValueError, "grad_logits"),
    ("bwd grad dtype", _bwd(grad_logits=G.astype(np.float32)), TypeError, "grad_logits"),
    ("bwd grad list", _bwd(grad_logits=G.tolist()), TypeError, "grad_logits"),
    ("bwd weight 3-D", _bwd(weight=W[None]), ValueError, "weight"),
    ("prim logits shape", _prim_fwd(logits=np.zeros((4, 4))), ValueError, "logits"),
    ("prim logits dtype", _prim_fwd(logits=np.zeros((4, 5), np.float32)), TypeError, "logits"),
    (
        "prim logits read-only",
        _prim_fwd(logits=np.broadcast_to(np.zeros(5), (4, 5))),
        ValueError,
        "logits must be writeable",
    ),
    ("prim logits int", _prim_fwd(logits=np.zeros((4, 5), np.int64)), TypeError, "logits"),
    ("prim x dtype", _prim_fwd(x=X.astype(np.float32)), TypeError, "x has dtype"),
    ("prim labels float", _prim_fwd(labels=Y.astype(np.float64)), TypeError, "labels"),
    ("prim labels range", _prim_fwd(labels=np.array([9, 0, 0, 0])), ValueError, "labels"),
    ("prim margin bool", _prim_fwd(margin=False), TypeError, "margin"),
    ("prim grad_x shape", _prim_bwd(grad_x=np.zeros((4, 2))), ValueError, "grad_x"),
    ("prim grad_weight shape", _prim_bwd(grad_weight=np.zeros((4, 3))), ValueError, "grad_weight"),
    (
        "prim grad_weight dtype",
        _prim_bwd(grad_weight=np.zeros((5, 3), np.float32)),
        TypeError,
        "grad_weight",
    ),
    (
        "prim grad_x read-only",
        _prim_bwd(grad_x=np.broadcast_to(np.zeros(3), (4, 3))),
        ValueError,
        "grad_x",
    ),
    ("prim bwd lam negative", _prim_bwd(lam=-1.0), ValueError, "lambda"),
]


@pytest.mark.parametrize(
    ("call", "exc", "match"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_raises(call: Callable[[], Any], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        call()


def test_bad_labels_leave_logits_untouched() -> None:
    logits = X @ W.T
    before = logits.copy()
    with pytest.raises(ValueError, match="labels"):
        core.margin_forward_(logits, X, W, np.array([0, 1, 2, 7]), 2, 0.0)
    np.testing.assert_array_equal(logits, before)


# --- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_deterministic_across_threads_and_calls(dtype: Any, threads: Callable[[int], None]) -> None:
    """Many rows share each class (N=4096, C=3), so the per-row loops run on several threads."""
    rng = np.random.default_rng(6)
    n, c, d = 4096, 3, 64
    x = rng.standard_normal((n, d)).astype(dtype)
    w = rng.standard_normal((c, d)).astype(dtype)
    y = rng.integers(0, c, n)
    g = rng.standard_normal((n, c)).astype(dtype)
    logits0 = x @ w.T
    gx0, gw0 = _plain_grads(g, x, w)

    def run() -> tuple[np.ndarray, ...]:
        logits, gx, gw = logits0.copy(), gx0.copy(), gw0.copy()
        core.margin_forward_(logits, x, w, y, 4, 0.5)
        core.margin_backward_(g, x, w, y, gx, gw, 4, 0.5)
        return logits, gx, gw

    results = []
    for n_threads in (1, 2, 1, 2):
        threads(n_threads)
        assert core.get_num_threads() == n_threads
        results.append(run())
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
    threads(2)
    api = [core.forward(x, w, y, margin=4, lam=0.5) for _ in range(2)]
    np.testing.assert_array_equal(api[0], api[1])

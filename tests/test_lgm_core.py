"""The L-GM core through its numpy API (``lsoftmax.lgm_core``) against an independent float64
reference: parity, cancellation far from the origin, thread-count independence, bad input.

Parity is ``max_rel_err`` (``max|a - ref| / max|ref|``): <= 1e-10 in float64, <= 1e-5 in float32.
Other L-GM test files import ``lgm_reference`` and ``lgm_reference_grads`` from here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TOL
from reference import max_rel_err
from torch import Tensor

from lsoftmax import _core, lgm_core
from lsoftmax.schedules import StepUp, schedule_from_dict

DTYPES = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
KINDS = pytest.mark.parametrize("isotropic", [False, True], ids=["diag", "iso"])


def lgm_reference(
    x: Tensor,
    means: Tensor,
    log_var: Tensor,
    labels: Tensor | None,
    alpha: float,
    include_logdet: bool,
) -> tuple[Tensor, Tensor]:
    """``(logits, loglik)`` in float64 from direct differences ``x_i - mu_k`` (an N x C x D
    tensor: fine at test sizes), differentiable in all three float inputs."""
    x, means, log_var = (t.to(torch.float64) for t in (x, means, log_var))
    n, d = x.shape
    diff = x[:, None, :] - means[None, :, :]
    var = torch.exp(log_var)  # (C, D) or (C, 1): broadcasts either way
    dist = 0.5 * (diff * diff / var[None]).sum(dim=2)
    half_logdet = 0.5 * log_var.sum(dim=1) * (d if log_var.shape[1] == 1 and d > 1 else 1)
    scale = torch.ones_like(dist)
    if labels is not None:
        scale[torch.arange(n), labels.long()] += alpha
    logits = -scale * dist - (half_logdet if include_logdet else 0.0)
    cls = (-dist - half_logdet).argmax(dim=1) if labels is None else labels.long()
    loglik = -(dist[torch.arange(n), cls] + half_logdet[cls])
    return logits, loglik


def lgm_reference_grads(
    x: Tensor,
    means: Tensor,
    log_var: Tensor,
    labels: Tensor | None,
    alpha: float,
    include_logdet: bool,
    grad_logits: Tensor,
    grad_loglik: Tensor,
) -> tuple[Tensor, ...]:
    """``(logits, loglik, grad_x, grad_means, grad_log_var)``, the gradients by autograd."""
    leaves = [t.detach().to(torch.float64).requires_grad_(True) for t in (x, means, log_var)]
    logits, loglik = lgm_reference(*leaves, labels, alpha, include_logdet)
    grads = torch.autograd.grad(
        (logits, loglik), leaves, (grad_logits.double(), grad_loglik.double())
    )
    return (logits.detach(), loglik.detach(), *grads)


def make_case(
    n: int = 12,
    c: int = 5,
    d: int = 6,
    *,
    isotropic: bool = False,
    seed: int = 0,
    center: float = 0.0,
    spread: float = 1.0,
) -> tuple[np.ndarray, ...]:
    """Float64 ``(x, means, log_var, labels)``: x drawn around the means of their labels."""
    rng = np.random.default_rng(seed)
    means = center + spread * rng.standard_normal((c, d))
    log_var = 0.4 * rng.standard_normal((c, 1 if isotropic else d))
    labels = rng.integers(0, c, n)
    x = means[labels] + np.exp(0.5 * log_var[labels]) * rng.standard_normal((n, d))
    return x, means, log_var, labels


def _check_parity(x, means, log_var, labels, alpha, logdet, dtype, seed=1):
    xs, ms, lvs = (a.astype(dtype) for a in (x, means, log_var))
    logits, loglik = lgm_core.lgm_forward(xs, ms, lvs, labels, alpha=alpha, include_logdet=logdet)
    rng = np.random.default_rng(seed)
    gz = rng.standard_normal(logits.shape)
    gl = rng.standard_normal(loglik.shape)
    grads = lgm_core.lgm_backward(
        gz.astype(dtype),
        gl.astype(dtype),
        logits,
        xs,
        ms,
        lvs,
        labels,
        alpha=alpha,
        include_logdet=logdet,
    )
    t = torch.from_numpy
    ref = lgm_reference_grads(
        t(xs),
        t(ms),
        t(lvs),
        None if labels is None else t(labels),
        alpha,
        logdet,
        t(gz),
        t(gl),
    )
    tol = TOL[np.dtype(dtype)]
    for name, got, want in zip(
        ("logits", "loglik", "grad_x", "grad_means", "grad_log_var"),
        (logits, loglik, *grads),
        ref,
        strict=True,
    ):
        assert got.dtype == np.dtype(dtype), name
        err = max_rel_err(got, want)
        assert err <= tol, f"{name}: max rel err {err:.3g} > {tol:g}"


@DTYPES
@KINDS
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "nolabels"])
@pytest.mark.parametrize("logdet", [True, False], ids=["logdet", "nologdet"])
def test_parity_with_reference(dtype, isotropic, with_labels, logdet) -> None:
    x, means, log_var, labels = make_case(isotropic=isotropic)
    _check_parity(x, means, log_var, labels if with_labels else None, 0.75, logdet, dtype)


@DTYPES
@KINDS
@pytest.mark.parametrize("center", [1e2, 1e4], ids=["c1e2", "c1e4"])
def test_parity_far_from_origin(dtype, isotropic, center) -> None:
    """Features and means far from the origin: the naive expansion |x|^2 - 2 x.mu + |mu|^2
    would lose everything in float32 (|x|^2 ~ 1e8 |x - mu|^2 at c = 1e4)."""
    x, means, log_var, labels = make_case(
        n=40, c=6, d=8, isotropic=isotropic, center=center, spread=3.0, seed=3
    )
    _check_parity(x, means, log_var, labels, 1.0, True, dtype)


def test_direct_fallback_fires_only_where_needed() -> None:
    """Tight clusters (sigma 1e-3 around means 1 apart): the expansion's cancellation for a
    sample's own class is ~1e6, so the core recomputes those entries and no others."""
    rng = np.random.default_rng(5)
    c, d, n = 4, 5, 64
    means = rng.standard_normal((c, d)).astype(np.float32)
    labels = rng.integers(0, c, n)
    x = (means[labels] + 1e-3 * rng.standard_normal((n, d))).astype(np.float32)
    log_var = np.full((c, d), math.log(1e-6), dtype=np.float32)
    offset, precision, scaled = _core.lgm_prepare(means, log_var)
    xc = x - offset
    logits = xc @ scaled.T
    loglik = np.empty(n, dtype=np.float32)
    n_direct = _core.lgm_forward_(
        logits, loglik, x, means, log_var, offset, np.square(xc) @ precision.T, labels, 0.0, True
    )
    assert n_direct == n
    ref, ref_ll = lgm_reference(
        torch.from_numpy(x),
        torch.from_numpy(means),
        torch.from_numpy(log_var),
        torch.from_numpy(labels),
        0.0,
        True,
    )
    rows = np.arange(n)
    # The own-class distances (~1e0 against cross terms ~1e6) are still right to float32 accuracy.
    own = -(logits[rows, labels].astype(np.float64) + 0.5 * log_var.sum(1)[labels])
    own_ref = -(ref[rows, labels] + 0.5 * torch.from_numpy(log_var).double().sum(1)[labels])
    np.testing.assert_allclose(own, own_ref.numpy(), rtol=1e-4)
    assert max_rel_err(loglik, ref_ll) <= 1e-5


@DTYPES
@KINDS
def test_results_do_not_depend_on_thread_count(dtype, isotropic) -> None:
    x, means, log_var, labels = make_case(n=3000, c=12, d=16, isotropic=isotropic, seed=7)
    xs, ms, lvs = (a.astype(dtype) for a in (x, means, log_var))
    gz = np.random.default_rng(0).standard_normal((3000, 12)).astype(dtype)
    gl = np.ones(3000, dtype=dtype)
    outs = []
    before = _core.get_num_threads()
    try:
        for threads in (1, 2, 3):
            _core.set_num_threads(threads)
            z, ll = lgm_core.lgm_forward(xs, ms, lvs, labels, alpha=1.0)
            outs.append((z, ll, *lgm_core.lgm_backward(gz, gl, z, xs, ms, lvs, labels, alpha=1.0)))
    finally:
        _core.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def test_variances_give_the_same_result_as_log_var() -> None:
    x, means, log_var, labels = make_case()
    a = lgm_core.lgm_forward(x, means, log_var, labels, alpha=0.5)
    b = lgm_core.lgm_forward(x, means, labels=labels, alpha=0.5, variances=np.exp(log_var))
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-13, atol=1e-13)


def test_no_labels_loglik_is_that_of_the_predicted_class() -> None:
    x, means, log_var, _ = make_case(n=30, seed=11)
    logits, loglik = lgm_core.lgm_forward(x, means, log_var, include_logdet=True)
    np.testing.assert_array_equal(loglik, logits.max(axis=1))
    pred = logits.argmax(axis=1)
    _, with_pred = lgm_core.lgm_forward(x, means, log_var, pred, alpha=0.0)
    np.testing.assert_allclose(loglik, with_pred, rtol=1e-13)


# --- bad input -----------------------------------------------------------------------------------


def _args():
    x, means, log_var, labels = make_case()
    return x, means, log_var, labels


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_non_positive_variance_is_rejected(bad) -> None:
    x, means, log_var, labels = _args()
    v = np.exp(log_var)
    v[1, 2] = bad
    with pytest.raises(ValueError, match="variances"):
        lgm_core.lgm_forward(x, means, labels=labels, variances=v)


def test_non_finite_log_var_is_rejected() -> None:
    x, means, log_var, labels = _args()
    log_var[0, 0] = np.nan
    with pytest.raises(ValueError, match="log_var"):
        lgm_core.lgm_forward(x, means, log_var, labels)


@pytest.mark.parametrize("alpha", [-0.5, np.nan, np.inf])
def test_bad_alpha_is_rejected(alpha) -> None:
    x, means, log_var, labels = _args()
    with pytest.raises(ValueError, match="alpha"):
        lgm_core.lgm_forward(x, means, log_var, labels, alpha=alpha)


@pytest.mark.parametrize("value", [-1, 5, 99])
def test_label_out_of_range_is_rejected(value) -> None:
    x, means, log_var, labels = _args()
    labels[3] = value
    with pytest.raises(ValueError, match=r"labels\[3\]"):
        lgm_core.lgm_forward(x, means, log_var, labels)
    with pytest.raises(ValueError, match=r"labels\[3\]"):
        lgm_core.lgm_backward(np.ones((12, 5)), None, np.zeros((12, 5)), x, means, log_var, labels)


def test_float_labels_are_rejected() -> None:
    x, means, log_var, labels = _args()
    with pytest.raises(TypeError, match="labels"):
        lgm_core.lgm_forward(x, means, log_var, labels.astype(np.float64))


@pytest.mark.parametrize(
    ("which", "shape", "match"),
    [
        ("x", (12, 7), "features"),
        ("log_var", (5, 3), "log_var"),
        ("log_var", (4, 6), "log_var"),
        ("labels", (11,), "labels"),
    ],
)
def test_shape_mismatch_is_rejected(which, shape, match) -> None:
    args = dict(zip(("x", "means", "log_var", "labels"), _args(), strict=True))
    rng = np.random.default_rng(0)
    args[which] = rng.integers(0, 5, shape) if which == "labels" else rng.standard_normal(shape)
    with pytest.raises(ValueError, match=match):
        lgm_core.lgm_forward(args["x"], args["means"], args["log_var"], args["labels"])


def test_dtype_mismatch_is_rejected() -> None:
    x, means, log_var, labels = _args()
    with pytest.raises(TypeError, match="means"):
        lgm_core.lgm_forward(x, means.astype(np.float32), log_var, labels)
    with pytest.raises(TypeError, match="x"):
        lgm_core.lgm_forward(x.astype(np.int64), means, log_var, labels)


def test_lambda_validation() -> None:
    _core.validate_lgm_lambda(0.0)
    for bad in (-1e-3, math.nan):
        with pytest.raises(ValueError, match="lambda_lkd"):
            _core.validate_lgm_lambda(bad)


# --- the step-up schedule ---------------------------------------------------------------------


def test_stepup_schedule_matches_its_formula() -> None:
    s = StepUp(0.1, 2.0, 100, 1.5)
    for it in (0, 1, 99, 100, 250, 399, 400, 10_000):
        assert s.value(it) == pytest.approx(min(1.5, 0.1 * 2.0 ** (it // 100)), rel=1e-15)
    assert schedule_from_dict(s.to_dict()) == s
    assert s.params() == [0.1, 2.0, 100.0, 1.5]


@pytest.mark.parametrize(
    ("kwargs", "err"),
    [
        ({"value": -1.0}, ValueError),
        ({"gamma": -2.0}, ValueError),
        ({"step": 0}, ValueError),
        ({"max_value": math.nan}, ValueError),
        ({"step": 1.5}, TypeError),
    ],
)
def test_stepup_bad_parameters(kwargs, err) -> None:
    base = {"value": 0.1, "gamma": 2.0, "step": 10, "max_value": 1.0}
    name = next(iter(kwargs))
    with pytest.raises(err, match=name):
        StepUp(**{**base, **kwargs})


@KINDS
def test_backward_with_training_gradients_and_separated_classes(isotropic) -> None:
    """Classes 100 sigma apart and the gradients of a real loss (softmax - onehot, plus the
    likelihood term): almost all weight sits on each sample's own class, where a GEMM
    expansion of sum_i W_ik (x_i - mu_k)^2 cancels by ~1e4. The core sums those own-class
    terms from direct differences, so float32 stays within 1e-5."""
    x, means, log_var, labels = make_case(
        n=256, c=8, d=16, isotropic=isotropic, center=50.0, spread=100.0, seed=9
    )
    xs, ms, lvs = (a.astype(np.float32) for a in (x, means, log_var))
    t = torch.from_numpy
    z_ref, _ = lgm_reference(t(xs), t(ms), t(lvs), t(labels), 0.0, True)
    gz = torch.softmax(z_ref, dim=1).numpy()
    gz[np.arange(256), labels] -= 1.0
    gz /= 256
    gl = np.full(256, -0.1 / 256)
    z, _ = lgm_core.lgm_forward(xs, ms, lvs, labels)
    grads = lgm_core.lgm_backward(
        gz.astype(np.float32), gl.astype(np.float32), z, xs, ms, lvs, labels
    )
    ref = lgm_reference_grads(t(xs), t(ms), t(lvs), t(labels), 0.0, True, t(gz), t(gl))
    for name, got, want in zip(
        ("grad_x", "grad_means", "grad_log_var"), grads, ref[2:], strict=True
    ):
        err = max_rel_err(got, want)
        assert err <= 1e-5, f"{name}: {err:.3g}"

"""The core's Python entry points against the defects found by trying to break them: NaN
propagates through L-GM (never "distance 0"), C = 0 is rejected, forged stats cannot index the
math out of range, scalars are checked by type with messages naming the argument, margins are
checked where they are given, and float64 L-GM keeps float64 precision (docs/reliability.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_lgm_core import lgm_reference

from lsoftmax import _core, core, lgm_core
from lsoftmax.torch import LGMLoss, LSoftmaxLinear
from lsoftmax.torch.functional import lsoftmax_logits

RNG = np.random.default_rng(0)


def test_lgm_backward_coeffs_rejects_zero_classes() -> None:
    """ASan found coeff(i, 0) read and written on an (N, 0) array."""
    with pytest.raises(ValueError, match="grad_logits must have >= 1 class"):
        _core.lgm_backward_coeffs(
            np.ones((8, 0)), None, np.ones((8, 0)), np.zeros((0, 4)), 4, None, 0.0, True
        )


@pytest.mark.parametrize("labels", [None, np.array([0, 1])], ids=["nolabels", "labels"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lgm_nan_feature_gives_nan_not_best_score(labels, dtype) -> None:
    x = np.array([[np.nan, 0.0], [5.0, 5.0]], dtype)
    means = np.array([[0.0, 0.0], [1.0, 1.0]], dtype)
    logits, loglik = lgm_core.lgm_forward(x, means, np.zeros((2, 2), dtype), labels, alpha=0.5)
    assert np.isnan(logits[0]).all() and np.isnan(loglik[0])
    assert np.isfinite(logits[1]).all() and np.isfinite(loglik[1])  # other rows unaffected
    ref = lgm_reference(
        torch.from_numpy(x[1:]),
        torch.from_numpy(means),
        torch.zeros(2, 2),
        None if labels is None else torch.from_numpy(labels[1:]),
        0.5,
        True,
    )
    np.testing.assert_allclose(logits[1:], ref[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(loglik[1:], ref[1].numpy(), rtol=1e-6)


def test_lgm_inf_feature_is_infinitely_unlikely() -> None:
    x = np.array([[np.inf, 0.0]])
    logits, loglik = lgm_core.lgm_forward(x, np.zeros((2, 2)), np.zeros((2, 2)))
    assert (logits == -np.inf).all() and loglik[0] == -np.inf


def test_lgm_nan_backward_propagates() -> None:
    x = np.array([[np.nan, 0.0], [5.0, 5.0]])
    means, lv = np.array([[0.0, 0.0], [1.0, 1.0]]), np.zeros((2, 2))
    logits, _ = lgm_core.lgm_forward(x, means, lv)
    gx, gm, glv = lgm_core.lgm_backward(np.ones_like(logits), np.ones(2), logits, x, means, lv)
    assert np.isnan(gx[0]).any() and np.isfinite(gx[1]).all()
    assert np.isnan(gm).any() and np.isnan(glv).any()


@pytest.mark.parametrize("train", [True, False])
def test_lgm_loss_with_nan_mean_is_nan(train: bool) -> None:
    lgm = LGMLoss(3, 2).train(train)
    with torch.no_grad():
        lgm.means[1, 0] = float("nan")
    loss, _logits = lgm(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))
    assert loss is not None and torch.isnan(loss)
    _, loglik = lgm.inference(torch.randn(4, 2))
    assert torch.isnan(loglik).all()  # every row's argmax sees the NaN class


def test_lgm_float64_alpha_is_not_rounded() -> None:
    """alpha = 0.3 is not a float32 value; the float64 path must not round it (<= 1e-10)."""
    x, means = RNG.standard_normal((8, 4)) * 6, RNG.standard_normal((3, 4)) * 6
    lv, y = 0.3 * RNG.standard_normal((3, 4)), RNG.integers(0, 3, 8)
    logits, _loglik = lgm_core.lgm_forward(x, means, lv, y, alpha=0.3)
    ref = lgm_reference(*(torch.from_numpy(a) for a in (x, means, lv, y)), 0.3, True)
    assert np.abs(logits - ref[0].numpy()).max() <= 1e-10 * np.abs(ref[0].numpy()).max()
    lgm = LGMLoss(3, 4, alpha=0.3, dtype=torch.float64)
    with torch.no_grad():
        lgm.means.copy_(torch.from_numpy(means))
        lgm.log_var.copy_(torch.from_numpy(lv))
    loss_logits = lgm(torch.from_numpy(x), torch.from_numpy(y))[1]
    assert (loss_logits.detach() - ref[0]).abs().max() <= 1e-10 * ref[0].abs().max()


def test_forged_stats_segment_is_rejected() -> None:
    """UBSan: a segment near INT_MAX overflowed 2 * k; segments outside [-1, m) are refused."""
    x, w, y = RNG.standard_normal((4, 3)), RNG.standard_normal((5, 3)), np.array([0, 1, 2, 3])
    logits = x @ w.T
    stats = core.margin_forward_(logits, x, w, y, 4, 0.0, return_stats=True)
    gx, gw = np.zeros_like(x), np.zeros_like(w)
    for bad in (4, 2**31 - 1, -2):
        forged = dict(stats, segment=stats["segment"].copy())
        forged["segment"][2] = bad
        with pytest.raises(ValueError, match=r"stats segment\[2\] = .* is outside \[-1, 4\)"):
            core.margin_backward_(np.ones_like(logits), x, w, y, gx, gw, 4, 0.0, stats=forged)
    core.margin_backward_(np.ones_like(logits), x, w, y, gx, gw, 4, 0.0, stats=stats)  # genuine


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"margin": 4, "lam": "1"}, TypeError, "lam must be a real number, got str"),
        ({"margin": 4, "lam": True}, TypeError, "lam must be a real number, got bool"),
        ({"margin": 4, "lam": np.True_}, TypeError, "lam must be a real number"),
        ({"margin": 4, "lam": 1j}, TypeError, "lam must be a real number"),
        ({"margin": 4, "lam": 10**400}, ValueError, "lam must be a real number"),
        ({"margin": 4.0, "lam": 0.0}, TypeError, "margin must be an int, got float"),
        ({"margin": True, "lam": 0.0}, TypeError, "margin must be an int, got bool"),
        ({"margin": 2**21, "lam": 0.0}, ValueError, r"margin must be an integer in \[1, 2\^20\]"),
        ({"margin": 2**70, "lam": 0.0}, ValueError, r"margin must be an integer in \[1, 2\^20\]"),
    ],
)
def test_numpy_core_scalar_arguments(kwargs, error, needle) -> None:
    x, w, y = RNG.standard_normal((3, 4)), RNG.standard_normal((5, 4)), np.array([0, 1, 2])
    with pytest.raises(error, match=needle):
        core.forward(x, w, y, **kwargs)


def test_numpy_integer_margins_and_real_lambdas_are_accepted() -> None:
    x, w, y = RNG.standard_normal((3, 4)), RNG.standard_normal((5, 4)), np.array([0, 1, 2])
    want = core.forward(x, w, y, margin=4, lam=0.5)
    for margin in (np.int64(4), np.int32(4), np.uint8(4)):
        for lam in (np.float32(0.5), np.float64(0.5), 0.5):
            np.testing.assert_array_equal(core.forward(x, w, y, margin=margin, lam=lam), want)
    t = lsoftmax_logits(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(y), np.int64(4), 0.5
    )
    np.testing.assert_allclose(t.numpy(), want, rtol=1e-12)
    assert LSoftmaxLinear(4, 5, margin=np.int64(3)).margin == 3


def test_lgm_alpha_type_is_checked() -> None:
    x = RNG.standard_normal((3, 2))
    for bad in ("0.5", True, None):
        with pytest.raises(TypeError, match="alpha must be a real number"):
            lgm_core.lgm_forward(x, np.zeros((2, 2)), np.zeros((2, 2)), alpha=bad)


@pytest.mark.parametrize("margin", [0, 2**20 + 1, 2**21])
def test_lsoftmax_linear_rejects_margin_at_construction(margin: int) -> None:
    with pytest.raises(ValueError, match=r"margin must be an integer in \[1, 2\^20\]"):
        LSoftmaxLinear(4, 5, margin=margin)


def test_largest_margin_is_accepted_everywhere() -> None:
    x, w, y = RNG.standard_normal((3, 4)), RNG.standard_normal((5, 4)), np.array([0, 1, 2])
    assert _core.max_margin == 2**20
    out = core.forward(x, w, y, margin=2**20, lam=0.0)
    assert np.isfinite(out).all()
    assert LSoftmaxLinear(4, 5, margin=2**20).margin == 2**20

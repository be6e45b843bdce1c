"""The margin family (``lsoftmax.margins``) on the numpy API against the float64 reference.

Parity is ``max_rel_err`` (see ``reference.py``): <= 1e-10 in float64 and <= 1e-5 in float32,
for the logits and both gradients (the reference's by autograd).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TOL
from reference import angle_rows, family_reference, max_rel_err

from lsoftmax import core, margins
from lsoftmax.margins import ArcFace, Combined, CosFace, LSoftmax, SphereFace

#: One spec per kind and branch, with the reference's parameter names.
SPECS: list[tuple[margins.Margin, dict[str, Any]]] = [
    (LSoftmax(3), {"m": 3}),
    (SphereFace(4), {"m": 4}),
    (CosFace(0.35, 30.0), {"m": 0.35, "s": 30.0}),
    (ArcFace(0.5, 30.0), {"m": 0.5, "s": 30.0}),
    (ArcFace(0.5, 30.0, easy_margin=True), {"m": 0.5, "s": 30.0, "easy_margin": True}),
    (Combined(0.9, 0.4, 0.15, 30.0), {"m1": 0.9, "m2": 0.4, "m3": 0.15, "s": 30.0}),
]
IDS = ["lsoftmax", "sphereface", "cosface", "arcface", "arcface-easy", "combined"]


def case(n: int = 7, d: int = 5, c: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Float64 (x, weight, labels) whose target angles span (0, pi), so every branch of every
    kind (psi segments, ArcFace's fallback past theta + m = pi, easy_margin's c <= 0) is hit,
    none of them on a branch point."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(c, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=gen)
    thetas = torch.linspace(0.07, 3.05, n, dtype=torch.float64)
    norms = 0.5 + 1.5 * torch.rand(n, generator=gen, dtype=torch.float64)
    return angle_rows(weight, labels, thetas, norms, seed=seed + 1), weight, labels


def reference_grads(
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    kind: str,
    params: dict[str, Any],
    lam: float,
    grad: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xr = x.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(True)
    out = family_reference(xr, wr, labels, kind, params, lam)
    gx, gw = torch.autograd.grad(out, (xr, wr), grad.double())
    return out.detach(), gx, gw


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("spec", "params"), SPECS, ids=IDS)
def test_numpy_api_matches_reference(
    spec: margins.Margin, params: dict[str, Any], dtype: type
) -> None:
    x, w, labels = case()
    lam = 0.7 if spec.uses_lambda else 0.0
    grad = torch.randn(x.shape[0], w.shape[0], generator=torch.Generator().manual_seed(3))
    xs, ws, gs = (t.numpy().astype(dtype) for t in (x, w, grad.double()))
    ref, ref_gx, ref_gw = reference_grads(
        torch.from_numpy(xs),
        torch.from_numpy(ws),
        labels,
        spec.kind,
        params,
        lam,
        torch.from_numpy(gs),
    )
    y = labels.numpy()
    logits = core.forward(xs, ws, y, margin=spec, lam=lam)
    gx, gw = core.backward(gs, xs, ws, y, margin=spec, lam=lam)
    assert logits.dtype == gx.dtype == gw.dtype == dtype
    tol = TOL[dtype]
    assert max_rel_err(logits, ref) <= tol
    assert max_rel_err(gx, ref_gx) <= tol
    assert max_rel_err(gw, ref_gw) <= tol
    # Without labels: the kind's plain logits.
    plain = family_reference(torch.from_numpy(xs), torch.from_numpy(ws), None, spec.kind, params)
    assert max_rel_err(core.forward(xs, ws, margin=spec), plain) <= tol


def test_margin_changes_only_the_target_logit() -> None:
    x, w, labels = case()
    xs, ws, y = x.numpy(), w.numpy(), labels.numpy()
    spec = ArcFace(0.5, 30.0)
    plain = core.forward(xs, ws, margin=spec)
    out = core.forward(xs, ws, y, margin=spec)
    changed = out != plain
    assert changed[np.arange(len(y)), y].all()
    changed[np.arange(len(y)), y] = False
    assert not changed.any()


@pytest.mark.parametrize(("spec", "params"), SPECS[1:4], ids=IDS[1:4])
def test_zero_row_gets_no_margin(spec: margins.Margin, params: dict[str, Any]) -> None:
    x, w, labels = case()
    xs, ws, y = x.numpy().copy(), w.numpy(), labels.numpy()
    xs[2] = 0.0
    out = core.forward(xs, ws, y, margin=spec)
    assert np.all(out[2] == 0.0)
    gx, gw = core.backward(np.ones_like(out), xs, ws, y, margin=spec, lam=0.0)
    assert np.isfinite(gx).all() and np.isfinite(gw).all()


def test_int_margin_is_lsoftmax() -> None:
    x, w, labels = case()
    xs, ws, y = x.numpy(), w.numpy(), labels.numpy()
    np.testing.assert_array_equal(
        core.forward(xs, ws, y, margin=3, lam=0.5),
        core.forward(xs, ws, y, margin=LSoftmax(3), lam=0.5),
    )


# --- the specs --------------------------------------------------------------------------------


def test_spec_fields_and_round_trip() -> None:
    spec = ArcFace(0.5, 64.0)
    assert (spec.kind, spec.uses_lambda, spec.normalizes_features, spec.normalizes_weights) == (
        "arcface",
        False,
        True,
        True,
    )
    assert spec.params() == [0.5, 0.0, 0.0, 0.0, 64.0, 0.0]
    assert spec.attributes() == {"kind": "arcface", "margin": 0.5, "scale": 64.0, "easy_margin": 0}
    assert SphereFace(np.int64(2)).attributes() == {"kind": "sphereface", "margin": 2.0}
    assert CosFace(1, 2).to_dict() == {"kind": "cosface", "m": 1.0, "s": 2.0}
    assert Combined(1, 0.5, 0, 64).attributes() == {
        "kind": "combined",
        "m1": 1.0,
        "m2": 0.5,
        "m3": 0.0,
        "scale": 64.0,
    }
    for spec in (LSoftmax(), SphereFace(), CosFace(), ArcFace(easy_margin=True), Combined()):
        assert margins.margin_from_dict(spec.to_dict()) == spec
    assert isinstance(LSoftmax(np.int32(2)).m, int)


def test_default_schedules() -> None:
    from lsoftmax.schedules import Constant, Exponential

    assert margins.default_schedule(LSoftmax()) == Exponential()
    assert margins.default_schedule(SphereFace()) == Exponential(1000.0, 0.12, 1.0, 5.0)
    assert margins.default_schedule(CosFace()) == Constant(0.0)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: LSoftmax(0), ValueError, r"margin must be an integer in \[1, 2\^20\], got 0"),
        (lambda: SphereFace(2**21), ValueError, r"margin must be an integer in \[1, 2\^20\]"),
        (lambda: SphereFace(2.0), TypeError, "margin must be an int, got float"),
        (lambda: LSoftmax(True), TypeError, "margin must be an int, got bool"),
        (lambda: CosFace(-0.1), ValueError, "cosface margin m must be a finite number >= 0"),
        (lambda: CosFace(0.35, 0.0), ValueError, "cosface scale s must be a finite number > 0"),
        (lambda: CosFace("0.3"), TypeError, "m must be a real number, got str"),
        (lambda: ArcFace(math.pi), ValueError, r"arcface margin m must be in \[0, pi\)"),
        (lambda: ArcFace(math.nan), ValueError, r"arcface margin m must be in \[0, pi\)"),
        (lambda: ArcFace(0.5, math.inf), ValueError, "arcface scale s must be a finite number"),
        (lambda: ArcFace(easy_margin=1), TypeError, "easy_margin must be a bool, got int"),
        (lambda: Combined(m1=0.0), ValueError, "combined margin m1 must be a finite number > 0"),
        (lambda: Combined(m3=math.inf), ValueError, "combined margin m3 must be finite"),
        (lambda: margins.margin_from_dict({"kind": "nope"}), ValueError, "unknown margin kind"),
        (lambda: margins.margin_from_dict({"kind": "cosface", "q": 1}), ValueError, "'q'"),
    ],
)
def test_spec_rules_are_the_cores(make: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_core_rule_for_flat_params() -> None:
    from lsoftmax import _core

    with pytest.raises(ValueError, match="unknown margin kind 'x'; expected one of 'lsoftmax'"):
        _core.validate_margin_spec("x", [0.0] * 6)
    with pytest.raises(ValueError, match="margin params must be the 6 numbers"):
        _core.validate_margin_spec("cosface", [0.3, 1.0])
    with pytest.raises(ValueError, match="easy_margin applies to arcface only"):
        _core.validate_margin_spec("cosface", [0.3, 0, 0, 0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"lambda must be >= 0 \(and not NaN\)"):
        _core.validate_margin_spec("cosface", [0.3, 0, 0, 0, 1.0, 0.0], -1.0)
    with pytest.raises(ValueError, match=r"labels\[1\] = 4 is out of range \[0, 4\)"):
        x, w, _ = case()
        core.backward(
            np.ones((7, 4)),
            x.numpy(),
            w.numpy(),
            np.array([0, 4, 0, 0, 0, 0, 0]),
            margin=CosFace(),
            lam=0.0,
        )

"""Parity with pytorch-metric-learning 2.9.0's SphereFaceLoss, CosFaceLoss and ArcFaceLoss: with the
same weights the mean cross-entropy agrees to 1e-6 relative.

Their conventions, mapped here: W is (D, C) (ours is (C, D): we pass ``W.t()``); ArcFace's margin
is in degrees (ours in radians); SphereFace multiplies the cosines by ``|x|`` and has no lambda
(ours with lambda = 0 is the same), and computes cos(m theta) by the binomial expansion where the
core uses Chebyshev recurrences.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lsoftmax.margins import ArcFace, CosFace, SphereFace
from lsoftmax.schedules import Constant
from lsoftmax.torch import MarginLinear

pml_losses = pytest.importorskip(
    "pytorch_metric_learning.losses",
    reason="needs pytorch-metric-learning (pip install pytorch-metric-learning==2.9.0)",
)

CASES: list[tuple[str, dict[str, Any], Any]] = [
    ("SphereFaceLoss", {"margin": 4}, SphereFace(4)),
    ("CosFaceLoss", {"margin": 0.35, "scale": 30.0}, CosFace(0.35, 30.0)),
    ("ArcFaceLoss", {"margin": 28.6, "scale": 30.0}, ArcFace(math.radians(28.6), 30.0)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("name", "kwargs", "spec"), CASES, ids=[c[0] for c in CASES])
def test_mean_cross_entropy_matches_pml(
    name: str, kwargs: dict[str, Any], spec: Any, dtype: torch.dtype
) -> None:
    n, d, c = 16, 8, 10
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=gen)
    theirs = getattr(pml_losses, name)(num_classes=c, embedding_size=d, **kwargs)
    theirs.W.data = theirs.W.data.to(dtype)
    # SphereFace's lambda: pml has none, so ours runs at lambda = 0.
    ours = MarginLinear(d, c, margin=spec, schedule=Constant(0.0), dtype=dtype)
    with torch.no_grad():
        ours.weight.copy_(theirs.W.t())
    ref = theirs(x, y)
    got = F.cross_entropy(ours(x, y), y)
    rel = abs(got.item() - ref.item()) / abs(ref.item())
    assert rel <= 1e-6, (name, got.item(), ref.item(), rel)

"""The fused margin cross-entropy against F.cross_entropy of the margin logits.

References: the independent float64 L-Softmax reference (tests/reference.py) for float64
(1e-12), the unfused layer (lsoftmax_logits) in float32 (1e-6); gradients through autograd of
the references; gradcheck of the fused backward; a dispatch-mode check that no N x C storage is
ever allocated.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from reference import lsoftmax_reference, max_rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from lsoftmax import _core
from lsoftmax.schedules import Exponential
from lsoftmax.torch import LSoftmaxLinear, MarginCrossEntropy
from lsoftmax.torch.functional import lsoftmax_logits, margin_cross_entropy

MARGINS = (1, 2, 3, 4, 6)
LAMBDAS = (0.0, 0.3, 5.0)


def _data(n: int, d: int, c: int, dtype: torch.dtype, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    w = torch.randn(c, d, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    # Some rows near their target (small angles) so every segment of large margins shows up.
    x[: n // 3] = (w[y[: n // 3]] * 2.0 + 0.05 * x[: n // 3]).to(dtype)
    return x, w, y


def _fused(x, w, y, margin, lam, reduction="mean", chunk=7):
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = margin_cross_entropy(xr, wr, y, margin, reduction, chunk, lam=lam)
    (loss.sum() if reduction == "none" else loss).backward()
    return loss.detach(), xr.grad, wr.grad


def _ref64(x, w, y, margin, lam, reduction="mean"):
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    loss = F.cross_entropy(lsoftmax_reference(xr, wr, y, margin, lam), y, reduction=reduction)
    (loss.sum() if reduction == "none" else loss).backward()
    return loss.detach(), xr.grad, wr.grad


@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("lam", LAMBDAS)
def test_float64_matches_reference(margin: int, lam: float) -> None:
    x, w, y = _data(23, 9, 37, torch.float64, seed=margin)
    for reduction in ("mean", "sum", "none"):
        got = _fused(x, w, y, margin, lam, reduction)
        ref = _ref64(x, w, y, margin, lam, reduction)
        for a, r in zip(got, ref, strict=True):
            assert max_rel_err(a, r) < 1e-12, (reduction, max_rel_err(a, r))


def _unfused(x, w, y, logits_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_x, grad_w) of F.cross_entropy over the N x C logits ``logits_fn(x, w)``."""
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = F.cross_entropy(logits_fn(xr, wr), y)
    loss.backward()
    return loss.detach(), xr.grad, wr.grad


@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("lam", LAMBDAS)
def test_float32_matches_unfused_layer(margin: int, lam: float) -> None:
    x, w, y = _data(64, 32, 300, torch.float32, seed=10 + margin, scale=3.0)
    got = _fused(x, w, y, margin, lam, chunk=64)
    ref = _unfused(x, w, y, lambda xr, wr: lsoftmax_logits(xr, wr, y, margin, lam))
    for a, r in zip(got, ref, strict=True):
        assert max_rel_err(a, r) < 1e-6, max_rel_err(a, r)
    # and the float64 reference, for the loss value
    assert max_rel_err(got[0], _ref64(x, w, y, margin, lam)[0]) < 1e-6


@pytest.mark.parametrize("margin", (1, 2, 4))
def test_gradcheck(margin: int) -> None:
    x, w, y = _data(6, 4, 11, torch.float64, seed=3)
    x.requires_grad_()
    w.requires_grad_()
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b, r=reduction: margin_cross_entropy(a, b, y, margin, r, 4, lam=0.2),
            (x, w),
        )


def test_chunk_size_does_not_change_the_result() -> None:
    x, w, y = _data(17, 8, 50, torch.float64, seed=5)
    base = _fused(x, w, y, 4, 0.1, chunk=50)
    for chunk in (1, 3, 16, 49, 1000):
        for a, r in zip(_fused(x, w, y, 4, 0.1, chunk=chunk), base, strict=True):
            assert max_rel_err(a, r) < 1e-13


def test_large_logits_are_stable() -> None:
    # Logits in the hundreds: exp would overflow without the running max.
    x, w, y = _data(16, 8, 40, torch.float64, seed=6, scale=40.0)
    for a, r in zip(_fused(x, w, y, 3, 0.5), _ref64(x, w, y, 3, 0.5), strict=True):
        assert torch.isfinite(a).all()
        assert max_rel_err(a, r) < 1e-12


def test_tensor_lambda_and_int32_labels() -> None:
    x, w, y = _data(10, 6, 20, torch.float64, seed=7)
    a = _fused(x, w, y.int(), 2, torch.tensor(0.7, dtype=torch.float64))
    for got, ref in zip(a, _ref64(x, w, y, 2, 0.7), strict=True):
        assert max_rel_err(got, ref) < 1e-12


class _StorageSizes(TorchDispatchMode):
    """Records the storage size (elements) of every tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def test_never_allocates_n_by_c() -> None:
    n, d, c, chunk = 64, 4, 1000, 50
    x, w, y = _data(n, d, c, torch.float32, seed=8)
    x.requires_grad_()
    w.requires_grad_()
    mode = _StorageSizes()
    with mode:
        margin_cross_entropy(x, w, y, 4, chunk_size=chunk, lam=0.1).backward()
    # The largest storage is grad_weight (C x D = 4000); N x C would be 64000.
    assert mode.largest <= max(c * d, n * chunk), mode.largest
    # the same check catches the unfused path
    unfused = _StorageSizes()
    with unfused:
        F.cross_entropy(lsoftmax_logits(x, w, y, 4, 0.1), y).backward()
    assert unfused.largest >= n * c


def test_module_matches_layer_plus_cross_entropy() -> None:
    torch.manual_seed(0)
    sched = Exponential(base=100, gamma=0.1, power=1)
    fused = MarginCrossEntropy(8, 30, margin=3, schedule=sched, chunk_size=8).double()
    layer = LSoftmaxLinear(8, 30, margin=3, schedule=sched).double()
    layer.load_state_dict(fused.state_dict())
    x, _, y = _data(12, 8, 30, torch.float64, seed=9)
    for _ in range(3):  # lambda changes every step
        lf = fused(x, y)
        ll = F.cross_entropy(layer(x, y), y)
        assert max_rel_err(lf, ll) < 1e-12
    assert int(fused.step) == int(layer.step) == 3
    fused.eval()
    plain = F.cross_entropy(x @ fused.weight.t(), y)
    assert max_rel_err(fused(x, y), plain) < 1e-12
    assert torch.equal(fused.logits(x), x @ fused.weight.t())
    assert int(fused.step) == 3  # eval does not advance the schedule


def test_bad_arguments_are_named() -> None:
    x, w, y = _data(4, 3, 5, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        margin_cross_entropy(x, w, y, 2, "avg")
    with pytest.raises(ValueError, match="chunk_size"):
        margin_cross_entropy(x, w, y, 2, chunk_size=0)
    with pytest.raises(ValueError, match=r"labels\[1\] = 5 is out of range \[0, 5\)"):
        margin_cross_entropy(x, w, torch.tensor([0, 5, 1, 2]), 2)
    with pytest.raises(ValueError, match="target is required"):
        margin_cross_entropy(x, w, None, 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"weight is torch\.float64"):
        margin_cross_entropy(x, w.double(), y, 2)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        margin_cross_entropy(x, w, y, 2, lam=-1.0)
    with pytest.raises(ValueError, match=r"margin must be an integer in \[1, 2\^20\], got 0"):
        margin_cross_entropy(x, w, y, 0)


# --- the core's block kernels directly ---------------------------------------------------------


@pytest.mark.parametrize("dtype", (np.float32, np.float64))
def test_lse_block_over_a_wide_range_and_strided_blocks(dtype) -> None:
    rng = np.random.default_rng(0)
    n, c = 9, 300
    vals = rng.uniform(-700 if dtype == np.float64 else -80, 30, (n, c)).astype(dtype)
    y = rng.integers(-5, c + 5, n)  # some rows have no target in range
    t = rng.standard_normal(n).astype(dtype)
    row_max, row_sum = np.full(n, -np.inf), np.zeros(n)
    full = vals.copy()
    for i in range(n):
        if 0 <= y[i] < c:
            full[i, y[i]] = t[i]
    for c0 in range(0, c, 64):
        # a column-strided view of a Fortran-ordered copy
        block = np.asfortranarray(vals[:, c0 : c0 + 64])
        _core.fused_lse_block_(block, y, c0, t, row_max, row_sum)
    got = row_max + np.log(row_sum)
    ref = torch.logsumexp(torch.from_numpy(full.astype(np.float64)), dim=1).numpy()
    tol = 1e-14 if dtype == np.float64 else 2e-7
    assert np.max(np.abs(got - ref) / np.abs(ref).max()) < tol


def test_lse_block_propagates_nan() -> None:
    block = np.zeros((2, 5))
    block[1, 3] = np.nan
    row_max, row_sum = np.full(2, -np.inf), np.zeros(2)
    _core.fused_lse_block_(block, np.array([0, 0]), 0, np.zeros(2), row_max, row_sum)
    assert math.isfinite(row_sum[0]) and math.isnan(row_sum[1])


def test_block_kernels_check_their_arguments() -> None:
    block = np.zeros((3, 4))
    with pytest.raises(ValueError, match="row_sum must be a contiguous 1-D array of 3"):
        _core.fused_lse_block_(block, np.zeros(3, np.int64), 0, np.zeros(3), np.zeros(3),
                               np.zeros(2))
    with pytest.raises(ValueError, match="labels has 2 entries but x has 3 rows"):
        _core.fused_lse_block_(block, np.zeros(2, np.int64), 0, np.zeros(3), np.zeros(3),
                               np.zeros(3))
    with pytest.raises(ValueError, match="class_begin must be >= 0"):
        _core.fused_grad_block_(block, np.zeros(3, np.int64), -1, np.zeros(3), np.zeros(3),
                                np.zeros(3))
    with pytest.raises(TypeError, match="scale has dtype float32"):
        _core.fused_grad_block_(block, np.zeros(3, np.int64), 0, np.zeros(3), np.zeros(3),
                                np.zeros(3, np.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA device)")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    x, w, y = _data(40, 16, 333, dtype, seed=11)
    cpu = _fused(x, w, y, 4, 0.2, chunk=100)
    gpu = _fused(x.cuda(), w.cuda(), y.cuda(), 4, 0.2, chunk=100)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, r in zip(gpu, cpu, strict=True):
        assert max_rel_err(a.cpu(), r) < tol


# --- every kind of the margin family -----------------------------------------------------------


def _family_specs() -> list:
    from lsoftmax import margins

    specs = [
        (margins.LSoftmax(3), 0.3),
        (margins.SphereFace(4), 2.0),
        (margins.CosFace(0.35, 16.0), 0.0),
        (margins.ArcFace(0.5, 16.0), 0.0),
        (margins.ArcFace(0.5, 16.0, easy_margin=True), 0.0),
    ]
    if hasattr(margins, "Combined"):
        specs.append((margins.Combined(0.9, 0.4, 0.15, 16.0), 0.0))
    return specs


FAMILY = _family_specs()
FAMILY_IDS = [f"{s.kind}{'-easy' if getattr(s, 'easy_margin', False) else ''}" for s, _ in FAMILY]


def _family_ref64(x, w, y, spec, lam, reduction="mean"):
    from reference import family_reference

    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    params = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    logits = family_reference(xr, wr, y, spec.kind, params, lam)
    loss = F.cross_entropy(logits, y, reduction=reduction)
    (loss.sum() if reduction == "none" else loss).backward()
    return loss.detach(), xr.grad, wr.grad


@pytest.mark.parametrize(("spec", "lam"), FAMILY, ids=FAMILY_IDS)
def test_family_float64_matches_reference(spec, lam: float) -> None:
    x, w, y = _data(23, 9, 37, torch.float64, seed=21)
    w[5] *= 1e-3  # a short weight row: the normalizing kinds must not care
    for reduction in ("mean", "none"):
        got = _fused(x, w, y, spec, lam, reduction)
        ref = _family_ref64(x, w, y, spec, lam, reduction)
        for a, r in zip(got, ref, strict=True):
            assert max_rel_err(a, r) < 1e-12, (reduction, max_rel_err(a, r))


@pytest.mark.parametrize(("spec", "lam"), FAMILY, ids=FAMILY_IDS)
def test_family_float32_matches_margin_logits(spec, lam: float) -> None:
    from lsoftmax.torch.functional import margin_logits

    x, w, y = _data(64, 32, 300, torch.float32, seed=22, scale=3.0)
    got = _fused(x, w, y, spec, lam, chunk=64)
    ref = _unfused(x, w, y, lambda xr, wr: margin_logits(xr, wr, y, spec, lam))
    for a, r in zip(got, ref, strict=True):
        assert max_rel_err(a, r) < 1e-6, max_rel_err(a, r)


@pytest.mark.parametrize(("spec", "lam"), FAMILY, ids=FAMILY_IDS)
def test_family_gradcheck(spec, lam: float) -> None:
    x, w, y = _data(3, 4, 5, torch.float64, seed=23)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: margin_cross_entropy(a, b, y, spec, "none", 2, lam=lam), (x, w)
    )


def test_normalizing_kinds_never_copy_w_or_allocate_n_by_c() -> None:
    from lsoftmax.margins import ArcFace

    n, d, c, chunk = 64, 4, 1000, 50
    x, w, y = _data(n, d, c, torch.float32, seed=24)
    x.requires_grad_()
    w.requires_grad_()

    class _Large(TorchDispatchMode):
        """The distinct storages of at least C x D elements that ops return (views of W,
        whose storage is not new, excluded)."""

        def __init__(self) -> None:
            super().__init__()
            self.sizes: dict[int, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    size = st.nbytes() // t.element_size()
                    if size >= c * d and st.data_ptr() != w.untyped_storage().data_ptr():
                        self.sizes[st.data_ptr()] = size
            return out

    mode = _Large()
    with mode:
        margin_cross_entropy(x, w, y, ArcFace(0.5, 16.0), chunk_size=chunk).backward()
    # One new C x D storage, grad_weight: no normalized copy of W, no N x C (64000) tensor.
    assert list(mode.sizes.values()) == [c * d], mode.sizes


def test_family_module_matches_margin_linear() -> None:
    from lsoftmax.margins import ArcFace, SphereFace
    from lsoftmax.torch import MarginLinear

    torch.manual_seed(0)
    x, _, y = _data(12, 8, 30, torch.float64, seed=25)
    for spec in (ArcFace(0.4, 8.0), SphereFace(3)):
        fused = MarginCrossEntropy(8, 30, margin=spec, chunk_size=8).double()
        layer = MarginLinear(8, 30, margin=ArcFace()).double()
        layer.load_state_dict(fused.state_dict())  # the margin and schedule come with it
        assert layer.margin == spec
        for _ in range(2):
            assert max_rel_err(fused(x, y), F.cross_entropy(layer(x, y), y)) < 1e-12
        assert int(fused.step) == int(layer.step) == 2
        fused.eval()
        layer.eval()
        assert max_rel_err(fused(x, y), F.cross_entropy(layer(x), y)) < 1e-12


def test_bench_huge_split_times_every_part() -> None:
    # The benchmark behind docs/benchmarks.md's time split runs and reports each part.
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_huge.py"), "--split", "--classes",
         "600", "--threads", "1", "--reps", "1"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    for part in ("nn.Linear + CE", "fused step", "4 blocked GEMMs", "log-sum-exp kernel",
                 "softmax-gradient kernel"):
        assert part in out, out

"""The core's row kernels (lsoftmax_core/src/row_kernels.h, and the fused loss's block kernels in
fused_cpu.cc): the unit-stride ones run a build for the machine's instruction set (AVX-512 or
AVX2 on x86-64), the strided ones the baseline build of the same arithmetic. Both use the same
fixed lanes in the same order without FMA contraction, so results must not depend on which ran:
the same values in a column-strided layout (the baseline build) give bit-identical outputs. The
float64 references are in test_lsoftmax_core.py and test_fused_loss.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lsoftmax import _core
from lsoftmax.torch import _kernels

pytestmark = pytest.mark.skipif(
    not _kernels.TORCH_OPS, reason="needs the libtorch extension (lsoftmax/_torch_ops.so)"
)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values with column stride t.shape[0] (a transposed copy, viewed back)."""
    out = t.t().contiguous().t()
    assert out.stride(1) != 1 and torch.equal(out, t)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [5, 37, 512])
def test_unit_and_strided_builds_agree_bitwise(dtype: torch.dtype, d: int) -> None:
    gen = torch.Generator().manual_seed(d)
    n, c, margin, lam = 64, 9, 4, 0.25
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    w = torch.randn(c, d, generator=gen, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=gen)
    g = torch.randn(n, c, generator=gen, dtype=dtype)
    plain = x @ w.t()
    outs = []
    for xs, ws in ((x, w), (_strided(x), _strided(w))):
        logits = plain.clone()
        torch.ops.lsoftmax_cpu.margin_forward_(logits, xs, ws, y, margin, lam)
        grad_x, grad_w = g @ w, g.t() @ x
        torch.ops.lsoftmax_cpu.margin_backward_(g, xs, ws, y, grad_x, grad_w, margin, lam)
        outs.append((logits, grad_x, grad_w))
    assert not torch.equal(outs[0][0], plain)  # the margin was applied
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cols", [7, 1000, 4099])
def test_fused_kernels_unit_and_strided_builds_agree_bitwise(dtype: type, cols: int) -> None:
    """The fused loss's block kernels (lsoftmax_core/src/fused_cpu.cc): SIMD lanes per
    instruction set on contiguous rows, the baseline scalar lanes on column-strided ones."""
    rng = np.random.default_rng(cols)
    n = 37
    block = (rng.standard_normal((n, cols)) * 5).astype(dtype)
    labels = rng.integers(0, cols, n)
    target = rng.standard_normal(n).astype(dtype)
    outs = []
    for b in (block.copy(), np.asfortranarray(block)):
        row_max, row_sum = np.full(n, -math.inf), np.zeros(n)
        _core.fused_lse_block_(b, labels, 0, target, row_max, row_sum)
        lse = row_max + np.log(row_sum)
        _core.fused_grad_block_(b, labels, 0, target, lse, np.full(n, 0.1, dtype=dtype))
        outs.append((row_max, row_sum, np.ascontiguousarray(b)))
    assert outs[1][2].shape == (n, cols) and not np.array_equal(outs[0][2], block)
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [5, 64, 515])
def test_plain_logits_unit_and_strided_builds_agree_bitwise(dtype: type, d: int) -> None:
    """lsoftmax::plain_logits (the ORT kernel's single-row product): vector lanes per instruction
    set on contiguous rows, the baseline lanes on column-strided ones, and close to float64."""
    rng = np.random.default_rng(d)
    x = rng.standard_normal((3, d)).astype(dtype)
    w = rng.standard_normal((11, d)).astype(dtype)
    outs = []
    for xs, ws in ((x, w), (np.asfortranarray(x), np.asfortranarray(w))):
        out = np.zeros((3, 11), dtype=dtype)
        _core.plain_logits_(out, xs, ws)
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(outs[0], ref, rtol=tol, atol=tol * math.sqrt(d))


@pytest.mark.parametrize("d", [512, 515])
def test_plain_logits_split_over_threads_gives_the_serial_bits(d: int) -> None:
    """From a few hundred classes the product is split over the pool (the ORT kernel's batch-1
    path at 1000 classes): every class is still one thread's sum in the fixed order, so 1 and 3
    threads agree bit for bit, with the strided baseline build too."""
    from lsoftmax import core

    rng = np.random.default_rng(d)
    x = rng.standard_normal((1, d)).astype(np.float32)
    w = rng.standard_normal((1003, d)).astype(np.float32)
    outs = []
    before = core.get_num_threads()
    try:
        for threads, ws in ((1, w), (3, w), (3, np.asfortranarray(w))):
            core.set_num_threads(threads)
            out = np.zeros((1, 1003), dtype=np.float32)
            _core.plain_logits_(out, x, ws)
            outs.append(out)
    finally:
        core.set_num_threads(before)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(outs[0], ref, rtol=1e-5, atol=1e-5 * math.sqrt(d))


def test_plain_logits_names_its_bad_arguments() -> None:
    x, w = np.zeros((2, 4), np.float32), np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError, match="x has 4 features per row but weight has 5"):
        _core.plain_logits_(np.zeros((2, 3), np.float32), x, w)
    with pytest.raises(ValueError, match="logits"):
        _core.plain_logits_(np.zeros((2, 2), np.float32), x, w[:, :4])
    with pytest.raises(TypeError, match="logits"):
        _core.plain_logits_(np.zeros((2, 3)), x, w[:, :4])

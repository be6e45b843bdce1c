"""Second derivatives: a clear error on every path with a margin, correct where there is none.

The kernels add the margin terms to the gradients in place, which autograd cannot see, so a
graph of the backward would carry a silently wrong second derivative (issue 11). Every path
refuses instead, with one message.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import needs_torch_cuda
from torch import Tensor

from lsoftmax.schedules import Constant
from lsoftmax.torch import LSoftmaxLinear, ops
from lsoftmax.torch.functional import lsoftmax_logits

Path = Callable[[Tensor, Tensor, Tensor, int], Tensor]


def _module(x: Tensor, w: Tensor, y: Tensor, m: int) -> Tensor:
    layer = LSoftmaxLinear(w.shape[1], w.shape[0], margin=m, schedule=Constant(0.5))
    layer = layer.to(device=w.device, dtype=w.dtype)
    layer.weight = torch.nn.Parameter(w)
    return layer(x, y)


PATHS: dict[str, Path] = {
    "functional": lambda x, w, y, m: lsoftmax_logits(x, w, y, m, 0.5),
    "functional_tensor_lam": lambda x, w, y, m: lsoftmax_logits(x, w, y, m, torch.tensor(0.5)),
    "op": lambda x, w, y, m: torch.ops.lsoftmax.linear(x, w, y, m, 0.5),
    "margin_op": lambda x, w, y, m: torch.ops.lsoftmax.margin_linear(
        x, w, y, torch.tensor(0.5, dtype=torch.float64, device=x.device), m
    ),
    "python_eager_fallback": lambda x, w, y, m: ops._EagerMarginLinear.apply(x, w, y, m, 0.5),
    "module": _module,
}


def _inputs(device: str) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    w = torch.randn(3, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 0, 1, 2], device=device)
    return x, w, y


def _second_derivative(path: Path, x: Tensor, w: Tensor, y: Tensor, m: int) -> None:
    out = path(x, w, y, m)
    (gx,) = torch.autograd.grad(out.sin().sum(), x, create_graph=True)
    gx.pow(2).sum().backward()


def _devices() -> list:
    return [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                needs_torch_cuda,
            ],
        ),
    ]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("name", list(PATHS))
def test_double_backward_with_margin_raises(name: str, device: str) -> None:
    if name == "python_eager_fallback" and device != "cpu":
        pytest.skip("the Python eager fallback is a CPU-only path")
    x, w, y = _inputs(device)
    with pytest.raises(RuntimeError, match="do not support double backward"):
        _second_derivative(PATHS[name], x, w, y, 4)


@pytest.mark.parametrize("name", ["functional", "op", "python_eager_fallback"])
def test_first_derivative_unaffected(name: str) -> None:
    """The refusal is only for graphs of the backward: plain backward still gives gradients
    (checked against finite differences)."""
    x, w, y = _inputs("cpu")
    assert torch.autograd.gradcheck(lambda a, b: PATHS[name](a, b, y, 4), (x, w))


@pytest.mark.parametrize(
    "path",
    [
        lambda x, w, y: lsoftmax_logits(x, w, y, 1, 0.5),  # margin 1: x @ w.T
        lambda x, w, y: lsoftmax_logits(x, w, None, 4, 0.5),  # no target: plain logits
        lambda x, w, y: torch.ops.lsoftmax.linear(x, w, None, 4, 0.0),
    ],
    ids=["margin1", "no_target", "op_no_target"],
)
def test_double_backward_without_margin_is_correct(path: Callable) -> None:
    x, w, y = _inputs("cpu")
    assert torch.autograd.gradgradcheck(lambda a, b: path(a, b, y), (x, w))

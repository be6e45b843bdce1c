"""The ``lsoftmax::`` torch custom ops (eager, autograd, torch.compile, torch.export).

- ``lsoftmax::linear(x, weight, labels?, margin, lam: float)``: plain logits without labels,
  margin logits with them; the op the ONNX exporter translates (lambda becomes an attribute).
- ``lsoftmax::margin_linear(x, weight, labels, lam: Tensor, margin)``: the same with lambda as a
  0-d float64 tensor, so a schedule can change it every step without recompiling.
- ``lsoftmax::linear_backward``: the backward of both (GEMMs by torch, margin terms by the core).
- ``lsoftmax::schedule_lambda(step, kind, params)``: a schedule's value at a step tensor.
- ``lsoftmax::margin_family_linear(Tensor x, Tensor weight, Tensor? labels, float lam, str kind,
  float[] params) -> Tensor``: any kind of the margin family (``lsoftmax.margins``) on the RAW
  ``x`` (N, D) and ``weight`` (C, D); the op normalizes inside. ``kind`` is the spec's ``kind``,
  ``params = [margin, m1, m2, m3, scale, easy_margin]`` (``Margin.params()``; unused entries 0:
  lsoftmax/sphereface use ``params[0] = m``, cosface/arcface ``params[0] = m`` and
  ``params[4] = s``, combined ``params[1..4]``). Without labels: the kind's plain logits
  (``x W^T``, ``|x| cos theta_j``, ``s cos theta_j``). This is the op the ONNX exporter
  translates to ``ai.lsoftmax::MarginLinear``.
- ``lsoftmax::margin_family_scheduled(x, weight, labels, lam: Tensor, kind, params)``: the same
  with labels and lambda as a 0-d float64 tensor (a schedule's value, no recompiles).
- ``lsoftmax::margin_family_backward``: the backward of both.

On CUDA no op reads a value back to the host: ``schedule_lambda`` evaluates the schedule on the
device (a 0-d float64 tensor on the step's device) and ``margin_linear`` / ``linear_backward``
hand a CUDA ``lam`` to the kernels by address, so a training step of ``LSoftmaxLinear`` on the GPU
has no host sync from lambda and can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lsoftmax import _core
from lsoftmax.torch import _family, _kernels
from lsoftmax.torch.checks import check_inputs

__all__ = [
    "eager_cpu",
    "eager_margin_linear",
    "linear",
    "linear_backward",
    "margin_family_backward",
    "margin_family_linear",
    "margin_family_scheduled",
    "margin_linear",
    "schedule_lambda",
]


#: Raised on every path (eager, custom op, CPU, CUDA) by a second derivative of the layer.
DOUBLE_BACKWARD_ERROR = (
    "lsoftmax: the L-Softmax margin logits do not support double backward "
    "(create_graph=True / second derivatives)"
)


def _check_pair(x: Tensor, weight: Tensor) -> None:
    # Called ops directly get the same named errors as the functional form (the core checks the
    # labels, margin and lambda).
    check_inputs(x, weight, None)


def _lam_arg(lam: Tensor, x: Tensor) -> float | Tensor:
    # A CUDA lambda for CUDA inputs stays on the device (the kernels read it there); any other
    # combination is read on the host, as before.
    if lam.device.type == "cuda" and x.device.type == "cuda":
        return lam
    return lam.item()


# Below this many classes torch's CPU GEMM computes x @ W.T faster as (W @ x.T).T: the rule of
# plain_logits in lsoftmax_core/torch/torch_ops.cc (kTransposedGemmBelow, the eager layer's C++
# forward), repeated here for the Python paths, which also run without that extension,
# and so that every CPU path of the layer rounds its logits alike.
_TRANSPOSED_GEMM_BELOW = 16


def plain_logits(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T``, in the orientation torch's CPU GEMM runs faster (contiguous)."""
    if x.device.type == "cpu" and weight.shape[0] < _TRANSPOSED_GEMM_BELOW:
        return torch.mm(weight, x.t()).t().contiguous()
    return torch.mm(x, weight.t())


def _forward(
    x: Tensor,
    weight: Tensor,
    labels: Tensor | None,
    margin: int,
    lam: float | Tensor,
    return_stats: bool = False,
) -> tuple[Tensor, dict[str, Any] | None]:
    """The layer's forward: the GEMM by torch, then the core's per-row margin work."""
    _check_pair(x, weight)
    logits = plain_logits(x, weight)
    stats = None
    if labels is not None:
        stats = _kernels.margin_forward_(logits, x, weight, labels, margin, lam, return_stats)
    return logits, stats


def _backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: int,
    lam: float | Tensor,
    stats: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """The layer's backward: the two plain GEMMs by torch, then the core's margin terms."""
    grad = grad.contiguous()
    grad_x = torch.mm(grad, weight)
    grad_weight = torch.mm(grad.t(), x)
    _kernels.margin_backward_(grad, x, weight, labels, grad_x, grad_weight, margin, lam, stats)
    return grad_x, grad_weight


def _fake_logits(x: Tensor, weight: Tensor) -> Tensor:
    _check_pair(x, weight)
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("lsoftmax::linear_backward", mutates_args=())
def linear_backward(
    grad: Tensor, x: Tensor, weight: Tensor, labels: Tensor, lam: Tensor, margin: int
) -> tuple[Tensor, Tensor]:
    return _backward(grad, x, weight, labels, margin, _lam_arg(lam, grad))


@linear_backward.register_fake
def _(grad: Tensor, x: Tensor, weight: Tensor, labels: Tensor, lam: Tensor, margin: int):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        weight, memory_format=torch.contiguous_format
    )


def _no_double_backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


# Only reached when a graph of the backward is differentiated (create_graph=True, then backward
# again): the kernels write in place, so there is no formula to give, only a clear error.
def _no_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    pass


linear_backward.register_autograd(_no_double_backward, setup_context=_no_setup)


def _grads(ctx: Any, grad: Tensor, lam: Tensor) -> tuple[Tensor | None, Tensor | None]:
    x, weight, labels = ctx.saved_tensors[:3]
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x or need_w):
        return None, None
    if ctx.has_labels:
        grad_x, grad_w = torch.ops.lsoftmax.linear_backward(
            grad, x, weight, labels, lam, ctx.margin
        )
    else:
        grad_x, grad_w = grad @ weight, grad.t() @ x
    return (grad_x if need_x else None), (grad_w if need_w else None)


# --- lsoftmax::linear (float lambda) --------------------------------------------------------


@torch.library.custom_op("lsoftmax::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, labels: Tensor | None, margin: int, lam: float) -> Tensor:
    return _forward(x, weight, labels, margin, lam)[0]


@linear.register_fake
def _(x: Tensor, weight: Tensor, labels: Tensor | None, margin: int, lam: float) -> Tensor:
    return _fake_logits(x, weight)


def _linear_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, labels, margin, lam = inputs
    ctx.has_labels = labels is not None
    ctx.save_for_backward(x, weight, labels)
    ctx.margin = margin
    ctx.lam = lam


def _linear_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    lam = torch.tensor(ctx.lam, dtype=torch.float64)
    grad_x, grad_w = _grads(ctx, grad, lam)
    return grad_x, grad_w, None, None, None


linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# --- lsoftmax::margin_linear (tensor lambda) --------------------------------------------------


@torch.library.custom_op("lsoftmax::margin_linear", mutates_args=())
def margin_linear(x: Tensor, weight: Tensor, labels: Tensor, lam: Tensor, margin: int) -> Tensor:
    if lam.numel() != 1:
        raise ValueError(f"lam must be a 0-d tensor, got shape {tuple(lam.shape)}")
    return _forward(x, weight, labels, margin, _lam_arg(lam, x))[0]


@margin_linear.register_fake
def _(x: Tensor, weight: Tensor, labels: Tensor, lam: Tensor, margin: int) -> Tensor:
    return _fake_logits(x, weight)


def _margin_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, labels, lam, margin = inputs
    ctx.has_labels = True
    ctx.save_for_backward(x, weight, labels, lam)
    ctx.margin = margin


def _margin_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    grad_x, grad_w = _grads(ctx, grad, ctx.saved_tensors[3])
    return grad_x, grad_w, None, None, None


margin_linear.register_autograd(_margin_backward, setup_context=_margin_setup)


# --- lsoftmax::margin_family_* -----------------------------------------------------------------


@torch.library.custom_op("lsoftmax::margin_family_backward", mutates_args=())
def margin_family_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    labels: Tensor | None,
    lam: Tensor,
    kind: str,
    params: list[float],
) -> tuple[Tensor, Tensor]:
    return _family.backward(grad, x, weight, labels, _lam_arg(lam, grad), kind, params)


@margin_family_backward.register_fake
def _(grad, x, weight, labels, lam, kind, params):  # type: ignore[no-untyped-def]
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        weight, memory_format=torch.contiguous_format
    )


# Its own backward (a second derivative) is not written: the same clear error as the others.
margin_family_backward.register_autograd(_no_double_backward, setup_context=_no_setup)


def _family_grads(ctx: Any, grad: Tensor, lam: Tensor) -> tuple[Tensor | None, Tensor | None]:
    x, weight, labels = ctx.saved_tensors[:3]
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x or need_w):
        return None, None
    grad_x, grad_w = torch.ops.lsoftmax.margin_family_backward(
        grad, x, weight, labels if ctx.has_labels else None, lam, ctx.kind, ctx.params
    )
    return (grad_x if need_x else None), (grad_w if need_w else None)


@torch.library.custom_op("lsoftmax::margin_family_linear", mutates_args=())
def margin_family_linear(
    x: Tensor, weight: Tensor, labels: Tensor | None, lam: float, kind: str, params: list[float]
) -> Tensor:
    _check_pair(x, weight)
    return _family.forward(x, weight, labels, lam, kind, params)


@margin_family_linear.register_fake
def _(x, weight, labels, lam, kind, params):  # type: ignore[no-untyped-def]
    return _fake_logits(x, weight)


def _family_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, labels, lam, kind, params = inputs
    ctx.has_labels = labels is not None
    ctx.save_for_backward(x, weight, labels)
    ctx.lam, ctx.kind, ctx.params = lam, kind, params


def _family_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    lam = torch.tensor(ctx.lam, dtype=torch.float64)
    return (*_family_grads(ctx, grad, lam), None, None, None, None)


margin_family_linear.register_autograd(_family_backward, setup_context=_family_setup)


@torch.library.custom_op("lsoftmax::margin_family_scheduled", mutates_args=())
def margin_family_scheduled(
    x: Tensor, weight: Tensor, labels: Tensor, lam: Tensor, kind: str, params: list[float]
) -> Tensor:
    _check_pair(x, weight)
    if lam.numel() != 1:
        raise ValueError(f"lam must be a 0-d tensor, got shape {tuple(lam.shape)}")
    return _family.forward(x, weight, labels, _lam_arg(lam, x), kind, params)


@margin_family_scheduled.register_fake
def _(x, weight, labels, lam, kind, params):  # type: ignore[no-untyped-def]
    return _fake_logits(x, weight)


def _family_scheduled_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, labels, lam, kind, params = inputs
    ctx.has_labels = True
    ctx.save_for_backward(x, weight, labels, lam)
    ctx.kind, ctx.params = kind, params


def _family_scheduled_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    return (*_family_grads(ctx, grad, ctx.saved_tensors[3]), None, None, None, None)


margin_family_scheduled.register_autograd(
    _family_scheduled_backward, setup_context=_family_scheduled_setup
)


# --- lsoftmax::schedule_lambda ------------------------------------------------------------------


@torch.library.custom_op("lsoftmax::schedule_lambda", mutates_args=())
def schedule_lambda(step: Tensor, kind: str, params: list[float]) -> Tensor:
    if step.device.type == "cuda":
        return _kernels.schedule_lambda_cuda(step, kind, params)
    value = _core.schedule_value(kind, params, int(step.item()))
    return torch.tensor(value, dtype=torch.float64)


@schedule_lambda.register_fake
def _(step: Tensor, kind: str, params: list[float]) -> Tensor:
    return torch.empty((), dtype=torch.float64, device=step.device)


# --- eager CPU path -------------------------------------------------------------------------------
# The custom ops above are what torch.compile, torch.export and the ONNX exporter see. Plain eager
# calls on CPU tensors skip the custom-op dispatch (tens of microseconds per op and step, a large
# share of the layer's cost at small class counts) and hand the forward's per-row norms and cosines
# to the backward instead of recomputing them: through the libtorch extension's
# lsoftmax_cpu::margin_linear (one dispatcher call, a C++ autograd node), or, when the build has
# no extension, through the same _forward/_backward in an autograd.Function.

_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def eager_cpu(*tensors: Tensor | None) -> bool:
    """True when the call runs eagerly on plain CPU tensors (no tracing, compiling or vmap)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return all(
        type(t) in _PLAIN_TENSORS and t.device.type == "cpu" for t in tensors if t is not None
    )


class _EagerMarginLinear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, labels: Tensor, margin: int, lam: float
    ) -> Tensor:
        logits, stats = _forward(x, weight, labels, margin, lam, return_stats=True)
        ctx.save_for_backward(x, weight, labels)
        ctx.margin, ctx.lam, ctx.stats = margin, lam, stats
        return logits

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        # The kernels add the margin terms in place, invisibly to autograd: a graph of this
        # backward would carry a silently wrong second derivative.
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        x, weight, labels = ctx.saved_tensors
        grad_x, grad_w = _backward(grad, x, weight, labels, ctx.margin, ctx.lam, ctx.stats)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return (grad_x if need_x else None), (grad_w if need_w else None), None, None, None


# The overload itself: calling it skips the packet's overload resolution (a few µs per step).
_CPP_MARGIN_LINEAR = torch.ops.lsoftmax_cpu.margin_linear.default if _kernels.TORCH_OPS else None


# The scheduled head's training forward (schedule, step counter and layer) in one C++ call.
SCHEDULED_MARGIN_LINEAR = (
    torch.ops.lsoftmax_cpu.scheduled_margin_linear.default if _kernels.TORCH_OPS else None
)

# The same op behind one CPython call that also checks whether the call is one the op takes
# (returns None where not): the module's common training forward, without torch.ops' boxing.
NATIVE_SCHEDULED_MARGIN_LINEAR = (
    _kernels.TORCH_ENTRY.scheduled_margin_linear if _kernels.TORCH_ENTRY is not None else None
)


def eager_margin_linear(
    x: Tensor, weight: Tensor, labels: Tensor, margin: int, lam: float
) -> Tensor:
    """Margin logits on the eager CPU path (call only when ``eager_cpu`` holds)."""
    if _CPP_MARGIN_LINEAR is not None:
        return _CPP_MARGIN_LINEAR(x, weight, labels, margin, lam)
    return _EagerMarginLinear.apply(x, weight, labels, margin, lam)

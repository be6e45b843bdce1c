"""The L-GM ``lsoftmax::`` custom ops: the CPU path (core assembly around torch GEMMs) and CUDA.

Ops (eager, autograd, ``torch.compile``; GEMMs by torch, the assembly by the C++ core):

- ``lsoftmax::lgm_logits(x, means, log_var, labels?, alpha: float, include_logdet: bool)
  -> (logits, loglik)``: the op the ONNX exporter translates.
- ``lsoftmax::lgm_margin_logits(x, means, log_var, labels, alpha: Tensor, include_logdet)``: the
  same with ``alpha`` a 0-d float64 tensor, so a schedule can change it every step.
- ``lsoftmax::lgm_backward(...) -> (grad_x, grad_means, grad_log_var)``.
- the alpha schedule's value comes from ``lsoftmax::schedule_lambda`` (any schedule kind).

``logits[i, k] = -(1 + alpha [k = y_i]) d_ik - [include_logdet] 1/2 log|V_k|`` and
``loglik[i] = -(d_ic + 1/2 log|V_c|)`` for ``c`` the label, or the predicted class without labels.

CUDA tensors run the core's CUDA kernels (lsoftmax_core/cuda/lgm_cuda.cu) on torch's current
stream, with the GEMMs by torch (cuBLAS) and scratch memory from torch's caching allocator. Data
checks (labels in range, finite log-variances) follow ``lsoftmax.torch.set_label_check``: "sync"
(default) reads a device flag after the forward (one small copy, which waits for the stream) and
raises the CPU path's ValueError, "async" asserts on the device, "off" checks nothing.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lsoftmax import _core
from lsoftmax.torch import _kernels
from lsoftmax.torch import ops as _ops  # noqa: F401  (registers lsoftmax::schedule_lambda)

__all__ = ["lgm_backward", "lgm_logits", "lgm_margin_logits"]


def _np(t: Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().numpy()


def _on_cuda(t: Tensor) -> bool:
    """True for CUDA tensors, False for CPU ones; other devices have no kernel."""
    if t.device.type == "cpu":
        return False
    if t.device.type == "cuda":
        return True
    raise NotImplementedError(
        f"lsoftmax's L-GM kernels run on the CPU and on CUDA devices; got a tensor on {t.device}"
    )


def _prepare(means: Tensor, log_var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    offset, precision, scaled = _core.lgm_prepare(
        _np(means), _np(log_var), torch_pool=_kernels.TORCH_OPS
    )
    return torch.from_numpy(offset), torch.from_numpy(precision), torch.from_numpy(scaled)


def _forward(
    x: Tensor,
    means: Tensor,
    log_var: Tensor,
    labels: Tensor | None,
    alpha: float,
    include_logdet: bool,
) -> tuple[Tensor, Tensor]:
    if _on_cuda(x):
        return _cuda_forward(x, means, log_var, labels, alpha, include_logdet)
    offset, precision, scaled = _prepare(means, log_var)
    xc = x - offset
    logits = torch.mm(xc, scaled.t())
    sq = torch.mm(xc * xc, precision.t()) if log_var.shape[1] == x.shape[1] else None
    loglik = x.new_empty(x.shape[0])
    _core.lgm_forward_(
        _np(logits),
        _np(loglik),
        _np(x),
        _np(means),
        _np(log_var),
        _np(offset),
        _np(sq),
        _np(labels),
        alpha,
        include_logdet,
        torch_pool=_kernels.TORCH_OPS,
    )
    return logits, loglik


# --- CUDA -----------------------------------------------------------------------------------
# The same steps as the CPU path above, on the device: _core.cuda_lgm_* take raw pointers,
# shapes and strides (lsoftmax/torch/_kernels.py marshals them as for the L-Softmax kernels).

_BAD_LABEL, _BAD_LOG_VAR = 1, 2  # the bits the kernels OR into the error flag (lgm_cuda.h)


def _opt_mat(name: str, t: Tensor | None) -> tuple[int, int, int, int, int, str] | None:
    return None if t is None else _kernels._mat(name, t)


def _opt_vec(t: Tensor | None) -> tuple[int, int, int, str] | None:
    return None if t is None else _kernels._vec(t)


@functools.lru_cache(maxsize=64)
def _cuda_workspace_bytes(device: int, n: int, c: int, d: int, dv: int) -> int:
    # A pure function of its arguments (CUB's sort storage on this device), cached so that the
    # hot path does not ask CUB every step.
    del device
    return int(_core.cuda_lgm_backward_workspace_size(n, c, d, dv))


def _flag_message(flag_value: int, labels: Tensor | None, log_var: Tensor, c: int) -> str:
    # Error path only: name the first bad entry on the host, as the CPU core does.
    if flag_value & _BAD_LABEL and labels is not None:
        return _kernels._bad_label_message(labels, c)
    bad = (~torch.isfinite(log_var.detach().cpu())).nonzero()
    if bad.numel():
        k, j = (int(v) for v in bad[0])
        return f"log_var[{k}, {j}] is not finite"
    return f"the L-GM CUDA kernels flagged bad input (flag {flag_value})"


def _report(
    flag: Tensor | None, labels: Tensor | None, log_var: Tensor, c: int, sync: bool
) -> None:
    if flag is None:
        return
    if (
        sync
        and _kernels.get_label_check() == "sync"
        and not torch.cuda.is_current_stream_capturing()
    ):
        value = int(flag.item())
        if value != 0:
            raise ValueError(_flag_message(value, labels, log_var, c))
        return
    torch._assert_async(flag == 0)


def _cuda_prepare(
    means: Tensor, log_var: Tensor, flag: Tensor | None, stream: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c, d = means.shape
    offset = means.new_empty(d)
    precision = log_var.new_empty(log_var.shape)
    scaled = means.new_empty(means.shape)
    terms = torch.empty(_core.cuda_lgm_class_terms_bytes(c), dtype=torch.uint8, device=means.device)
    _core.cuda_lgm_prepare(
        _kernels._mat("means", means),
        _kernels._mat("log_var", log_var),
        offset.data_ptr(),
        _kernels._mat("precision", precision),
        _kernels._mat("scaled_means", scaled),
        terms.data_ptr(),
        error_flag=_kernels._ptr(flag),
        stream=stream,
    )
    return offset, precision, scaled, terms


def _cuda_forward(
    x: Tensor,
    means: Tensor,
    log_var: Tensor,
    labels: Tensor | None,
    alpha: float,
    include_logdet: bool,
) -> tuple[Tensor, Tensor]:
    _kernels._same_device(x, means=means, log_var=log_var)
    if labels is not None:
        _kernels._same_device(x, labels=labels)
    dev = x.device
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        flag = _kernels._new_flag(dev)
        offset, precision, scaled, terms = _cuda_prepare(means, log_var, flag, stream)
        xc = x - offset
        logits = torch.mm(xc, scaled.t())
        sq = torch.mm(xc * xc, precision.t()) if log_var.shape[1] == x.shape[1] else None
        loglik = x.new_empty(x.shape[0])
        _core.cuda_lgm_forward_(
            _kernels._mat("x", x),
            _kernels._mat("means", means),
            _kernels._mat("log_var", log_var),
            offset.data_ptr(),
            terms.data_ptr(),
            _opt_mat("sq_term", sq),
            _opt_vec(labels),
            _kernels._mat("logits", logits),
            loglik.data_ptr(),
            alpha,
            include_logdet,
            error_flag=_kernels._ptr(flag),
            stream=stream,
        )
        _report(flag, labels, log_var, means.shape[0], sync=True)
    return logits, loglik


def _cuda_backward(
    grad_logits: Tensor,
    grad_loglik: Tensor,
    logits: Tensor,
    x: Tensor,
    means: Tensor,
    log_var: Tensor,
    labels: Tensor | None,
    alpha: float,
    include_logdet: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    _kernels._same_device(x, grad_logits=grad_logits, logits=logits, means=means, log_var=log_var)
    if labels is not None:
        _kernels._same_device(x, labels=labels)
    dev = x.device
    n, c = grad_logits.shape
    d, dv = x.shape[1], log_var.shape[1]
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        flag = _kernels._new_flag(dev)
        offset, precision, scaled, terms = _cuda_prepare(means, log_var, flag, stream)
        nbytes = _cuda_workspace_bytes(dev.index or 0, n, c, d, dv)
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        coeff = grad_logits.new_empty((n, c))
        colsum, grad_h = x.new_empty(c), x.new_empty(c)
        own = x.new_empty(n)
        cls = torch.empty(n, dtype=torch.int64, device=dev)
        gll = grad_loglik.contiguous()
        _core.cuda_lgm_backward_coeffs(
            _kernels._mat("grad_logits", grad_logits),
            gll.data_ptr(),
            _kernels._mat("logits", logits),
            terms.data_ptr(),
            _opt_vec(labels),
            alpha,
            include_logdet,
            _kernels._mat("coeff", coeff),
            colsum.data_ptr(),
            grad_h.data_ptr(),
            own.data_ptr(),
            cls.data_ptr(),
            workspace.data_ptr(),
            nbytes,
            error_flag=_kernels._ptr(flag),
            stream=stream,
        )
        xc = x - offset
        sq = xc * xc
        if dv != d:
            sq = sq.sum(dim=1, keepdim=True)
        coeff_t = coeff.t()
        grad_x = x.new_empty((n, d))
        grad_means = means.new_empty(means.shape)
        grad_log_var = log_var.new_empty(log_var.shape)
        _core.cuda_lgm_backward_assemble(
            _kernels._mat("x", x),
            _kernels._mat("means", means),
            _kernels._mat("log_var", log_var),
            offset.data_ptr(),
            colsum.data_ptr(),
            grad_h.data_ptr(),
            own.data_ptr(),
            cls.data_ptr(),
            _kernels._mat("wp", torch.mm(coeff, precision)),
            _kernels._mat("wmp", torch.mm(coeff, scaled)),
            _kernels._mat("wtx", torch.mm(coeff_t, xc)),
            _kernels._mat("wtx2", torch.mm(coeff_t, sq)),
            _kernels._mat("grad_x", grad_x),
            _kernels._mat("grad_means", grad_means),
            _kernels._mat("grad_log_var", grad_log_var),
            workspace.data_ptr(),
            nbytes,
            error_flag=_kernels._ptr(flag),
            stream=stream,
        )
        _report(flag, labels, log_var, c, sync=False)
    return grad_x, grad_means, grad_log_var


def _fake(x: Tensor, means: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty((x.shape[0], means.shape[0])), x.new_empty((x.shape[0],))


@torch.library.custom_op("lsoftmax::lgm_backward", mutates_args=())
def lgm_backward(
    grad_logits: Tensor,
    grad_loglik: Tensor,
    logits: Tensor,
    x: Tensor,
    means: Tensor,
    log_var: Tensor,
    labels: Tensor | None,
    alpha: Tensor,
    include_logdet: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if _on_cuda(x):
        return _cuda_backward(
            grad_logits,
            grad_loglik,
            logits,
            x,
            means,
            log_var,
            labels,
            float(alpha.item()),
            include_logdet,
        )
    offset, precision, scaled = _prepare(means, log_var)
    coeff, colsum, grad_h, own, cls = (
        torch.from_numpy(a)
        for a in _core.lgm_backward_coeffs(
            _np(grad_logits),
            _np(grad_loglik.contiguous()),
            _np(logits),
            _np(log_var),
            x.shape[1],
            _np(labels),
            float(alpha.item()),
            include_logdet,
            torch_pool=_kernels.TORCH_OPS,
        )
    )
    xc = x - offset
    sq = xc * xc
    if log_var.shape[1] != x.shape[1]:
        sq = sq.sum(dim=1, keepdim=True)
    coeff_t = coeff.t()
    grads = _core.lgm_backward_assemble(
        _np(x),
        _np(means),
        _np(log_var),
        _np(offset),
        _np(colsum),
        _np(grad_h),
        _np(own),
        _np(cls),
        _np(torch.mm(coeff, precision)),
        _np(torch.mm(coeff, scaled)),
        _np(torch.mm(coeff_t, xc)),
        _np(torch.mm(coeff_t, sq)),
        torch_pool=_kernels.TORCH_OPS,
    )
    return tuple(torch.from_numpy(g) for g in grads)  # type: ignore[return-value]


@lgm_backward.register_fake
def _(grad_logits, grad_loglik, logits, x, means, log_var, labels, alpha, include_logdet):
    return torch.empty_like(x), torch.empty_like(means), torch.empty_like(log_var)


def _setup(ctx: Any, x, means, log_var, labels, alpha: Tensor, include_logdet, output) -> None:
    ctx.save_for_backward(x, means, log_var, labels, output[0], alpha)
    ctx.include_logdet = include_logdet


def _backward(ctx: Any, grad_logits: Tensor, grad_loglik: Tensor) -> tuple[Any, ...]:
    x, means, log_var, labels, logits, alpha = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:3]):
        return None, None, None
    gx, gm, glv = torch.ops.lsoftmax.lgm_backward(
        grad_logits.contiguous(),
        grad_loglik,
        logits,
        x,
        means,
        log_var,
        labels,
        alpha,
        ctx.include_logdet,
    )
    need = ctx.needs_input_grad
    return (gx if need[0] else None), (gm if need[1] else None), (glv if need[2] else None)


# --- lsoftmax::lgm_logits (float alpha) ----------------------------------------------------


@torch.library.custom_op("lsoftmax::lgm_logits", mutates_args=())
def lgm_logits(
    x: Tensor,
    means: Tensor,
    log_var: Tensor,
    labels: Tensor | None,
    alpha: float,
    include_logdet: bool,
) -> tuple[Tensor, Tensor]:
    return _forward(x, means, log_var, labels, alpha, include_logdet)


@lgm_logits.register_fake
def _(x, means, log_var, labels, alpha, include_logdet):
    return _fake(x, means)


def _logits_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, means, log_var, labels, alpha, include_logdet = inputs
    _setup(
        ctx,
        x,
        means,
        log_var,
        labels,
        torch.tensor(float(alpha), dtype=torch.float64),
        include_logdet,
        output,
    )


def _logits_backward(ctx: Any, grad_logits: Tensor, grad_loglik: Tensor) -> tuple[Any, ...]:
    return (*_backward(ctx, grad_logits, grad_loglik), None, None, None)


lgm_logits.register_autograd(_logits_backward, setup_context=_logits_setup)


# --- lsoftmax::lgm_margin_logits (tensor alpha) ---------------------------------------------


@torch.library.custom_op("lsoftmax::lgm_margin_logits", mutates_args=())
def lgm_margin_logits(
    x: Tensor, means: Tensor, log_var: Tensor, labels: Tensor, alpha: Tensor, include_logdet: bool
) -> tuple[Tensor, Tensor]:
    return _forward(x, means, log_var, labels, float(alpha.item()), include_logdet)


@lgm_margin_logits.register_fake
def _(x, means, log_var, labels, alpha, include_logdet):
    return _fake(x, means)


def _margin_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, means, log_var, labels, alpha, include_logdet = inputs
    _setup(ctx, x, means, log_var, labels, alpha, include_logdet, output)


lgm_margin_logits.register_autograd(_logits_backward, setup_context=_margin_setup)

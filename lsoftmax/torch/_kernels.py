"""Device dispatch from torch tensors to the core's per-row kernels (in place).

The CPU path hands numpy views (no copies) to ``lsoftmax._core``. The CUDA path hands raw
device pointers, shapes and strides and torch's current stream to ``_core.cuda_*``: no host sync
(except the label check below), no allocation outside torch's caching allocator, so the ops can be
captured in CUDA graphs.

Settings (re-exported by :mod:`lsoftmax.torch`):

- ``set_deterministic(True | False | None)``: the CUDA backward sums the ``grad_weight`` rows that
  several samples share in a fixed order (a sort by class in a torch-allocated workspace) instead
  of with atomics. ``None`` (the default) follows ``torch.are_deterministic_algorithms_enabled()``.
  float16/bfloat16 always take the fixed-order path (it sums in float32).
- ``set_label_check("sync" | "async" | "off")``: how the CUDA forward reports labels outside
  ``[0, num_classes)``; the kernels themselves never touch memory for such rows and set a device
  flag. ``"sync"`` (default) reads that flag after the forward kernel (one 4-byte copy, which
  waits for the stream) and raises the same ValueError as the CPU path; during CUDA-graph capture
  it acts as ``"async"``. ``"async"`` never syncs: a bad label fires a device-side assert
  (``torch._assert_async``), which, as for torch's own ``cross_entropy``, ruins the CUDA context.
  ``"off"`` passes no flag at all (no extra launches; bad rows keep their plain logits and get no
  margin gradient, unreported). The backward uses the async assert (its labels are the ones the
  forward already checked), or nothing with ``"off"``.

Lambda: a float, or a 0-d tensor. A CUDA tensor stays on the device: the kernels read it when
they run (no ``.item()``, so a schedule evaluated on the device by ``schedule_lambda_cuda`` feeds
them without a host sync and the whole step can be captured in a CUDA graph). A negative or NaN
device lambda is reported through the same flag as a bad label (``ValueError`` with the ``"sync"``
check, the device assert with ``"async"``) and makes the margin outputs NaN.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import torch

from lsoftmax import _core

_CUDA_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
_CUDA_LABELS = {torch.int32: "int32", torch.int64: "int64"}
_LABEL_CHECKS = ("sync", "async", "off")
_settings: dict[str, object] = {"deterministic": None, "label_check": "sync"}


def set_deterministic(mode: bool | None) -> None:
    """Fixed-order (True) or atomic (False) grad_weight sums on CUDA; None follows torch."""
    if mode is not None and not isinstance(mode, bool):
        raise TypeError(f"mode must be a bool or None, got {mode!r}")
    _settings["deterministic"] = mode


def deterministic_enabled() -> bool:
    mode = _settings["deterministic"]
    return torch.are_deterministic_algorithms_enabled() if mode is None else bool(mode)


def set_label_check(mode: str) -> None:
    """How the CUDA forward reports out-of-range labels: "sync", "async" or "off"."""
    if mode not in _LABEL_CHECKS:
        raise ValueError(f"mode must be one of {_LABEL_CHECKS}, got {mode!r}")
    _settings["label_check"] = mode


def get_label_check() -> str:
    return str(_settings["label_check"])


def _load_torch_ops() -> bool:
    """Loads lsoftmax/_torch_ops.so (the core through torch's dispatcher, its loops on torch's
    intra-op pool) when the build made it; otherwise the CPU path uses the numpy module."""
    path = Path(_core.__file__).with_name("_torch_ops.so")
    if not path.is_file():
        return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:  # e.g. built against another torch than this one
        warnings.warn(
            f"lsoftmax: could not load {path.name} ({e}); CPU tensors go through the numpy "
            "module instead (slower per call, loops on the core's own pool)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    # The numpy module's bindings that this package calls with torch_pool=True (the fused
    # loss's block kernels, the L-GM steps) then run their loops on torch's intra-op pool.
    _core.set_torch_parallel_for(int(torch.ops.lsoftmax_cpu.parallel_for_address()))
    return True


#: True when the libtorch extension is loaded (``torch.ops.lsoftmax_cpu``); then ``torch_pool``
#: calls of ``lsoftmax._core`` run on torch's intra-op pool instead of the core's own.
TORCH_OPS = _load_torch_ops()


def _load_torch_entry() -> Any:
    """lsoftmax._torch_entry (the scheduled head's training forward as one CPython call), or
    None where the build has no such module or the ops it calls did not load."""
    if not TORCH_OPS:
        return None
    try:
        from lsoftmax import _torch_entry  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _torch_entry


#: ``lsoftmax._torch_entry`` when it is built and the libtorch extension loaded, else None.
TORCH_ENTRY = _load_torch_entry()


def _np(t: torch.Tensor):
    return t.detach().numpy()


def _unsupported(t: torch.Tensor) -> None:
    raise NotImplementedError(
        f"lsoftmax has no kernel for tensors on device {t.device}; "
        "move them to the CPU (or build with CUDA for cuda tensors)"
    )


def _host_lambda(lam: float | torch.Tensor) -> float:
    return float(lam.item()) if isinstance(lam, torch.Tensor) else lam


def margin_forward_(
    logits: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: int,
    lam: float | torch.Tensor,
    return_stats: bool = False,
) -> dict[str, Any] | None:
    """``logits`` holds ``x @ weight.T``; rewrites the target logit of every row.

    With ``return_stats`` (CPU only) returns the per-row norms, cosines and segments, which
    ``margin_backward_`` takes back to skip recomputing them.
    """
    if logits.device.type == "cpu":
        if TORCH_OPS and not return_stats:
            torch.ops.lsoftmax_cpu.margin_forward_(
                logits, x, weight, labels, margin, _host_lambda(lam)
            )
            return None
        return _core.margin_forward_(
            _np(logits), _np(x), _np(weight), _np(labels), margin, _host_lambda(lam), return_stats
        )
    if return_stats:
        raise ValueError("return_stats is only available for CPU tensors")
    if logits.device.type == "cuda":
        _cuda_forward_(logits, x, weight, labels, margin, lam)
    else:
        _unsupported(logits)
    return None


def margin_backward_(
    grad_logits: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    grad_x: torch.Tensor,
    grad_weight: torch.Tensor,
    margin: int,
    lam: float | torch.Tensor,
    stats: dict[str, Any] | None = None,
) -> None:
    """``grad_x``/``grad_weight`` hold the plain GEMM gradients; adds the margin terms."""
    if grad_logits.device.type == "cpu" and TORCH_OPS and stats is None:
        torch.ops.lsoftmax_cpu.margin_backward_(
            grad_logits, x, weight, labels, grad_x, grad_weight, margin, _host_lambda(lam)
        )
    elif grad_logits.device.type == "cpu":
        _core.margin_backward_(
            _np(grad_logits),
            _np(x),
            _np(weight),
            _np(labels),
            _np(grad_x),
            _np(grad_weight),
            margin,
            _host_lambda(lam),
            stats,
        )
    elif grad_logits.device.type == "cuda":
        _cuda_backward_(grad_logits, x, weight, labels, grad_x, grad_weight, margin, lam)
    else:
        _unsupported(grad_logits)


# --- CUDA -------------------------------------------------------------------------------------


def _cuda_dtype(name: str, t: torch.Tensor) -> str:
    dt = _CUDA_DTYPES.get(t.dtype)
    if dt is None:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    return dt


def _mat(name: str, t: torch.Tensor) -> tuple[int, int, int, int, int, str]:
    rows, cols = t.shape
    return (t.data_ptr(), rows, cols, t.stride(0), t.stride(1), _cuda_dtype(name, t))


def _vec(t: torch.Tensor) -> tuple[int, int, int, str]:
    dt = _CUDA_LABELS.get(t.dtype)
    if dt is None:
        raise TypeError(f"labels must be int32 or int64, got {t.dtype}")
    return (t.data_ptr(), t.shape[0], t.stride(0), dt)


def _same_device(ref: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but the op runs on {ref.device}")


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _new_flag(device: torch.device) -> torch.Tensor | None:
    """A zeroed device error flag for the kernels to raise, or None when label checks are off."""
    if _settings["label_check"] == "off":
        return None
    return torch.zeros((), dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=64)
def _workspace_bytes(device: int, n: int, c: int, dtype: str, deterministic: bool) -> int:
    # Pure function of its arguments (CUB's sort storage for this device); cached so the hot
    # path does not ask CUB every step.
    del device
    return int(_core.cuda_backward_workspace_size(n, c, dtype, deterministic))


def _bad_label_message(labels: torch.Tensor, num_classes: int) -> str:
    # Error path only: find the first bad label on the host, worded as the CPU core words it.
    host = labels.detach().cpu()
    bad = ((host < 0) | (host >= num_classes)).nonzero()
    if bad.numel() == 0:
        return f"labels has entries out of range [0, {num_classes})"
    i = int(bad[0, 0])
    return f"labels[{i}] = {int(host[i])} is out of range [0, {num_classes})"


def _device_lambda(
    lam: float | torch.Tensor, device: torch.device
) -> tuple[float, torch.Tensor | None]:
    """(host value, device float64 tensor or None): a CUDA lambda is passed by address."""
    if not isinstance(lam, torch.Tensor):
        return lam, None
    if lam.device.type != "cuda":
        return float(lam.item()), None
    if lam.device != device:
        raise ValueError(f"lam is on {lam.device} but the op runs on {device}")
    if lam.numel() != 1:
        raise ValueError(f"lam must be a 0-d tensor, got shape {tuple(lam.shape)}")
    return 0.0, lam if lam.dtype == torch.float64 else lam.to(torch.float64)


def _report_labels(
    flag: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    sync: bool,
    lam: torch.Tensor | None = None,
) -> None:
    mode = _settings["label_check"]
    if sync and mode == "sync" and not torch.cuda.is_current_stream_capturing():
        value = int(flag.item())
        if lam is not None and value & _core.cuda_flag_bad_lambda:
            raise ValueError(f"lambda must be >= 0 (and not NaN), got {float(lam.item())}")
        if value != 0:
            raise ValueError(_bad_label_message(labels, num_classes))
        return
    torch._assert_async(flag == 0)


def _cuda_forward_(
    logits: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: int,
    lam: float | torch.Tensor,
) -> None:
    _same_device(logits, x=x, weight=weight, labels=labels)
    lam_value, lam_dev = _device_lambda(lam, logits.device)
    with torch.cuda.device(logits.device):
        flag = _new_flag(logits.device)
        _core.cuda_margin_forward_(
            _mat("logits", logits),
            _mat("x", x),
            _mat("weight", weight),
            _vec(labels),
            margin,
            lam_value,
            error_flag=_ptr(flag),
            stream=torch.cuda.current_stream(logits.device).cuda_stream,
            check_labels=flag is not None,
            lam_ptr=_ptr(lam_dev),
        )
        if flag is not None:
            _report_labels(flag, labels, weight.shape[0], sync=True, lam=lam_dev)


def _cuda_backward_(
    grad_logits: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    grad_x: torch.Tensor,
    grad_weight: torch.Tensor,
    margin: int,
    lam: float | torch.Tensor,
) -> None:
    dev = grad_logits.device
    _same_device(grad_logits, x=x, weight=weight, labels=labels, grad_x=grad_x)
    _same_device(grad_logits, grad_weight=grad_weight)
    lam_value, lam_dev = _device_lambda(lam, dev)
    deterministic = deterministic_enabled()
    with torch.cuda.device(dev):
        n, c = grad_logits.shape
        nbytes = 0
        if margin > 1 and (deterministic or x.dtype in (torch.float16, torch.bfloat16)):
            nbytes = _workspace_bytes(dev.index or 0, n, c, _cuda_dtype("x", x), deterministic)
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=dev) if nbytes else None
        flag = _new_flag(dev)
        _core.cuda_margin_backward_(
            _mat("grad_logits", grad_logits),
            _mat("x", x),
            _mat("weight", weight),
            _vec(labels),
            _mat("grad_x", grad_x),
            _mat("grad_weight", grad_weight),
            margin,
            lam_value,
            deterministic=deterministic,
            workspace=_ptr(workspace),
            workspace_bytes=nbytes,
            error_flag=_ptr(flag),
            stream=torch.cuda.current_stream(dev).cuda_stream,
            check_labels=flag is not None,
            lam_ptr=_ptr(lam_dev),
        )
        if flag is not None:
            _report_labels(flag, labels, c, sync=False)


def schedule_lambda_cuda(step: torch.Tensor, kind: str, params: list[float]) -> torch.Tensor:
    """A schedule's value at a CUDA step counter, as a 0-d float64 tensor on the same device,
    computed there by the core (one thread on torch's current stream: no host sync)."""
    if step.numel() != 1:
        raise ValueError(f"step must be a 0-d tensor, got shape {tuple(step.shape)}")
    if step.dtype != torch.int64:  # the CPU path's int(step.item()) truncates the same way
        step = step.to(torch.int64)
    with torch.cuda.device(step.device):
        out = torch.empty((), dtype=torch.float64, device=step.device)
        _core.cuda_schedule_value_(
            kind,
            [float(p) for p in params],
            step.data_ptr(),
            out.data_ptr(),
            stream=torch.cuda.current_stream(step.device).cuda_stream,
        )
    return out


# --- the margin family's per-row target math ----------------------------------------------------


def margin_family_targets(
    kind: str, params: list[float], lam: float | torch.Tensor, cos_theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phi, dphi)``: the kind's target function and its derivative at each cosine, by the core
    (float32 for 16-bit cosines; a CUDA lambda tensor is read on the device)."""
    c = cos_theta.detach()
    if c.dtype not in (torch.float32, torch.float64):
        c = c.float()
    c = c.contiguous()
    if c.device.type == "cpu":
        phi, dphi = _core.margin_family_targets(
            kind, params, _host_lambda(lam), c.numpy(), torch_pool=TORCH_OPS
        )
        return torch.from_numpy(phi), torch.from_numpy(dphi)
    if c.device.type != "cuda":
        _unsupported(c)
    lam_value, lam_dev = _device_lambda(lam, c.device)
    phi = torch.empty_like(c)
    dphi = torch.empty_like(c)
    with torch.cuda.device(c.device):
        flag = _new_flag(c.device) if lam_dev is not None else None
        _core.cuda_margin_family_targets_(
            kind,
            [float(v) for v in params],
            lam_value,
            c.data_ptr(),
            c.shape[0],
            "float64" if c.dtype == torch.float64 else "float32",
            phi.data_ptr(),
            dphi.data_ptr(),
            stream=torch.cuda.current_stream(c.device).cuda_stream,
            lam_ptr=_ptr(lam_dev),
            error_flag=_ptr(flag),
        )
        if flag is not None:
            _report_labels(flag, torch.zeros(0, dtype=torch.int64), 1, sync=True, lam=lam_dev)
    return phi, dphi

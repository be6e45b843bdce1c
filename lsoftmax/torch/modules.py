"""The margin heads as modules with a lambda schedule: ``LSoftmaxLinear`` (L-Softmax) and
``MarginLinear`` (any kind of ``lsoftmax.margins``), on one base."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lsoftmax.margins import ArcFace, Margin, default_schedule, margin_from_dict
from lsoftmax.schedules import Exponential, Schedule
from lsoftmax.torch import ops
from lsoftmax.torch.checks import _FLOATS, _LABELS
from lsoftmax.torch.functional import check_inputs, check_margin, checked_logits, family_logits
from lsoftmax.torch.scheduled import ScheduledStep

__all__ = ["LSoftmaxLinear", "MarginLinear"]

# Under autocast, the dtypes autocast would cast (float64 is left alone, as nn.Linear's is).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


class _MarginHead(ScheduledStep):
    """What the margin heads share: the weight (Caffe's "msra" init), ``(*, in_features)``
    inputs, autocast, the step counter and schedule. Subclasses define ``_logits``."""

    def _init_head(
        self,
        in_features: int,
        out_features: int,
        schedule: Schedule,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features = in_features
        self.out_features = out_features
        self._init_scheduled(schedule, device)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype)
        )
        self.reset_parameters()

    schedule = property(ScheduledStep._get_schedule, ScheduledStep._set_schedule)

    def reset_parameters(self) -> None:
        # Caffe's "msra" filler: N(0, 2 / fan_in).
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / self.in_features))

    @property
    def current_lambda(self) -> float:
        """Lambda of the latest counted step (before any: the one the first will use).

        Reads the step counter on the host (a sync when the module is on a GPU): for progress
        bars and logs. The training forward itself evaluates lambda where the step lives.
        """
        return self._latest_value()

    def forward(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        if self._native_training and self.training and target is not None:
            logits = self._native_training_forward(x, target)
            if logits is not None:
                return logits
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 2:
            return self._forward_2d(x, target)
        if x.dim() == 0:
            raise ValueError("x must have shape (*, in_features), got a 0-d tensor")
        lead = tuple(x.shape[:-1])
        if isinstance(target, Tensor) and tuple(target.shape) != lead:
            raise ValueError(
                f"target must have shape {lead} (the leading dims of x, shape "
                f"{tuple(x.shape)}), got {tuple(target.shape)}"
            )
        flat_target = target.reshape(-1) if isinstance(target, Tensor) else target
        out = self._forward_2d(x.reshape(-1, x.shape[-1]), flat_target)
        return out.reshape(*lead, self.out_features)

    def _forward_2d(self, x: Tensor, target: Tensor | None) -> Tensor:
        device_type = x.device.type
        if (
            torch.is_autocast_enabled(device_type)
            and x.dtype in _AUTOCAST_ELIGIBLE
            and self.weight.dtype in _AUTOCAST_ELIGIBLE
        ):
            out_dtype = torch.get_autocast_dtype(device_type)
            # The CPU core has float32/float64 kernels only; CUDA's take 16-bit inputs.
            dtype = out_dtype if device_type == "cuda" else torch.float32
            with torch.autocast(device_type, enabled=False):
                return self._logits(x.to(dtype), self.weight.to(dtype), target).to(out_dtype)
        return self._logits(x, self.weight, target)

    def _logits(self, x: Tensor, weight: Tensor, target: Tensor | None) -> Tensor:
        check_inputs(x, weight, target)
        if not (self.training and target is not None):
            return self._margin_logits(x, weight, None, 0.0, None)
        eager = ops.eager_cpu(x, weight, target, self.step)
        if eager:
            logits = self._eager_training_logits(x, weight, target)
            if logits is not None:
                return logits
        return self._margin_logits(x, weight, target, self._scheduled_value(eager), eager)

    # Whether _eager_training_logits has a native call (set by the heads that have one).
    _native_training = False

    def _eager_training_logits(self, x: Tensor, weight: Tensor, target: Tensor) -> Tensor | None:
        """The eager CPU training logits in one native call (lambda and the counter included),
        for heads that have one; None: take the general path."""
        return None

    def _native_training_forward(self, x: Tensor, target: Tensor) -> Tensor | None:
        """The common training call (2-D float CPU ``x``, CPU labels, no autocast, nothing
        tracing) straight to ``_eager_training_logits``; None: take the general path, which
        checks everything and words the errors. The general path's Python is a measurable part
        of the step at small C (docs/benchmarks.md, the split's "module's Python"). Each
        condition here is one the general path would check anyway."""
        weight, step = self._parameters["weight"], self._buffers["step"]
        if not (
            type(x) is Tensor
            and type(step) is Tensor
            and step.is_cpu
            and type(target) is Tensor
            and type(weight) is nn.Parameter
            and x.is_cpu
            and weight.is_cpu
            and target.is_cpu
            and x.dtype is weight.dtype
            and x.dtype in _FLOATS
            and target.dtype in _LABELS
            and x.dim() == 2
            and weight.dim() == 2
            and target.dim() == 1
            and x.shape[1] == weight.shape[1]
            and target.shape[0] == x.shape[0]
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()
        ):
            return None
        return self._eager_training_logits(x, weight, target)

    def _margin_logits(
        self,
        x: Tensor,
        weight: Tensor,
        target: Tensor | None,
        lam: float | Tensor,
        eager: bool | None,
    ) -> Tensor:
        """The head's logits for checked inputs (``eager``: ``ops.eager_cpu`` of them, or None)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"margin={self.margin}, schedule={self.schedule}"
        )


class LSoftmaxLinear(_MarginHead):
    """Linear layer (no bias) whose training logits carry the L-Softmax margin.

    In training mode with a target it returns the margin logits, using the schedule's lambda at
    the module's step counter. In eval mode, or with no target, it returns the plain logits
    ``x @ weight.T``. Like ``nn.Linear`` it takes ``x`` of shape ``(*, in_features)``, with the
    target shaped like the leading dims ``*``, and returns ``(*, out_features)``.

    The step counter advances on grad-enabled training forwards, or on ``optimizer.step()`` after
    ``attach(optimizer)`` (gradient accumulation, DDP); see ``lsoftmax.torch.scheduled``. The
    counter is a buffer and the schedule and margin are the module's extra state, so both are in
    the ``state_dict``: loading one into a default-constructed head restores lambda exactly.

    Under ``torch.autocast`` the output has the autocast dtype, like ``nn.Linear``'s; the margin
    is computed in float32 (on CPU the whole layer runs in float32, the core having no 16-bit
    kernels, and the result is rounded; on CUDA the kernels take the 16-bit inputs and do their
    per-row math in float32).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        margin: int = 4,
        schedule: Schedule | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        margin = check_margin(margin)
        self._init_head(
            in_features,
            out_features,
            schedule if schedule is not None else Exponential(),
            device,
            dtype,
        )
        self.margin = margin

    def _margin_logits(
        self,
        x: Tensor,
        weight: Tensor,
        target: Tensor | None,
        lam: float | Tensor,
        eager: bool | None,
    ) -> Tensor:
        return checked_logits(x, weight, target, self.margin, lam, eager)

    _native_training = ops.SCHEDULED_MARGIN_LINEAR is not None

    def _native_training_forward(self, x: Tensor, target: Tensor) -> Tensor | None:
        native = ops.NATIVE_SCHEDULED_MARGIN_LINEAR
        if native is None:
            return super()._native_training_forward(x, target)
        # The per-tensor conditions are checked natively (None where one fails); what is global
        # to the process is checked here.
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            return None
        return native(  # type: ignore[no-any-return]
            x,
            self._parameters["weight"],
            target,
            self.margin,
            self._buffers["step"],
            self._schedule.kind,
            self._schedule_params,
            self._counts_this_forward(),
        )

    def _eager_training_logits(self, x: Tensor, weight: Tensor, target: Tensor) -> Tensor | None:
        if ops.SCHEDULED_MARGIN_LINEAR is None:
            return None
        # Evaluated first: it may warn (DDP), and the op advances the counter only if it counts.
        count = self._counts_this_forward()
        return ops.SCHEDULED_MARGIN_LINEAR(
            x, weight, target, self.margin, self.step, self._schedule.kind,
            self._schedule_params, count,
        )

    def _state_fields(self) -> dict[str, Any]:
        return {**super()._state_fields(), "margin": self.margin}

    def _load_state_fields(self, fields: dict[str, Any]) -> None:
        margin = check_margin(fields.get("margin", self.margin))
        super()._load_state_fields(fields)
        self.margin = margin


class MarginLinear(_MarginHead):
    """Linear layer (no bias) whose training logits carry a margin of ``lsoftmax.margins``.

    ``margin`` is a spec (``ArcFace(0.5, 64.0)`` by default; ``SphereFace``, ``CosFace``,
    ``LSoftmax``, ...). In training mode with a target it returns the margin logits; in eval
    mode, or with no target, the kind's plain logits: ``x @ weight.T`` (L-Softmax),
    ``|x| cos theta_j`` (SphereFace) or ``s cos theta_j`` (the cosine kinds, which normalize the
    features and the weights). ``schedule`` is the lambda schedule of the kinds that blend
    (``margin.uses_lambda``); without one, ``lsoftmax.margins.default_schedule(margin)``.

    Everything else is ``LSoftmaxLinear``'s: ``(*, in_features)`` inputs, the step counter
    (``attach``), the state dict (the margin spec is saved with the schedule), autocast.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        margin: Margin | None = None,
        schedule: Schedule | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        margin = ArcFace(0.5, 64.0) if margin is None else margin
        if not isinstance(margin, Margin):
            raise TypeError(f"margin must be a lsoftmax.margins.Margin, got {margin!r}")
        self._init_head(
            in_features,
            out_features,
            schedule if schedule is not None else default_schedule(margin),
            device,
            dtype,
        )
        self.margin = margin

    def _margin_logits(
        self,
        x: Tensor,
        weight: Tensor,
        target: Tensor | None,
        lam: float | Tensor,
        eager: bool | None,
    ) -> Tensor:
        return family_logits(x, weight, target, self.margin, lam)

    def _state_fields(self) -> dict[str, Any]:
        return {**super()._state_fields(), "margin": self.margin.to_dict()}

    def _load_state_fields(self, fields: dict[str, Any]) -> None:
        d = fields.get("margin")
        margin = self.margin if d is None else margin_from_dict(d)
        super()._load_state_fields(fields)
        self.margin = margin

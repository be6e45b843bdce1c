"""``LSoftmaxLinear``: the L-Softmax layer as a module with a lambda schedule."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lsoftmax.schedules import Exponential, Schedule
from lsoftmax.torch import ops
from lsoftmax.torch.functional import check_inputs, check_margin, checked_logits

__all__ = ["LSoftmaxLinear"]


class LSoftmaxLinear(nn.Module):
    """Linear layer (no bias) whose training logits carry the L-Softmax margin.

    In training mode with a target it returns the margin logits, using the schedule's lambda at
    the module's step counter, which then advances by one. In eval mode, or with no target, it
    returns the plain logits ``x @ weight.T``. The step counter is a buffer, so it is saved in the
    ``state_dict`` and a resumed run continues the same lambda sequence.
    """

    step: Tensor

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
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.margin = check_margin(margin)
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a lsoftmax.schedules.Schedule, got {schedule!r}")
        self.schedule: Schedule = schedule if schedule is not None else Exponential()
        self._schedule_params = self.schedule.params()
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype)
        )
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Caffe's "msra" filler: N(0, 2 / fan_in).
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / self.in_features))

    @property
    def current_lambda(self) -> float:
        """Lambda of the latest training forward (before any: the one the first will use).

        Reads the step counter on the host (a sync when the module is on a GPU): for progress
        bars and logs. The training forward itself evaluates lambda where the step lives.
        """
        return self.schedule.value(max(int(self.step) - 1, 0))

    def forward(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        check_inputs(x, self.weight, target)
        if not (self.training and target is not None):
            return checked_logits(x, self.weight, None, self.margin, 0.0)
        lam: float | Tensor
        if ops.eager_cpu(x, self.weight, target, self.step):
            lam = self.schedule.value(int(self.step))
        else:
            # A tensor op, so torch.compile needs no graph break and a GPU step no host sync.
            lam = torch.ops.lsoftmax.schedule_lambda(
                self.step, self.schedule.kind, self._schedule_params
            )
        self.step.add_(1)
        return checked_logits(x, self.weight, target, self.margin, lam)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"margin={self.margin}, schedule={self.schedule}"
        )

"""``LGMLoss`` and ``LGMClassifier``: the L-GM loss as a module with an alpha schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lsoftmax.schedules import Constant, Schedule
from lsoftmax.torch.lgm import ops as _ops  # noqa: F401  (registers the lsoftmax::lgm_* ops)
from lsoftmax.torch.lgm.functional import check_lgm_inputs
from lsoftmax.torch.scheduled import ScheduledStep

__all__ = ["LOG_VAR_FLOOR", "LGMClassifier", "LGMLoss"]

#: Default floor of the log-variance in ``LGMLoss``: variances never go below 1e-4.
LOG_VAR_FLOOR = math.log(1e-4)


def _positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _nonneg_float(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    return float(v)


class LGMLoss(ScheduledStep):
    """The large-margin Gaussian mixture loss (Wan et al., CVPR 2018) over a feature layer.

    Parameters: ``means`` (C, D) and ``log_var`` (C, D), or (C, 1) when ``isotropic``. The
    log-variance enters the ops clamped at ``log_var_floor`` (default ``log(1e-4)``), a hard
    clamp whose gradient is zero below the floor, so the variances cannot collapse to zero
    (the Gluon port's NaN loss) however hard the likelihood term pulls them down.

    ``forward(feat, target=None) -> (loss, logits)``:

    - training mode with a target: margin logits with the schedule's alpha at the module's step
      counter (which counts like ``LSoftmaxLinear``'s, see ``lsoftmax.torch.scheduled``) and
      ``loss = CE(logits, target) + lambda_lkd * mean_i (d_iy + 1/2 log|V_y|)``;
    - eval mode with a target: the same loss without the margin (alpha = 0), step unchanged;
    - no target: ``(None, logits)`` with alpha = 0.

    ``inference(feat) -> (logits, loglik)`` gives the log-likelihood of the predicted class, the
    score to threshold for out-of-distribution inputs (see ``LGMClassifier`` and docs/lgm.md).
    """

    schedule_name = "alpha_schedule"

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        alpha: float = 1.0,
        lambda_lkd: float = 0.1,
        isotropic: bool = False,
        learn_variance: bool = True,
        include_logdet: bool = True,
        alpha_schedule: Schedule | None = None,
        *,
        log_var_floor: float = LOG_VAR_FLOOR,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = _positive_int("num_classes", num_classes)
        self.feat_dim = _positive_int("feat_dim", feat_dim)
        self.lambda_lkd = _nonneg_float("lambda_lkd", lambda_lkd)
        self._init_scheduled(
            alpha_schedule
            if alpha_schedule is not None
            else Constant(_nonneg_float("alpha", alpha)),
            device,
        )
        self.isotropic = bool(isotropic)
        self.include_logdet = bool(include_logdet)
        if isinstance(log_var_floor, bool) or not isinstance(log_var_floor, (int, float)):
            raise TypeError("log_var_floor must be a float")
        if math.isnan(log_var_floor):
            raise ValueError("log_var_floor must not be NaN")
        self.log_var_floor = float(log_var_floor)
        self.means = nn.Parameter(torch.empty(num_classes, feat_dim, device=device, dtype=dtype))
        self.log_var = nn.Parameter(
            torch.zeros(num_classes, 1 if isotropic else feat_dim, device=device, dtype=dtype),
            requires_grad=bool(learn_variance),
        )
        self.reset_parameters()

    alpha_schedule = property(ScheduledStep._get_schedule, ScheduledStep._set_schedule)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.means, 0.0, 1.0)
        with torch.no_grad():
            self.log_var.zero_()

    def effective_log_var(self) -> Tensor:
        """The log-variance the ops see: ``log_var`` clamped at ``log_var_floor``."""
        return torch.clamp(self.log_var, min=self.log_var_floor)

    @property
    def variances(self) -> Tensor:
        """The variances in use, ``exp(effective_log_var())`` (no gradient)."""
        return self.effective_log_var().detach().exp()

    @property
    def current_alpha(self) -> float:
        """Alpha of the latest counted step (before any: the one the first will use)."""
        return self._latest_value()

    def forward(self, feat: Tensor, target: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
        log_var = self.effective_log_var()
        check_lgm_inputs(feat, self.means, log_var, target)
        if target is None:
            logits, _ = torch.ops.lsoftmax.lgm_logits(
                feat, self.means, log_var, None, 0.0, self.include_logdet
            )
            return None, logits
        if self.training:
            alpha = self._scheduled_value(eager=False)
            logits, loglik = torch.ops.lsoftmax.lgm_margin_logits(
                feat, self.means, log_var, target, alpha, self.include_logdet
            )
        else:
            logits, loglik = torch.ops.lsoftmax.lgm_logits(
                feat, self.means, log_var, target, 0.0, self.include_logdet
            )
        loss = F.cross_entropy(logits, target.long()) - self.lambda_lkd * loglik.mean()
        return loss, logits

    def inference(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, loglik)`` without margin; ``loglik`` is that of the predicted class."""
        log_var = self.effective_log_var()
        check_lgm_inputs(feat, self.means, log_var, None)
        return torch.ops.lsoftmax.lgm_logits(
            feat, self.means, log_var, None, 0.0, self.include_logdet
        )

    def param_groups(self, lr: float, var_lr_mult: float = 0.1) -> list[dict[str, Any]]:
        """Optimizer parameter groups: the means at ``lr``, the log-variances at
        ``lr * var_lr_mult`` (the Gluon port's ``lr_mult``); a frozen ``log_var`` is left out."""
        groups: list[dict[str, Any]] = [{"params": [self.means], "lr": lr}]
        if self.log_var.requires_grad:
            groups.append({"params": [self.log_var], "lr": lr * var_lr_mult})
        return groups

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, "
            f"lambda_lkd={self.lambda_lkd}, isotropic={self.isotropic}, "
            f"include_logdet={self.include_logdet}, alpha_schedule={self.alpha_schedule}, "
            f"log_var_floor={self.log_var_floor:.4g}"
        )


class LGMClassifier(nn.Module):
    """Inference head over a trained ``LGMLoss`` (sharing its parameters):
    ``forward(feat) -> (logits, loglik)``, where ``loglik`` is the log-likelihood (up to a
    constant) of the predicted class. Threshold it to flag out-of-distribution inputs."""

    def __init__(self, lgm: LGMLoss) -> None:
        super().__init__()
        if not isinstance(lgm, LGMLoss):
            raise TypeError(f"lgm must be an LGMLoss, got {type(lgm).__name__}")
        self.lgm = lgm

    def forward(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        return self.lgm.inference(feat)

"""Lambda schedules: the blending weight used at training step ``it = 0, 1, ...``.

The values come from the C++ core (``lsoftmax._core``), the one home of the formulas and of
the kind dispatch: every schedule is its ``kind`` and flat ``params()``, evaluated by
``_core.schedule_value`` on the host and by the same spec on the device
(``lsoftmax::schedule_lambda``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from lsoftmax import _core

__all__ = ["Constant", "Exponential", "Onset", "Scaled", "Schedule", "schedule_from_dict"]


class Schedule:
    """Base class: ``value(step)`` gives lambda at a training step."""

    kind: ClassVar[str] = ""

    def value(self, step: int) -> float:
        """Lambda at ``step`` (an int >= 0), by the core."""
        return float(_core.schedule_value(self.kind, self.params(), int(step)))

    def _validate(self) -> None:
        # The core's checks of this kind (ValueError naming the parameter).
        _core.schedule_value(self.kind, self.params(), 0)

    def params(self) -> list[float]:
        """The parameters as a flat list, in the order the core functions take them."""
        # fields + getattr, not asdict: asdict deep-copies, and this runs on every eager
        # training forward of a scheduled head (tens of microseconds at small C).
        return [float(getattr(self, f.name)) for f in fields(self)]  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True)
class Exponential(Schedule):
    """The original Caffe layer: ``max(lambda_min, base * (1 + gamma * iter)^(-power))``.

    ``iter = iteration + step + 1`` (the layer counts before it computes; ``iteration`` is the
    resume offset). The defaults are the paper's MNIST setting.
    """

    kind: ClassVar[str] = "exponential"
    base: float = 1000.0
    gamma: float = 2.5e-5
    power: float = 35.0
    lambda_min: float = 0.0
    iteration: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.iteration, bool) or not isinstance(self.iteration, int):
            raise TypeError(f"iteration must be an int, got {type(self.iteration).__name__}")
        self._validate()


@dataclass(frozen=True)
class Scaled(Schedule):
    """The MXNet and PyTorch ports: ``max(beta_min, beta * scale^step)``."""

    kind: ClassVar[str] = "scaled"
    beta: float = 100.0
    scale: float = 0.99
    beta_min: float = 0.0

    def __post_init__(self) -> None:
        self._validate()


@dataclass(frozen=True)
class Constant(Schedule):
    """A fixed lambda."""

    kind: ClassVar[str] = "constant"
    value_: float = 0.0

    def __init__(self, value: float = 0.0) -> None:
        object.__setattr__(self, "value_", float(value))
        self._validate()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value_}


@dataclass(frozen=True)
class Onset(Schedule):
    """A schedule stated relative to the run's length (``total_steps`` training steps).

    Lambda stays at ``base`` (softmax in effect) for the first ``warmup * total_steps`` steps,
    then falls geometrically so that it equals ``reach`` at step ``at * total_steps`` and keeps
    falling at that rate, never below ``lambda_min``. ``0 <= warmup < at <= 1`` and
    ``0 < reach <= base``. Unlike :class:`Exponential`, whose onset is fixed in iterations, the
    margin arrives at the same point of a short run as of a long one.
    """

    kind: ClassVar[str] = "onset"
    # The defaults (also ``lsoftmax train``'s and the demo's) were chosen from the runs in
    # docs/accuracy.md: softmax for the first 20 % of the run, lambda 1000 -> 5 between 20 % and
    # ~43 %, then SphereFace's floor of 5, which kept m = 4 from collapsing on the digits MLP.
    total_steps: int = 1
    reach: float = 1.0
    at: float = 0.5
    warmup: float = 0.2
    base: float = 1000.0
    lambda_min: float = 5.0

    def __post_init__(self) -> None:
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int):
            raise TypeError(f"total_steps must be an int, got {type(self.total_steps).__name__}")
        self._validate()


_KINDS: dict[str, type[Schedule]] = {c.kind: c for c in (Exponential, Scaled, Constant, Onset)}


def schedule_from_dict(d: dict[str, Any]) -> Schedule:
    """Inverse of ``Schedule.to_dict()``."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {sorted(_KINDS)}")
    return _KINDS[kind](**d)


@dataclass(frozen=True)
class StepUp(Schedule):
    """The L-GM margin schedule (Caffe ``ParamParameter`` policy STEPUP).

    ``min(max_value, value * gamma^floor(step_index / step))``: the start value, multiplied by
    ``gamma`` once every ``step`` training steps, capped at ``max_value``.
    """

    kind: ClassVar[str] = "stepup"
    value_: float = 0.0
    gamma: float = 1.0
    step: int = 1000
    max_value: float = 1.0

    def __init__(
        self, value: float = 0.0, gamma: float = 1.0, step: int = 1000, max_value: float = 1.0
    ) -> None:
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        object.__setattr__(self, "value_", float(value))
        object.__setattr__(self, "gamma", float(gamma))
        object.__setattr__(self, "step", step)
        object.__setattr__(self, "max_value", float(max_value))
        self._validate()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "value": self.value_,
            "gamma": self.gamma,
            "step": self.step,
            "max_value": self.max_value,
        }


_KINDS[StepUp.kind] = StepUp
__all__ += ["StepUp"]

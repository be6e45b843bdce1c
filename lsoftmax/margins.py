"""Margin specifications: which large-margin softmax a head computes, and with what parameters.

Every kind rewrites the target logit of each row and keeps the others plain (the formulas are
in docs/architecture.md, "The margin family"):

- :class:`LSoftmax` ``(m)``: L-Softmax, ``x W^T`` with the psi margin on the target angle;
- :class:`SphereFace` ``(m)``: A-Softmax, the same psi with normalized weights (``|x| cos``);
- :class:`CosFace` ``(m, s)``: ``s (cos theta - m)`` on normalized features and weights;
- :class:`ArcFace` ``(m, s, easy_margin)``: ``s cos(theta + m)`` (m in radians);
- :class:`Combined` ``(m1, m2, m3, s)``: insightface's ``s (cos(m1 theta + m2) - m3)``.

The specs are frozen dataclasses, checked on construction by the C++ core's rule (the one home
of the ranges and messages, shared with the torch op and the ONNX Runtime kernels).

>>> from lsoftmax.margins import ArcFace, margin_from_dict
>>> spec = ArcFace(0.5, 64.0)
>>> spec.kind, spec.params()
('arcface', [0.5, 0.0, 0.0, 0.0, 64.0, 0.0])
>>> margin_from_dict(spec.to_dict()) == spec
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from lsoftmax import _core
from lsoftmax.schedules import Constant, Exponential, Schedule

__all__ = [
    "ArcFace",
    "Combined",
    "CosFace",
    "LSoftmax",
    "Margin",
    "SphereFace",
    "as_margin",
    "default_schedule",
    "kind_class",
    "margin_from_dict",
]


class Margin:
    """Base class of the margin specs (see the module docs)."""

    kind: ClassVar[str] = ""
    #: True for the kinds whose target is blended with the plain one by lambda (a schedule).
    uses_lambda: ClassVar[bool] = False
    normalizes_features: ClassVar[bool] = False
    normalizes_weights: ClassVar[bool] = False
    #: (ONNX attribute, dataclass field) pairs; the attribute names are the core's parameter
    #: names, in the order of the flat parameter list.
    _attrs: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __post_init__(self) -> None:
        values = {attr: getattr(self, name) for attr, name in self._attrs}
        params = _core.margin_params(
            self.kind,
            values.get("margin", 0),
            values.get("m1", 0.0),
            values.get("m2", 0.0),
            values.get("m3", 0.0),
            values.get("scale", 0.0),
            values.get("easy_margin", False),
        )
        order = ("margin", "m1", "m2", "m3", "scale", "easy_margin")
        for attr, name in self._attrs:
            v = params[order.index(attr)]
            typed: Any = bool(v) if attr == "easy_margin" else v
            if attr == "margin" and self.uses_lambda:
                typed = int(v)
            object.__setattr__(self, name, typed)
        object.__setattr__(self, "_params", [float(p) for p in params])

    def params(self) -> list[float]:
        """``[margin, m1, m2, m3, scale, easy_margin]`` (unused entries 0): the torch op's
        ``params`` and the core's flat parameter list."""
        return list(self._params)  # type: ignore[attr-defined]

    @property
    def scale(self) -> float:
        """The logit scale s of the cosine kinds (1 for the others)."""
        return self._params[4] if self.normalizes_features else 1.0  # type: ignore[attr-defined]

    def attributes(self) -> dict[str, Any]:
        """The ONNX attributes of ``ai.lsoftmax::MarginLinear`` for this spec (lambda aside)."""
        out: dict[str, Any] = {"kind": self.kind}
        for attr, name in self._attrs:
            v = getattr(self, name)
            out[attr] = int(v) if attr == "easy_margin" else float(v)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True)
class LSoftmax(Margin):
    """L-Softmax (Liu et al. 2016): integer m in [1, 2^20]; m = 1 is plain softmax."""

    kind: ClassVar[str] = "lsoftmax"
    uses_lambda: ClassVar[bool] = True
    _attrs: ClassVar[tuple[tuple[str, str], ...]] = (("margin", "m"),)
    m: int = 4


@dataclass(frozen=True)
class SphereFace(Margin):
    """SphereFace / A-Softmax (Liu et al. 2017): L-Softmax's psi on normalized weights."""

    kind: ClassVar[str] = "sphereface"
    uses_lambda: ClassVar[bool] = True
    normalizes_weights: ClassVar[bool] = True
    _attrs: ClassVar[tuple[tuple[str, str], ...]] = (("margin", "m"),)
    m: int = 4


@dataclass(frozen=True)
class CosFace(Margin):
    """CosFace / AM-Softmax (Wang et al. 2018): ``s (cos theta - m)``, m >= 0, s > 0."""

    kind: ClassVar[str] = "cosface"
    normalizes_features: ClassVar[bool] = True
    normalizes_weights: ClassVar[bool] = True
    _attrs: ClassVar[tuple[tuple[str, str], ...]] = (("margin", "m"), ("scale", "s"))
    m: float = 0.35
    s: float = 64.0


@dataclass(frozen=True)
class ArcFace(Margin):
    """ArcFace (Deng et al. 2019): ``s cos(theta + m)``, m in [0, pi) radians, s > 0.

    Where ``theta + m > pi`` the target is ``s (cos theta - m sin m)`` (as insightface and
    pytorch-metric-learning do); ``easy_margin=True`` instead keeps ``s cos theta`` wherever
    ``cos theta <= 0``.
    """

    kind: ClassVar[str] = "arcface"
    normalizes_features: ClassVar[bool] = True
    normalizes_weights: ClassVar[bool] = True
    _attrs: ClassVar[tuple[tuple[str, str], ...]] = (
        ("margin", "m"),
        ("scale", "s"),
        ("easy_margin", "easy_margin"),
    )
    m: float = 0.5
    s: float = 64.0
    easy_margin: bool = False


@dataclass(frozen=True)
class Combined(Margin):
    """insightface's combined margin: ``s (cos(m1 theta + m2) - m3)``; m1 > 0, m2 (radians) and
    m3 finite, s > 0. ``Combined(1, m, 0, s)`` is ArcFace without its fallback, and
    ``Combined(1, 0, m, s)`` is CosFace."""

    kind: ClassVar[str] = "combined"
    normalizes_features: ClassVar[bool] = True
    normalizes_weights: ClassVar[bool] = True
    _attrs: ClassVar[tuple[tuple[str, str], ...]] = (
        ("m1", "m1"),
        ("m2", "m2"),
        ("m3", "m3"),
        ("scale", "s"),
    )
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    s: float = 64.0


_KINDS: dict[str, type[Margin]] = {
    c.kind: c for c in (LSoftmax, SphereFace, CosFace, ArcFace, Combined)
}


def kind_class(kind: str) -> type[Margin]:
    """The spec class of a kind name; an unknown name gets the core's message."""
    cls = _KINDS.get(kind)
    if cls is None:
        _core.validate_margin_spec(str(kind), [0.0] * 6)  # raises, naming the known kinds
        raise ValueError(f"unknown margin kind {kind!r}")  # a kind the core has, Python not
    return cls


def margin_from_dict(d: dict[str, Any]) -> Margin:
    """Inverse of ``Margin.to_dict()``."""
    if not isinstance(d, dict):
        raise TypeError(f"a margin dict is expected, got {type(d).__name__}")
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"unknown margin kind {kind!r}; expected one of {sorted(_KINDS)}")
    cls = _KINDS[kind]
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    extra = sorted(set(d) - names)
    if extra:
        raise ValueError(f"unknown {kind} margin fields {extra}; expected some of {sorted(names)}")
    return cls(**d)


def as_margin(margin: Any) -> Margin:
    """A Margin spec as it is; a plain int margin as ``LSoftmax(margin)``."""
    if isinstance(margin, Margin):
        return margin
    return LSoftmax(margin)


def default_schedule(margin: Margin) -> Schedule:
    """The lambda schedule a head uses when none is given: L-Softmax's paper default, SphereFace's
    published one (base 1000, gamma 0.12, power 1, lambda_min 5), no lambda (0) for the rest."""
    if not isinstance(margin, Margin):
        raise TypeError(f"margin must be a lsoftmax.margins.Margin, got {margin!r}")
    if margin.kind == "lsoftmax":
        return Exponential()
    if margin.kind == "sphereface":
        return Exponential(base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0)
    return Constant(0.0)

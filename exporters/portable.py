"""Standard-ONNX bodies of the ``ai.lsoftmax`` ops: the one home of their portable form.

The same builders produce the ``"portable"`` export (the custom nodes replaced by these nodes,
with constant attributes) and the model-local ``FunctionProto`` bodies of the ``"function"``
export (attributes referenced with ``ref_attr_name``). The math mirrors the core's
(``lsoftmax_core/include/lsoftmax/margin_math.h``); the parity tests hold them together.

Adding an op: write ``def build_<op>(b, inputs, output, attrs)`` here and add it to ``BUILDERS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from lsoftmax.exporters.lgm import build_lgm_logits
from lsoftmax.exporters.margin_family import MARGIN_LINEAR, build_margin_linear
from onnx import helper, numpy_helper

from lsoftmax import _core

__all__ = ["BUILDERS", "AttrRef", "NodeBuilder", "build_lsoftmax_linear", "psi_float64"]

# Norms below sqrt(FLT_MIN) make a row degenerate (no margin), as in the core's float path.
# The core uses sqrt(DBL_MIN) for float64; only rows with norms in between (~1e-154..1e-19)
# could tell the difference.
_DEGENERATE_NORM = float(np.sqrt(np.finfo(np.float32).tiny))


@dataclass(frozen=True)
class AttrRef:
    """A float attribute of the enclosing function (``ref_attr_name``), not a constant."""

    name: str


class NodeBuilder:
    """Collects standard-op nodes; names are prefixed so several bodies can share a graph."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, output: str | None = None, **attrs: object) -> str:
        out = output if output is not None else self.fresh(op_type.lower())
        name = f"{self.prefix}{op_type}_{self._count}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def int64(self, values: Sequence[int]) -> str:
        arr = np.asarray(values, dtype=np.int64)
        return self.op("Constant", value=numpy_helper.from_array(arr))

    def like(self, values: float | Sequence[float], like: str) -> str:
        """A float constant (stored in float64) cast to the element type of ``like``."""
        arr = np.asarray(values, dtype=np.float64)
        const = self.op("Constant", value=numpy_helper.from_array(arr))
        return self.op("CastLike", const, like)

    def scalar(self, value: float | AttrRef, like: str) -> str:
        if isinstance(value, AttrRef):
            attr = onnx.AttributeProto(
                name="value_float", ref_attr_name=value.name, type=onnx.AttributeProto.FLOAT
            )
            node = helper.make_node("Constant", [], [self.fresh("attr")])
            node.attribute.append(attr)
            node.name = f"{self.prefix}Constant_{value.name}_{len(self.nodes)}"
            self.nodes.append(node)
            return self.op("CastLike", node.output[0], like)
        # Attributes are float32 in ONNX, so the constant path rounds the same way.
        return self.like(float(np.float32(value)), like)


def build_lsoftmax_linear(
    b: NodeBuilder,
    inputs: Sequence[str | None],
    output: str,
    attrs: Mapping[str, object],
    lam_tensor: Callable[[str], str] | None = None,
) -> None:
    """``LSoftmaxLinear(X[N,D], W[C,D], labels[N]?) -> Y[N,C]`` in standard ops.

    ``attrs``: ``margin`` (int) and ``lambda`` (float or ``AttrRef``). Without labels, or with
    margin 1, this is one Gemm; otherwise the target logit of each row becomes
    ``(lambda f + |x||w| psi(c)) / (1 + lambda)`` with ``psi = (-1)^k T_m(c) - 2k``.
    ``lam_tensor(like)``, when given, makes lambda's tensor instead (MarginLinear's
    ``lambda + lambda_lo``).
    """
    x, w = inputs[0], inputs[1]
    labels = inputs[2] if len(inputs) > 2 and inputs[2] else None
    assert x is not None and w is not None
    margin = int(attrs["margin"])  # type: ignore[call-overload]
    lam = attrs.get("lambda", 0.0)
    assert isinstance(lam, (float, int, AttrRef))
    _core.validate_margin_params(margin, 0.0)  # the core's range, [1, 2^20]
    if not isinstance(lam, AttrRef) and (math.isnan(lam) or lam < 0):
        raise ValueError(f"lambda must be >= 0 (and not NaN), got {lam}")
    plain = labels is None or margin == 1
    logits = b.op(
        "Gemm", x, w, output=output if plain else None, alpha=1.0, beta=0.0, transA=0, transB=1
    )
    if plain:
        return
    assert labels is not None
    idx = b.op("Unsqueeze", labels, b.int64([1]))  # [N, 1]
    f = b.op("GatherElements", logits, idx, axis=1)  # target logits [N, 1]
    w_t = b.op("Gather", w, labels, axis=0)  # target weight rows [N, D]
    axes = b.int64([1])
    # Sqrt of ReduceSumSquare rather than ReduceL2: onnxruntime 1.16's ReduceL2 loses precision
    # in float64 (~1e-7 relative).
    norm_x = b.op("Sqrt", b.op("ReduceSumSquare", x, axes, keepdims=1))
    norm_w = b.op("Sqrt", b.op("ReduceSumSquare", w_t, axes, keepdims=1))
    one = b.like(1.0, x)
    tiny = b.like(_DEGENERATE_NORM, x)
    degenerate = b.op("Or", b.op("Less", norm_x, tiny), b.op("Less", norm_w, tiny))
    prod = b.op("Mul", norm_x, norm_w)
    safe_prod = b.op("Where", degenerate, one, prod)
    cos = b.op("Clip", b.op("Div", f, safe_prod), b.like(-1.0, x), one)
    # The margin math in float64 whatever the model's type, with O(log m) nodes for any margin
    # (an unrolled recurrence or a table of m - 1 thresholds would grow with m: ~2M nodes at
    # m = 2^20).
    psi = b.op("CastLike", psi_float64(b, b.op("Cast", cos, to=_DOUBLE), margin), x)
    lam_t = lam_tensor(x) if lam_tensor is not None else b.scalar(lam, x)
    blended = b.op("Add", b.op("Mul", lam_t, f), b.op("Mul", prod, psi))
    g = b.op("Div", blended, b.op("Add", one, lam_t))
    g = b.op("Where", degenerate, f, g)
    b.op("ScatterElements", logits, idx, g, output=output, axis=1)


_DOUBLE = onnx.TensorProto.DOUBLE


def psi_float64(b: NodeBuilder, c: str, margin: int) -> str:
    """``psi(c) = (-1)^k T_m(c) - 2k`` for a float64 tensor ``c`` of cosines, in float64.

    Segment k (theta in [k pi/m, (k+1) pi/m]) is the number of thresholds ``cos(j pi/m)``,
    j = 1..m-1, above c; they decrease in j, so a binary search over the bits of j finds it,
    comparing ``c < cos(pi j / m)`` in double as the core does. The threshold of a candidate
    ``j = k + step`` comes from the angle-addition formulas on the running
    ``(cos, sin)(pi k / m)`` and the constants ``(cos, sin)(pi step / m)`` (no ``Cos`` op:
    onnxruntime 1.16 has none for float64). ``T_m`` comes from the doubling ladder on the pair
    ``(T_n, T_{n+1})``: ``T_2n = 2 T_n^2 - 1`` and ``T_2n+1 = 2 T_n T_n+1 - c``, one step per
    bit of m.
    """

    def const(v: float) -> str:
        return b.op("Constant", value=numpy_helper.from_array(np.asarray(v, dtype=np.float64)))

    one, two = const(1.0), const(2.0)
    zeros = b.op("Mul", c, const(0.0))  # shaped like c
    k, cos_k, sin_k = zeros, b.op("Add", zeros, one), zeros  # j = 0: (cos, sin)(0) = (1, 0)
    if margin > 1:
        step = 1 << ((margin - 1).bit_length() - 1)  # the highest power of two <= m - 1
        while step >= 1:
            cos_s, sin_s = (
                const(math.cos(math.pi * step / margin)),
                const(math.sin(math.pi * step / margin)),
            )
            cand = b.op("Add", k, const(float(step)))
            threshold = b.op("Sub", b.op("Mul", cos_k, cos_s), b.op("Mul", sin_k, sin_s))
            take = b.op(
                "And",
                b.op("LessOrEqual", cand, const(float(margin - 1))),
                b.op("Less", c, threshold),
            )
            sin_next = b.op("Add", b.op("Mul", sin_k, cos_s), b.op("Mul", cos_k, sin_s))
            k = b.op("Where", take, cand, k)
            cos_k = b.op("Where", take, threshold, cos_k)
            sin_k = b.op("Where", take, sin_next, sin_k)
            step //= 2
    # The ladder starts at n = 0 and reads m's bits from the top: it ends at n = m.
    t_n, t_n1 = one, c  # (T_0, T_1)
    for bit in bin(margin)[2:]:
        cross = b.op("Sub", b.op("Mul", b.op("Mul", two, t_n), t_n1), c)
        if bit == "0":
            t_n, t_n1 = b.op("Sub", b.op("Mul", b.op("Mul", two, t_n), t_n), one), cross
        else:
            t_n, t_n1 = cross, b.op("Sub", b.op("Mul", b.op("Mul", two, t_n1), t_n1), one)
    sign = b.op("Sub", one, b.op("Mul", two, b.op("Mod", k, two, fmod=1)))
    return b.op("Sub", b.op("Mul", sign, t_n), b.op("Mul", two, k))


Builder = Callable[[NodeBuilder, Sequence[str | None], str, Mapping[str, object]], None]

# op_type in the ai.lsoftmax domain -> its standard-op builder.
BUILDERS: dict[str, Builder] = {
    "LSoftmaxLinear": build_lsoftmax_linear,
    "LGMLogits": build_lgm_logits,  # type: ignore[dict-item]  (two outputs: a list of names)
    MARGIN_LINEAR: build_margin_linear,
}

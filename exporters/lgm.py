"""ONNX export of the L-GM op: ``lsoftmax::lgm_logits`` -> ``ai.lsoftmax::LGMLogits``.

``LGMLogits(X[N,D], means[C,D], log_var[C,D] or [C,1], labels[N]?) -> (logits[N,C], loglik[N])``
with attributes ``alpha`` (float, default 0), ``alpha_lo`` (float, default 0; the margin is
``alpha + alpha_lo``: ONNX attributes are float32, so a float64 alpha is written as its float32
part and the float32 rounding of the rest) and ``include_logdet`` (int, default 1); isotropic
variances are read from the shape of ``log_var``. The kernel is ``ort_ops/lgm_logits_op.cc``;
``build_lgm_logits`` is the standard-op form (portable export and model-local function body).
The tables in ``translations``, ``portable`` and ``functions`` list these entries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from lsoftmax.exporters.domain import DOMAIN, DOMAIN_VERSION, opset
from onnx.defs import OpSchema

if TYPE_CHECKING:
    from lsoftmax.exporters.portable import NodeBuilder

__all__ = [
    "LGM_DEFAULT_ALPHA",
    "LGM_DEFAULT_ALPHA_LO",
    "LGM_DEFAULT_INCLUDE_LOGDET",
    "LGM_INPUTS",
    "LGM_OUTPUTS",
    "LGM_TRAINING_ONLY",
    "build_lgm_logits",
    "lgm_logits",
    "lgm_logits_schema",
]

# Defaults shared by the kernel (ort_ops/lgm_logits_op.h) and the function body.
LGM_DEFAULT_ALPHA = 0.0
LGM_DEFAULT_ALPHA_LO = 0.0
LGM_DEFAULT_INCLUDE_LOGDET = 1
LGM_INPUTS = ["X", "means", "log_var", "labels"]
LGM_OUTPUTS = ["logits", "loglik"]


def lgm_logits_schema() -> OpSchema:
    param = OpSchema.FormalParameter
    return OpSchema(
        "LGMLogits",
        DOMAIN,
        DOMAIN_VERSION,
        doc=(
            "L-GM logits (Wan et al., CVPR 2018): logits[i,k] = -(1 + alpha [k = labels_i]) d_ik "
            "- include_logdet * 1/2 log|V_k|, d_ik = 1/2 sum_j (x_ij - mu_kj)^2 / exp(log_var_kj); "
            "loglik[i] = -(d_ic + 1/2 log|V_c|) for c the label, or the predicted class."
        ),
        inputs=[
            param("X", "T", "features (N, D)"),
            param("means", "T", "class means (C, D)"),
            param("log_var", "T", "log-variances (C, D), or (C, 1) for isotropic variances"),
            param(
                "labels",
                "L",
                "class per row (N); absent: no margin, loglik of the predicted class",
                param_option=OpSchema.FormalParameterOption.Optional,
            ),
        ],
        outputs=[param("logits", "T", "logits (N, C)"), param("loglik", "T", "(N)")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(double)"], "float types"),
            ("L", ["tensor(int64)", "tensor(int32)"], "label types"),
        ],
        attributes=[
            OpSchema.Attribute(
                "alpha",
                onnx.helper.make_attribute("alpha", LGM_DEFAULT_ALPHA),
                "margin alpha >= 0 on the label's logit",
            ),
            OpSchema.Attribute(
                "alpha_lo",
                onnx.helper.make_attribute("alpha_lo", LGM_DEFAULT_ALPHA_LO),
                "low part of the margin: the op uses alpha + alpha_lo (float64 alphas)",
            ),
            OpSchema.Attribute(
                "include_logdet",
                onnx.helper.make_attribute("include_logdet", LGM_DEFAULT_INCLUDE_LOGDET),
                "1: the logits carry -1/2 log|V_k|; 0: they do not",
            ),
        ],
    )


def lgm_logits(
    x: Any,
    means: Any,
    log_var: Any,
    labels: Any = None,
    alpha: float = 0.0,
    include_logdet: bool = True,
) -> Any:
    """``torch.ops.lsoftmax.lgm_logits`` -> ``ai.lsoftmax::LGMLogits``."""
    hi, lo = split_alpha(float(alpha))
    attrs: dict[str, float | int] = {"alpha": hi, "include_logdet": int(bool(include_logdet))}
    if lo != 0.0:
        attrs["alpha_lo"] = lo
    if labels is None:
        return opset.LGMLogits(x, means, log_var, **attrs)
    return opset.LGMLogits(x, means, log_var, labels, **attrs)


def split_alpha(alpha: float) -> tuple[float, float]:
    """``(hi, lo)``, both float32 values, with ``hi + lo`` equal to ``alpha`` to ~48 bits (the
    rounding error of a float32 alpha is ~1e-8 relative, visible in float64 logits)."""
    hi = float(np.float32(alpha))
    if not math.isfinite(hi):
        return hi, 0.0
    return hi, float(np.float32(alpha - hi))


# Why each L-GM training-only op cannot be exported, by op name (translations.py raises it).
LGM_TRAINING_ONLY = {
    "lgm_margin_logits": (
        "torch.ops.lsoftmax.lgm_margin_logits is L-GM's training form (its margin alpha comes "
        "from a schedule every step) and cannot be exported to ONNX: call model.eval() before "
        "exporting (LGMLoss and LGMClassifier then use lsoftmax::lgm_logits), or call "
        "torch.ops.lsoftmax.lgm_logits with a float alpha for a graph with labels"
    ),
}


def _int_attr(b: NodeBuilder, value: object, like: str) -> str:
    """An int attribute (or a reference to the function's) as a float tensor like ``like``."""
    from lsoftmax.exporters.portable import AttrRef

    if isinstance(value, AttrRef):
        node = onnx.helper.make_node("Constant", [], [b.fresh("attr")])
        node.attribute.append(
            onnx.AttributeProto(
                name="value_int", ref_attr_name=value.name, type=onnx.AttributeProto.INT
            )
        )
        node.name = f"{b.prefix}Constant_{value.name}_{len(b.nodes)}"
        b.nodes.append(node)
        return b.op("CastLike", node.output[0], like)
    return b.like(float(int(value)), like)  # type: ignore[call-overload]


def build_lgm_logits(
    b: NodeBuilder,
    inputs: Sequence[str | None],
    outputs: Sequence[str],
    attrs: Mapping[str, object],
) -> None:
    """``LGMLogits`` in standard ops, by the same centred GEMM expansion as the core:
    ``2 d = xc^2 @ p^T - 2 xc @ (muc p)^T + sum_j muc^2 p`` with ``xc = X - o``,
    ``muc = means - o``, ``o`` the mean of the class means and ``p = exp(-log_var)``
    expanded to (C, D) (so the isotropic case needs no branch). The expansion cancels for a
    sample very close to a class mean; the core detects that per entry, this graph (which
    cannot branch cheaply) recomputes each row's own-class distance (the label's, or the
    predicted class's) from direct differences, which covers the entries that matter: the
    label's logit and loglik. docs/lgm.md gives the numbers.
    """
    x, means, log_var = inputs[0], inputs[1], inputs[2]
    labels = inputs[3] if len(inputs) > 3 and inputs[3] else None
    assert x is not None and means is not None and log_var is not None
    logits_out, loglik_out = outputs
    alpha = attrs.get("alpha", LGM_DEFAULT_ALPHA)
    alpha_lo = attrs.get("alpha_lo", LGM_DEFAULT_ALPHA_LO)
    from lsoftmax.exporters.portable import AttrRef

    if not isinstance(alpha, AttrRef) and not isinstance(alpha_lo, AttrRef):
        total = float(alpha) + float(alpha_lo)  # type: ignore[arg-type]
        if not total >= 0 or not math.isfinite(float(alpha_lo)):  # type: ignore[arg-type]
            raise ValueError(f"alpha must be >= 0, got {total}")
    axis0, axis1 = b.int64([0]), b.int64([1])
    half, two = b.like(0.5, x), b.like(2.0, x)
    offset = b.op("ReduceMean", means, axis0, keepdims=1)  # [1, D]
    xc = b.op("Sub", x, offset)
    muc = b.op("Sub", means, offset)
    full = b.op("Shape", means)
    lv_full = b.op("Expand", log_var, full)  # [C, D] for both variance kinds
    prec = b.op("Exp", b.op("Neg", lv_full))
    cross = b.op("MatMul", xc, b.op("Transpose", b.op("Mul", muc, prec), perm=[1, 0]))
    sq = b.op("MatMul", b.op("Mul", xc, xc), b.op("Transpose", prec, perm=[1, 0]))
    c_k = b.op("ReduceSum", b.op("Mul", b.op("Mul", muc, muc), prec), axis1, keepdims=0)  # [C]
    d2 = b.op("Add", b.op("Sub", sq, b.op("Mul", two, cross)), c_k)
    dist = b.op("Mul", half, b.op("Max", d2, b.like(0.0, x)))  # [N, C]
    h = b.op("Mul", half, b.op("ReduceSum", lv_full, axis1, keepdims=0))  # [C]
    s = _int_attr(b, attrs.get("include_logdet", LGM_DEFAULT_INCLUDE_LOGDET), x)
    plain = b.op("Neg", b.op("Add", dist, b.op("Mul", s, h)))
    if labels is None:
        # The predicted class: argmax_k (-d_k - h_k) = argmax_k (z_k - (1 - s) h_k).
        drop = b.op("Mul", b.op("Sub", b.like(1.0, x), s), h)
        idx = b.op("ArgMax", b.op("Sub", plain, drop), axis=1, keepdims=1)  # [N, 1]
        cls = b.op("Squeeze", idx, axis1)
    else:
        idx = b.op("Unsqueeze", labels, axis1)  # [N, 1]
        cls = labels
    # Each row's own-class distance again from direct differences (O(N D)): a sample close to
    # its class mean is where the expansion cancels, and loglik is the score that OOD
    # thresholds read.
    diff = b.op("Sub", x, b.op("Gather", means, cls, axis=0))  # [N, D]
    p_c = b.op("Gather", prec, cls, axis=0)
    d_c = b.op(
        "Mul", half, b.op("ReduceSum", b.op("Mul", b.op("Mul", diff, diff), p_c), axis1, keepdims=1)
    )  # [N, 1]
    h_c = b.op("Unsqueeze", b.op("Gather", h, cls, axis=0), axis1)  # [N, 1]
    scale = (
        b.like(1.0, x)
        if labels is None
        else b.op(
            "Add",
            b.like(1.0, x),
            b.op(
                "Add",
                b.scalar(alpha, x),  # type: ignore[arg-type]
                b.scalar(alpha_lo, x),  # type: ignore[arg-type]
            ),
        )
    )
    z_c = b.op("Neg", b.op("Add", b.op("Mul", scale, d_c), b.op("Mul", s, h_c)))
    b.op("ScatterElements", plain, idx, z_c, output=logits_out, axis=1)
    b.op("Neg", b.op("Squeeze", b.op("Add", d_c, h_c), axis1), output=loglik_out)

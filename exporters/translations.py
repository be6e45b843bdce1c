"""Translations of the ``lsoftmax::`` torch ops for ``torch.onnx.export(dynamo=True)``.

``TRANSLATIONS`` maps each exportable torch op overload to a function emitting the
``ai.lsoftmax`` node; ``SCHEMAS`` declares those nodes to ``onnx``. Adding an op (e.g. L-GM's
``LGMLogits``) means adding its schema to ``SCHEMAS``, its translation to ``TRANSLATIONS`` and its
standard-op body to ``portable.BUILDERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx
from lsoftmax.exporters.domain import DOMAIN, DOMAIN_VERSION, opset, register_schema
from lsoftmax.exporters.lgm import LGM_TRAINING_ONLY, lgm_logits, lgm_logits_schema
from lsoftmax.exporters.margin_family import margin_family_linear, margin_linear_schema
from onnx.defs import OpSchema

__all__ = ["SCHEMAS", "TRAINING_ONLY", "TRANSLATIONS", "TrainingOpError", "translation_table"]

# Defaults shared by the kernel (ort_ops/lsoftmax_linear_op.h) and the function body.
LSOFTMAX_LINEAR_DEFAULT_LAMBDA = 0.0


class TrainingOpError(ValueError):
    """A training-only op (lambda schedule, tensor lambda) reached the ONNX exporter."""


def _lsoftmax_linear_schema() -> OpSchema:
    param = OpSchema.FormalParameter
    return OpSchema(
        "LSoftmaxLinear",
        DOMAIN,
        DOMAIN_VERSION,
        doc=(
            "L-Softmax linear layer (Liu et al., ICML 2016): Y = X W^T; with labels, each row's "
            "target logit becomes (lambda f + |x||w| psi(theta)) / (1 + lambda)."
        ),
        inputs=[
            param("X", "T", "features (N, D)"),
            param("W", "T", "class weights (C, D)"),
            param(
                "labels",
                "L",
                "target class per row (N); absent: plain logits",
                param_option=OpSchema.FormalParameterOption.Optional,
            ),
        ],
        outputs=[param("Y", "T", "logits (N, C)")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(double)"], "float types"),
            ("L", ["tensor(int64)", "tensor(int32)"], "label types"),
        ],
        attributes=[
            OpSchema.Attribute(
                "margin", OpSchema.AttrType.INT, "integer margin m >= 1", required=True
            ),
            OpSchema.Attribute(
                "lambda",
                onnx.helper.make_attribute("lambda", LSOFTMAX_LINEAR_DEFAULT_LAMBDA),
                "blending weight lambda >= 0",
            ),
        ],
    )


def lsoftmax_linear(
    x: Any, weight: Any, labels: Any = None, margin: int = 1, lam: float = 0.0
) -> Any:
    """``torch.ops.lsoftmax.linear`` -> ``ai.lsoftmax::LSoftmaxLinear``."""
    # "lambda" is a Python keyword, hence the dict.
    attrs = {"margin": int(margin), "lambda": float(lam)}
    if labels is None:
        return opset.LSoftmaxLinear(x, weight, **attrs)
    return opset.LSoftmaxLinear(x, weight, labels, **attrs)


def _training_only(message: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise TrainingOpError(message)

    return refuse


SCHEMAS: list[Callable[[], OpSchema]] = [
    _lsoftmax_linear_schema,
    lgm_logits_schema,
    margin_linear_schema,
]

# Filled lazily: the torch ops exist only once lsoftmax.torch is imported.
TRANSLATIONS: dict[str, Callable[..., Any]] = {
    "linear": lsoftmax_linear,
    "lgm_logits": lgm_logits,
    "margin_family_linear": margin_family_linear,
}


def _lsoftmax_training_only(name: str) -> str:
    return (
        f"torch.ops.lsoftmax.{name} is a training-only op (its lambda is a tensor that a "
        "schedule changes every step) and cannot be exported to ONNX: call model.eval() "
        "before exporting, or use lsoftmax.torch.functional.lsoftmax_logits(x, weight, "
        "target, margin, lam) (any kind: margin_logits(x, weight, target, margin, lam)) with a "
        "float lam for a graph with labels"
    )


# Ops that exist only in training graphs, with the message that refuses their export.
TRAINING_ONLY: dict[str, str] = {
    **{
        name: _lsoftmax_training_only(name)
        for name in ("margin_linear", "schedule_lambda", "margin_family_scheduled")
    },
    **LGM_TRAINING_ONLY,
}


def translation_table() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export``, keyed by ``.default`` overloads."""
    import torch

    import lsoftmax.torch  # noqa: F401  (registers torch.ops.lsoftmax)

    for make in SCHEMAS:
        register_schema(make())
    ops = torch.ops.lsoftmax
    table: dict[Any, Callable[..., Any]] = {
        getattr(ops, name).default: fn for name, fn in TRANSLATIONS.items()
    }
    for name, message in TRAINING_ONLY.items():
        table[getattr(ops, name).default] = _training_only(message)
    return table

"""Post-export rewrites of the ``ai.lsoftmax`` nodes of an ONNX model.

- ``attach_functions``: add model-local ``FunctionProto``s (standard-op bodies from
  ``portable.BUILDERS``) so that ONNX Runtime runs our kernel when the library is registered and
  the body otherwise. The dynamo exporter inlines onnxscript functions, so they are added here.
- ``inline_portable``: replace every ``ai.lsoftmax`` node by the same standard-op body.

A body is specialized on what ONNX functions cannot branch on: the margin (the Chebyshev
recurrence is unrolled for it) and whether labels are given; ``lambda`` stays an attribute
reference. When a model holds nodes of several such variants, each gets its own function
``overload`` (IR version 10).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import onnx
from lsoftmax.exporters.domain import DOMAIN, DOMAIN_VERSION
from lsoftmax.exporters.lgm import (
    LGM_DEFAULT_ALPHA,
    LGM_DEFAULT_ALPHA_LO,
    LGM_DEFAULT_INCLUDE_LOGDET,
    LGM_INPUTS,
    LGM_OUTPUTS,
)
from lsoftmax.exporters.margin_family import (
    MARGIN_LINEAR,
    MARGIN_LINEAR_DEFAULTS,
    MARGIN_LINEAR_INPUTS,
    MARGIN_LINEAR_SPECIALIZED,
    plain_variant,
)
from lsoftmax.exporters.portable import BUILDERS, AttrRef, NodeBuilder
from lsoftmax.exporters.translations import LSOFTMAX_LINEAR_DEFAULT_LAMBDA
from onnx import helper

__all__ = ["attach_functions", "custom_nodes", "inline_portable"]

# op_type -> (input names, attributes without defaults, attribute defaults): the function
# signature.
_SIGNATURES: dict[str, tuple[list[str], list[str], dict[str, float | int]]] = {
    "LSoftmaxLinear": (
        ["X", "W", "labels"],
        ["margin"],
        {"lambda": LSOFTMAX_LINEAR_DEFAULT_LAMBDA},
    ),
    "LGMLogits": (
        LGM_INPUTS,
        [],
        {
            "alpha": LGM_DEFAULT_ALPHA,
            "alpha_lo": LGM_DEFAULT_ALPHA_LO,
            "include_logdet": LGM_DEFAULT_INCLUDE_LOGDET,
        },
    ),
    # Every optional attribute is declared with its default (a conformant runtime requires a
    # node to carry each attribute declared without one); the body references only lambda.
    MARGIN_LINEAR: (MARGIN_LINEAR_INPUTS, ["kind"], dict(MARGIN_LINEAR_DEFAULTS)),
}
# Ops with several outputs (their builders take the list of output names); others output "Y".
_OUTPUTS: dict[str, list[str]] = {"LGMLogits": LGM_OUTPUTS}
# The last input of every signature is the optional one (labels).
# Attributes a body is specialized on (baked in), per op_type.
_SPECIALIZED: dict[str, tuple[str, ...]] = {
    "LSoftmaxLinear": ("margin",),
    MARGIN_LINEAR: MARGIN_LINEAR_SPECIALIZED,
}
# The specialized attributes that stand for every variant without labels (LSoftmaxLinear:
# margin 1, the plain logits; MarginLinear: one per normalization and scale).
_PLAIN_SPEC: dict[str, Callable[[dict[str, object]], dict[str, object]]] = {
    "LSoftmaxLinear": lambda attrs: {"margin": 1},
    MARGIN_LINEAR: plain_variant,
}


def custom_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        if node.domain == DOMAIN:
            yield node


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ValueError("model has no default-domain opset import")


def _variant(node: onnx.NodeProto) -> tuple[str, tuple[object, ...], bool]:
    attrs = _attrs(node)
    n = len(_SIGNATURES[node.op_type][0])
    has_optional = len(node.input) >= n and bool(node.input[n - 1])
    if not has_optional and node.op_type in _PLAIN_SPEC:
        # Without labels every margin gives the plain logits: one body (and no overloads, which
        # onnx's ReferenceEvaluator ignores) for all of them.
        attrs = _PLAIN_SPEC[node.op_type](attrs)
    spec = tuple(attrs.get(name) for name in _SPECIALIZED.get(node.op_type, ()))
    return node.op_type, spec, has_optional


def _make_function(
    op_type: str, spec: tuple[object, ...], has_labels: bool, opset: int, overload: str
) -> onnx.FunctionProto:
    inputs, required, defaults = _SIGNATURES[op_type]
    b = NodeBuilder()
    attrs: dict[str, object] = {
        k: v for k, v in zip(_SPECIALIZED.get(op_type, ()), spec, strict=True) if v is not None
    }
    for name in defaults:
        if name not in _SPECIALIZED.get(op_type, ()):
            attrs[name] = AttrRef(name)
    used_inputs: list[str | None] = list(inputs) if has_labels else [*inputs[:-1], None]
    # A node without labels calls a function without that input: a conformant runtime (onnx's
    # ReferenceEvaluator) requires the node's inputs to match the function's one for one.
    declared = list(inputs) if has_labels else list(inputs[:-1])
    outputs = _OUTPUTS.get(op_type, ["Y"])
    BUILDERS[op_type](b, used_inputs, outputs if op_type in _OUTPUTS else "Y", attrs)
    fn = helper.make_function(
        DOMAIN,
        op_type,
        inputs=declared,
        outputs=outputs,
        nodes=b.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=required,
        attribute_protos=[helper.make_attribute(k, v) for k, v in defaults.items()],
        doc_string=f"Standard-op body of {DOMAIN}::{op_type} (used when the lsoftmax ONNX "
        "Runtime library is not registered).",
    )
    if overload:
        fn.overload = overload
    return fn


def _overload_name(spec: tuple[object, ...], has_labels: bool, index: int) -> str:
    if not all(isinstance(v, int) for v in spec):  # MarginLinear: kinds and floats
        return f"v{index}_" + ("labels" if has_labels else "plain")
    parts = [f"m{v}" for v in spec] + ["labels"] if has_labels else ["plain"]
    return "_".join(parts)


def attach_functions(model: onnx.ModelProto) -> int:
    """Add the model-local functions in place; returns the IR version the model needs."""
    opset = _default_opset(model)
    variants: dict[tuple[str, tuple[object, ...], bool], list[onnx.NodeProto]] = {}
    for node in custom_nodes(model.graph):
        if node.op_type not in _SIGNATURES:
            raise ValueError(f"no function body known for {DOMAIN}::{node.op_type}")
        variants.setdefault(_variant(node), []).append(node)
    per_op: dict[str, int] = {}
    for op_type, _, _ in variants:
        per_op[op_type] = per_op.get(op_type, 0) + 1
    need_overloads = any(n > 1 for n in per_op.values())
    for index, ((op_type, spec, has_labels), nodes) in enumerate(variants.items()):
        overload = _overload_name(spec, has_labels, index) if per_op[op_type] > 1 else ""
        model.functions.append(_make_function(op_type, spec, has_labels, opset, overload))
        for node in nodes:
            while node.input and not node.input[-1]:  # an omitted optional input spelled ""
                del node.input[-1]
            if overload:
                node.overload = overload
    if not any(i.domain == DOMAIN for i in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    # Function attribute defaults need IR 9; per-node overloads IR 10.
    return 10 if need_overloads else 9


def inline_portable(model: onnx.ModelProto) -> None:
    """Replace every ``ai.lsoftmax`` node by its standard-op body, in place."""
    new_nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(model.graph.node):
        if node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        build = BUILDERS.get(node.op_type)
        if build is None:
            raise ValueError(f"no standard-op form known for {DOMAIN}::{node.op_type}")
        b = NodeBuilder(prefix=f"{node.name or node.op_type}_{i}/")
        attrs = {**_SIGNATURES[node.op_type][2], **_attrs(node)}
        outs = list(node.output) if node.op_type in _OUTPUTS else node.output[0]
        build(b, list(node.input), outs, attrs)
        new_nodes.extend(b.nodes)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    kept = [i for i in model.opset_import if i.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)

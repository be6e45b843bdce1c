"""Small models with an L-Softmax head, shared by the ONNX / ONNX Runtime tests.

``MLP`` and ``CNN`` return the plain logits of their ``LSoftmaxLinear`` head (the inference
graph); ``WithLabels(model, margin, lam)`` returns the margin logits through
``lsoftmax_logits(feat, head.weight, target, margin, lam)`` with a float ``lam``, the graph the
exporter can translate with labels. ``lgm_node_model`` is a graph of one ``LGMLogits`` node.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lsoftmax.torch import LSoftmaxLinear
from lsoftmax.torch.functional import lsoftmax_logits

NUM_CLASSES = 7


class MLP(nn.Module):
    input_shape = (12,)

    def __init__(self, margin: int = 4, feat_dim: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, feat_dim), nn.Tanh())
        self.head = LSoftmaxLinear(feat_dim, NUM_CLASSES, margin=margin)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class CNN(nn.Module):
    input_shape = (1, 8, 8)

    def __init__(self, margin: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()
        )
        self.head = LSoftmaxLinear(64, NUM_CLASSES, margin=margin)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class WithLabels(nn.Module):
    """``model``'s margin logits for ``(x, target)``: the graph exported with labels."""

    def __init__(self, model: nn.Module, margin: int, lam: float) -> None:
        super().__init__()
        self.model = model
        self.margin = margin
        self.lam = lam

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        feat = self.model.features(x)
        return lsoftmax_logits(feat, self.model.head.weight, target, self.margin, self.lam)


def make(kind: str, dtype: torch.dtype, margin: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = {"mlp": MLP, "cnn": CNN}[kind](margin=margin)
    return model.to(dtype).eval()


def inputs(
    model: nn.Module, batch: int, dtype: torch.dtype, seed: int = 1
) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *model.input_shape), generator=g, dtype=dtype)  # type: ignore[misc]
    t = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return x, t


def feeds(session: object, *arrays: Tensor | np.ndarray) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]  # type: ignore[attr-defined]
    assert len(names) == len(arrays), (names, len(arrays))
    return {
        n: (a.detach().numpy() if isinstance(a, Tensor) else a)
        for n, a in zip(names, arrays, strict=True)
    }


def with_margin(proto: object, margin: int) -> object:
    """A copy of an exported model (``ai.lsoftmax`` nodes) with every node's margin set to
    ``margin``: a torch export costs ~2 s, so margin sweeps reuse one exported graph."""
    import onnx

    assert isinstance(proto, onnx.ModelProto)
    out = copy_model(proto)
    for node in out.graph.node:
        if node.domain == "ai.lsoftmax":
            for attr in node.attribute:
                if attr.name == "margin":
                    attr.i = margin
    return out


def copy_model(proto: Any) -> Any:
    """A deep copy of an ``onnx.ModelProto`` (``finalize`` and friends edit theirs in place)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


# Exports shared by every test module in the process: (lam) -> (kind, dtype, labels) -> entry.
_EXPORTS: dict[float, dict[tuple[str, torch.dtype, bool], tuple[nn.Module, Any]]] = {}


def export_cache(
    tmp: Path, lam: float
) -> Callable[[str, torch.dtype, bool], tuple[nn.Module, Any]]:
    """``get(kind, dtype, with_labels) -> (model, custom-mode proto)``, each exported on first use
    in the process (an export costs ~2 s, more on a busy machine) and shared by the test modules
    (they copy the proto before changing it); with labels the graph is
    ``WithLabels(model, 4, lam)``."""
    from lsoftmax.exporters import export_onnx

    cache = _EXPORTS.setdefault(lam, {})

    def get(kind: str, dtype: torch.dtype, with_labels: bool) -> tuple[nn.Module, Any]:
        key = (kind, dtype, with_labels)
        if key not in cache:
            model = make(kind, dtype)
            x, t = inputs(model, 3, dtype)
            net = WithLabels(model, 4, lam) if with_labels else model
            args = (x, t) if with_labels else (x,)
            cache[key] = (model, export_onnx(net, args, tmp / "m.onnx", mode="custom"))
        return cache[key]

    return get


def lgm_node_model(
    dtype: int,
    c: int = 2,
    d: int = 3,
    dv: int | None = None,
    labels_type: int | None = 7,  # onnx.TensorProto.INT64
    **attrs: Any,
) -> bytes:
    """A serialized model of one ``ai.lsoftmax::LGMLogits`` node: inputs X (N, d), means (c, d),
    log_var (c, dv) (dv defaults to d) and labels (N,) of ONNX type ``labels_type`` (int64 by
    default; None: no labels input); ``attrs`` become node attributes."""
    import onnx

    h = onnx.helper
    inputs = [
        h.make_tensor_value_info("X", dtype, ["N", d]),
        h.make_tensor_value_info("means", dtype, [c, d]),
        h.make_tensor_value_info("log_var", dtype, [c, d if dv is None else dv]),
    ]
    if labels_type is not None:
        inputs.append(h.make_tensor_value_info("labels", labels_type, ["N"]))
    node = h.make_node(
        "LGMLogits",
        [i.name for i in inputs],
        ["logits", "loglik"],
        domain="ai.lsoftmax",
        **attrs,
    )
    outputs = [h.make_tensor_value_info(n, dtype, None) for n in ("logits", "loglik")]
    graph = h.make_graph([node], "g", inputs, outputs)
    return h.make_model(
        graph,
        opset_imports=[h.make_opsetid("", 18), h.make_opsetid("ai.lsoftmax", 1)],
        ir_version=9,
    ).SerializeToString()


def reference_kernels() -> list[type]:
    """``new_ops`` for ``onnx.reference.ReferenceEvaluator``: our ops over the numpy API
    (``lsoftmax.core``, ``lsoftmax.lgm_core``), so the evaluator runs custom-mode files."""
    from onnx.reference.op_run import OpRun

    from lsoftmax import core, lgm_core

    class LSoftmaxLinear(OpRun):
        op_domain = "ai.lsoftmax"

        def _run(self, X, W, labels=None, **attrs):  # type: ignore[no-untyped-def]
            y = None if labels is None else labels.astype(np.int64)
            lam = float(attrs.get("lambda", 0.0))
            return (core.forward(X, W, y, margin=int(attrs["margin"]), lam=lam).astype(X.dtype),)

    class LGMLogits(OpRun):
        op_domain = "ai.lsoftmax"

        def _run(self, X, means, log_var, labels=None, **attrs):  # type: ignore[no-untyped-def]
            y = None if labels is None else labels.astype(np.int64)
            logits, loglik = lgm_core.lgm_forward(
                X,
                means,
                log_var,
                y,
                alpha=float(attrs.get("alpha", 0.0)),
                include_logdet=bool(attrs.get("include_logdet", 1)),
            )
            return logits.astype(X.dtype), loglik.astype(X.dtype)

    class MarginLinear(OpRun):
        op_domain = "ai.lsoftmax"

        def _run(self, X, W, labels=None, **attrs):  # type: ignore[no-untyped-def]
            from lsoftmax.exporters.margin_family import margin_from_attributes

            # The evaluator passes every schema attribute, absent ones as None.
            given = {k: v for k, v in attrs.items() if v is not None}
            spec, lam = margin_from_attributes(given)
            y = None if labels is None else labels.astype(np.int64)
            return (core.forward(X, W, y, margin=spec, lam=lam).astype(X.dtype),)

    return [LSoftmaxLinear, LGMLogits, MarginLinear]

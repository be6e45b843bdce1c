"""``export_onnx``: a torch model with ``lsoftmax`` layers -> a checked ONNX file."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import onnx
from lsoftmax.exporters.domain import MIN_OPSET
from lsoftmax.exporters.functions import attach_functions, custom_nodes, inline_portable
from lsoftmax.exporters.translations import TrainingOpError, translation_table

__all__ = ["MODES", "check", "export_onnx", "finalize", "output_names"]

MODES = ("portable", "custom", "function")


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    import torch

    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        items = tuple(example_inputs)
        for i, a in enumerate(items):
            if not isinstance(a, torch.Tensor):
                raise TypeError(
                    f"example_inputs[{i}] must be a torch.Tensor, got {type(a).__name__}"
                )
        if not items:
            raise ValueError("example_inputs must hold at least one tensor")
        return items
    kind = type(example_inputs).__name__
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {kind}")


def _batch_ready(args: tuple[Any, ...]) -> tuple[Any, ...]:
    # torch.export specializes a dimension of size 1, so a batch-1 example would fix the batch.
    import torch

    if any(a.dim() == 0 for a in args):
        raise ValueError("dynamic_batch=True needs every example input to have a batch dimension")
    batch = {a.shape[0] for a in args}
    if len(batch) != 1:
        raise ValueError(f"example inputs disagree on the batch size: {sorted(batch)}")
    if batch == {1}:
        return tuple(torch.cat([a, a]) for a in args)
    return args


def _find_cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kind):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _min_ir_version(model: onnx.ModelProto) -> int:
    return onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)


def _name_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Rename the graph outputs (the exporter calls them after their last node, e.g.
    ``linear_2``) to ``names``, where the count matches and no other value has that name."""
    graph = proto.graph
    if len(graph.output) != len(names):
        return proto
    used = {v for n in graph.node for v in (*n.input, *n.output)}
    used |= {v.name for v in (*graph.input, *graph.initializer)}
    renames = {}
    for out, name in zip(graph.output, names, strict=True):
        if out.name != name and name not in used:
            renames[out.name] = name
    for node in graph.node:
        for i, v in enumerate(node.output):
            node.output[i] = renames.get(v, v)
        for i, v in enumerate(node.input):
            node.input[i] = renames.get(v, v)
    for info in graph.value_info:
        info.name = renames.get(info.name, info.name)
    for out in graph.output:
        out.name = renames.get(out.name, out.name)
    return proto


def output_names(model: Any) -> list[str]:
    """The names ``export_onnx`` gives the outputs: the model's ``onnx_output_names`` (converted
    nets: ``probabilities`` for a softmax output; the L-GM inference wrapper: ``logits``,
    ``loglik``), else ``logits`` for a single output."""
    names = getattr(model, "onnx_output_names", None)
    if callable(names):
        names = names()
    if names is None:
        return ["logits"]
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"onnx_output_names must be a list of non-empty strings, got {names!r}")
    return list(names)


def finalize(proto: onnx.ModelProto, mode: str) -> onnx.ModelProto:
    """Turn an exported model (``ai.lsoftmax`` nodes, as the translations emit them) into
    ``mode``, in place, with the lowest IR version its content needs (so older runtimes load
    it too)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "portable":
        inline_portable(proto)
        proto.ir_version = _min_ir_version(proto)
    elif mode == "function" and any(True for _ in custom_nodes(proto.graph)):
        proto.ir_version = max(_min_ir_version(proto), attach_functions(proto))
    else:
        proto.ir_version = _min_ir_version(proto)
    return proto


def check(model: onnx.ModelProto) -> None:
    """The checks every exported file passes: full checker and strict shape inference."""
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def export_onnx(
    model: Any,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    mode: str = "function",
    opset: int | None = None,
    dynamic_batch: bool = True,
) -> onnx.ModelProto:
    """Export ``model`` (called as ``model(*example_inputs)``) to ONNX at ``path``.

    ``mode``: ``"portable"`` (standard ONNX ops only), ``"custom"`` (``ai.lsoftmax`` nodes, needs
    the lsoftmax ONNX Runtime library) or ``"function"`` (``ai.lsoftmax`` nodes plus model-local
    functions: our kernel where the library is registered, standard ops elsewhere).
    ``opset``: default-domain opset (>= 18; default: torch's). ``dynamic_batch``: the first
    dimension of every input and output is a symbolic ``batch``. The outputs are named by
    ``output_names(model)``. Returns the saved model.
    """
    import torch

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if opset is not None and (
        isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET
    ):
        raise ValueError(f"opset must be an int >= {MIN_OPSET}, got {opset!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = _as_tuple(example_inputs)
    dynamic_shapes = None
    if dynamic_batch:
        args = _batch_ready(args)
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in args)
    kwargs: dict[str, Any] = {}
    if opset is not None:
        kwargs["opset_version"] = opset
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                args,
                dynamo=True,
                custom_translation_table=translation_table(),
                dynamic_shapes=dynamic_shapes,
                verbose=False,
                **kwargs,
            )
    except Exception as e:
        cause = _find_cause(e, TrainingOpError)
        if cause is not None:
            raise TrainingOpError(str(cause)) from None
        raise
    proto = finalize(_name_outputs(program.model_proto, output_names(model)), mode)
    check(proto)
    onnx.save(proto, os.fspath(path))
    return proto

"""``ConvertedNet``: a converted model as real torch submodules run over named blobs.

Both converters produce one: a list of nodes in topological order, each a submodule with named
input and output blobs. Everything is static Python over ``nn.Module``s, so ``torch.export``
(and the ONNX exporter) trace it into a plain graph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ConvertedNet", "GraphBuilder", "MappingRow", "Node", "format_mapping"]

# How a node calls its module:
#   "plain": module(*inputs) -> one tensor
#   "lsoftmax": LSoftmaxLinear(x, target) -> logits; target is the label only in training mode
#   "lgm": LGMLoss(x) -> (loss, logits) in eval, LGMLoss(x, target) in training; keeps logits
NODE_KINDS = ("plain", "lsoftmax", "lgm")


@dataclass(frozen=True)
class Node:
    key: str  # submodule name in ConvertedNet.layers
    source_name: str
    inputs: tuple[str, ...]
    output: str
    kind: str = "plain"
    label: str | None = None  # blob holding the labels, for "lsoftmax" / "lgm"
    flatten_from: int | None = None  # flatten the first input from this axis first


@dataclass
class MappingRow:
    """One line of the conversion report: what a source layer became."""

    source_name: str
    source_type: str
    target: str
    params: str = ""
    note: str = ""


def format_mapping(rows: list[MappingRow]) -> str:
    """The report as an aligned text table."""
    header = MappingRow("source name", "source type", "torch module", "params", "note")
    table = [header, *rows]
    cols = ["source_name", "source_type", "target", "params", "note"]
    widths = [max(len(getattr(r, c)) for r in table) for c in cols]
    lines = []
    for i, r in enumerate(table):
        cells = [getattr(r, c).ljust(w) for c, w in zip(cols, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def param_shapes(module: nn.Module) -> str:
    parts = [f"{n}{list(p.shape)}" for n, p in module.named_parameters()]
    parts += [f"{n}{list(b.shape)}" for n, b in module.named_buffers() if b.dim() > 0]
    return " ".join(parts)


class ConvertedNet(nn.Module):
    """A converted network: ``forward(data, label=None)``.

    Returns the output blob (or a tuple, in ``output_names`` order, when the source net has
    several). ``label`` is used only in training mode, by margin heads (L-Softmax, L-GM), which
    then return their training logits; in eval mode the output does not depend on it.
    """

    def __init__(
        self,
        layers: nn.ModuleDict,
        nodes: list[Node],
        aliases: dict[str, str],
        data_name: str,
        label_name: str | None,
        output_names: list[str],
        mapping: list[MappingRow],
        source: dict[str, Any],
    ) -> None:
        super().__init__()
        self.layers = layers
        self.nodes = list(nodes)
        self.aliases = dict(aliases)
        self.data_name = data_name
        self.label_name = label_name
        self.output_names = list(output_names)
        self.mapping = list(mapping)
        self.source = dict(source)

    def forward(self, data: Tensor, label: Tensor | None = None) -> Tensor | tuple[Tensor, ...]:
        blobs: dict[str, Tensor] = {self.data_name: data}
        if label is not None and self.label_name is not None:
            blobs[self.label_name] = label

        def get(name: str) -> Tensor:
            return blobs[self.aliases.get(name, name)]

        for node in self.nodes:
            module = self.layers[node.key]
            args = [get(n) for n in node.inputs]
            if node.flatten_from is not None:
                args[0] = torch.flatten(args[0], node.flatten_from)
            if node.kind == "plain":
                out = module(*args)
            else:
                target = None
                if self.training and node.label is not None:
                    label_blob = self.aliases.get(node.label, node.label)
                    target = blobs.get(label_blob)
                if node.kind == "lsoftmax":
                    out = module(args[0], target)
                else:
                    out = (module(args[0], target) if target is not None else module(args[0]))[1]
            blobs[node.output] = out
        outs = tuple(get(n) for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def onnx_output_names(self) -> list[str]:
        """Names for the exported ONNX outputs (``lsoftmax.exporters.output_names``): one output
        is ``probabilities`` when a softmax produces it (MXNet's SoftmaxOutput, Caffe's Softmax)
        and ``logits`` otherwise; several keep their source names."""
        if len(self.output_names) != 1:
            return list(self.output_names)
        name = self.aliases.get(self.output_names[0], self.output_names[0])
        producer = next((n for n in reversed(self.nodes) if n.output == name), None)
        if producer is not None and isinstance(self.layers[producer.key], nn.Softmax):
            return ["probabilities"]
        return ["logits"]

    def extra_repr(self) -> str:
        return f"data={self.data_name!r}, label={self.label_name!r}, outputs={self.output_names!r}"


@dataclass
class GraphBuilder:
    """Collects nodes while a converter walks a source net; tracks blob versions.

    Caffe reuses a blob name for in-place layers (``top == bottom``); every write gets a fresh
    internal name (``conv1``, ``conv1@1``, ...) so the executor never overwrites a tensor that
    an earlier node still needs, and each source name resolves to its latest version.
    """

    layers: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    nodes: list[Node] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    current: dict[str, str] = field(default_factory=dict)
    mapping: list[MappingRow] = field(default_factory=list)
    consumed: set[str] = field(default_factory=set)
    produced: list[str] = field(default_factory=list)
    _versions: dict[str, int] = field(default_factory=dict)

    def define_input(self, name: str) -> str:
        self.current[name] = name
        self._versions[name] = 0
        return name

    def has(self, name: str) -> bool:
        return name in self.current

    def resolve(self, name: str) -> str:
        return self.current[name]

    def _new_version(self, name: str) -> str:
        v = self._versions.get(name, -1) + 1
        self._versions[name] = v
        internal = name if v == 0 else f"{name}@{v}"
        self.current[name] = internal
        return internal

    def module_key(self, source_name: str) -> str:
        key = re.sub(r"[^0-9A-Za-z_]", "_", source_name) or "layer"
        if key[0].isdigit():
            key = f"l_{key}"
        base, i = key, 1
        while key in self.layers:
            i += 1
            key = f"{base}_{i}"
        return key

    def add(
        self,
        source_name: str,
        module: nn.Module,
        inputs: list[str],
        output: str,
        *,
        kind: str = "plain",
        label: str | None = None,
        flatten_from: int | None = None,
    ) -> Node:
        key = self.module_key(source_name)
        self.layers[key] = module
        internal_inputs = tuple(self.resolve(n) for n in inputs)
        # Reading an alias (a Split top) reads the tensor it stands for.
        self.consumed.update(self.aliases.get(n, n) for n in internal_inputs)
        internal_label = self.resolve(label) if label is not None else None
        node = Node(
            key=key,
            source_name=source_name,
            inputs=internal_inputs,
            output=self._new_version(output),
            kind=kind,
            label=internal_label,
            flatten_from=flatten_from,
        )
        self.nodes.append(node)
        self.produced.append(node.output)
        return node

    def alias(self, new_name: str, existing: str) -> None:
        """``new_name`` refers to the same tensor as ``existing`` (Split, identity layers)."""
        target = self.resolve(existing)
        internal = self._new_version(new_name)
        if internal != target:
            self.aliases[internal] = self.aliases.get(target, target)

    def outputs(self) -> list[str]:
        """Latest versions of produced blobs that no kept node reads: the net's outputs."""
        latest = set(self.current.values())
        outs = []
        for internal in self.produced:
            if internal in latest and internal not in self.consumed:
                outs.append(internal)
        return outs

    def build(self, data_name: str, label_name: str | None, source: dict[str, Any]) -> ConvertedNet:
        outputs = self.outputs()
        if not outputs:
            raise ValueError("the converted net has no output (every layer was dropped)")
        return ConvertedNet(
            self.layers,
            self.nodes,
            self.aliases,
            data_name,
            label_name,
            outputs,
            self.mapping,
            source,
        )

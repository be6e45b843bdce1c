"""MXNet symbol JSON + ``.params`` -> ``ConvertedNet``.

Nodes of the symbol graph are already in topological order. ``null`` nodes are either
parameters (found in the params file as ``arg:NAME``/``aux:NAME``, or plain ``NAME``) or net
inputs (data, and the label read by ``SoftmaxOutput`` / the L-Softmax op).
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import torch
from lsoftmax.converters.graph import ConvertedNet, GraphBuilder, MappingRow, param_shapes
from lsoftmax.converters.limits import MAX_ATTRIBUTE_CHARS
from lsoftmax.converters.modules import BatchNorm, Concat, Eltwise, GlobalPool, InnerProduct
from lsoftmax.converters.mxnet_params import read_params
from torch import nn

__all__ = ["SUPPORTED_OPS", "from_mxnet"]


def _attrs(node: dict[str, Any]) -> dict[str, str]:
    # MXNet >= 1.0 writes "attrs"; older versions "attr" or "param".
    for key in ("attrs", "attr", "param"):
        value = node.get(key)
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
    return {}


@dataclass
class _Node:
    index: int
    op: str
    name: str
    attrs: dict[str, str]
    inputs: list[int]


@dataclass
class _Converter:
    symbol_path: str
    params_path: str
    params: dict[str, np.ndarray]
    nodes: list[_Node]
    keep_softmax: bool
    builder: GraphBuilder = field(default_factory=GraphBuilder)
    param_nodes: set[int] = field(default_factory=set)

    def fail(self, node: _Node, msg: str) -> NoReturn:
        raise ValueError(f"{self.symbol_path}: node {node.name!r} ({self.op_name(node)}): {msg}")

    @staticmethod
    def op_name(node: _Node) -> str:
        if node.op == "Custom":
            return f"Custom:{node.attrs.get('op_type', '?')}"
        return node.op

    # ---- attributes ------------------------------------------------------------------------

    def attr(self, node: _Node, key: str, default: Any, kind: Callable[[str], Any]) -> Any:
        if key not in node.attrs:
            return default
        raw = node.attrs[key]
        # Before parsing: literal_eval of a huge nest of brackets exhausts memory.
        if len(raw) > MAX_ATTRIBUTE_CHARS:
            self.fail(
                node,
                f"attribute {key} is {len(raw)} characters long, more than the "
                f"{MAX_ATTRIBUTE_CHARS} accepted",
            )
        try:
            return kind(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            self.fail(node, f"bad attribute {key}={raw!r}")

    @staticmethod
    def _bool(s: str) -> bool:
        if s.lower() in ("true", "1"):
            return True
        if s.lower() in ("false", "0"):
            return False
        raise ValueError(s)

    def tup(self, node: _Node, key: str, default: tuple[int, ...] | None) -> tuple[int, ...]:
        def parse(s: str) -> tuple[int, ...]:
            v = ast.literal_eval(s)
            v = (v,) if isinstance(v, int) else tuple(v)
            if not all(isinstance(x, int) for x in v):
                raise ValueError(s)
            return v

        value = self.attr(node, key, default, parse)
        if value is None:
            self.fail(node, f"missing attribute {key}")
        if any(v < (0 if key == "pad" else 1) for v in value):
            self.fail(node, f"attribute {key}={value} out of range")
        return value

    # ---- params ----------------------------------------------------------------------------

    def weight(
        self, node: _Node, input_i: int, expected: tuple[int | None, ...], what: str
    ) -> torch.Tensor:
        if input_i >= len(node.inputs):
            self.fail(node, f"has no input {input_i} ({what})")
        pnode = self.nodes[node.inputs[input_i]]
        if pnode.op != "null":
            self.fail(
                node, f"{what} is computed by node {pnode.name!r}; only stored params are supported"
            )
        for key in (f"arg:{pnode.name}", f"aux:{pnode.name}", pnode.name):
            if key in self.params:
                array = self.params[key]
                break
        else:
            raise ValueError(
                f"{self.params_path}: no array {pnode.name!r} ({what} of node {node.name!r})"
            )
        self.param_nodes.add(pnode.index)
        ok = array.ndim == len(expected) and all(
            e is None or e == s for e, s in zip(expected, array.shape, strict=True)
        )
        if not ok:
            want = ["?" if e is None else e for e in expected]
            raise ValueError(
                f"{self.params_path}: {pnode.name!r} ({what} of node {node.name!r}) has shape "
                f"{list(array.shape)}, expected {want} from {self.symbol_path}"
            )
        if array.size == 0:
            raise ValueError(
                f"{self.params_path}: {pnode.name!r} ({what} of node {node.name!r}) is empty"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{self.params_path}: {pnode.name!r} has dtype {array.dtype}")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    def data_input(self, node: _Node, i: int = 0) -> str:
        if i >= len(node.inputs):
            self.fail(node, f"has no input {i}")
        return self.nodes[node.inputs[i]].name

    def add(self, node: _Node, module: nn.Module, note: str = "", **kw: Any) -> None:
        self.builder.add(node.name, module, [self.data_input(node)], node.name, **kw)
        self.builder.mapping.append(
            MappingRow(
                node.name, self.op_name(node), type(module).__name__, param_shapes(module), note
            )
        )

    # ---- ops -------------------------------------------------------------------------------

    def convolution(self, node: _Node) -> None:
        kernel = self.tup(node, "kernel", None)
        if len(kernel) != 2:
            self.fail(node, f"only 2-D convolution is supported, kernel {kernel}")
        if node.attrs.get("layout", "NCHW") not in ("NCHW", "None"):
            self.fail(node, f"layout {node.attrs['layout']} is not supported")
        stride = self.tup(node, "stride", (1, 1)) or (1, 1)
        dilate = self.tup(node, "dilate", (1, 1)) or (1, 1)
        pad = self.tup(node, "pad", (0, 0)) or (0, 0)
        cout = self.attr(node, "num_filter", None, int)
        if cout is None:
            self.fail(node, "missing attribute num_filter")
        group = self.attr(node, "num_group", 1, int)
        no_bias = self.attr(node, "no_bias", False, self._bool)
        w = self.weight(node, 1, (cout, None, *kernel), "weight")
        cin = int(w.shape[1]) * group
        conv = nn.Conv2d(cin, cout, kernel, stride, pad, dilate, group, bias=not no_bias)
        with torch.no_grad():
            conv.weight.copy_(w)
            if conv.bias is not None:
                conv.bias.copy_(self.weight(node, 2, (cout,), "bias"))
        self.add(node, conv)

    def pooling(self, node: _Node) -> None:
        pool_type = node.attrs.get("pool_type", "max")
        if pool_type not in ("max", "avg", "sum"):
            self.fail(node, f"pool_type {pool_type!r} is not supported")
        if self.attr(node, "global_pool", False, self._bool):
            self.add(node, GlobalPool(pool_type))
            return
        if pool_type == "sum":
            self.fail(node, "non-global sum pooling is not supported")
        kernel = self.tup(node, "kernel", None)
        if len(kernel) != 2:
            self.fail(node, f"only 2-D pooling is supported, kernel {kernel}")
        stride = self.tup(node, "stride", (1, 1)) or (1, 1)
        pad = self.tup(node, "pad", (0, 0)) or (0, 0)
        convention = node.attrs.get("pooling_convention", "valid")
        if convention not in ("valid", "full"):
            self.fail(node, f"pooling_convention {convention!r} is not supported")
        if any(2 * p > k for p, k in zip(pad, kernel, strict=True)):
            self.fail(node, f"pad {pad} larger than half the kernel {kernel}")
        ceil = convention == "full"
        pool: nn.Module
        if pool_type == "max":
            pool = nn.MaxPool2d(kernel, stride, pad, ceil_mode=ceil)
        else:
            include_pad = self.attr(node, "count_include_pad", True, self._bool)
            pool = nn.AvgPool2d(kernel, stride, pad, ceil_mode=ceil, count_include_pad=include_pad)
        self.add(node, pool, f"pooling_convention={convention}")

    def fully_connected(self, node: _Node) -> None:
        n = self.attr(node, "num_hidden", None, int)
        if n is None:
            self.fail(node, "missing attribute num_hidden")
        no_bias = self.attr(node, "no_bias", False, self._bool)
        flatten = self.attr(node, "flatten", True, self._bool)
        w = self.weight(node, 1, (n, None), "weight")
        fc = InnerProduct(int(w.shape[1]), n, not no_bias, 1 if flatten else -1)
        with torch.no_grad():
            fc.weight.copy_(w)
            if not no_bias:
                fc.bias.copy_(self.weight(node, 2, (n,), "bias"))
        self.add(node, fc, "" if flatten else "flatten=False: last axis")

    def activation(self, node: _Node) -> None:
        acts: dict[str, Callable[[], nn.Module]] = {
            "relu": nn.ReLU,
            "sigmoid": nn.Sigmoid,
            "tanh": nn.Tanh,
            "softrelu": nn.Softplus,
            "softsign": nn.Softsign,
        }
        act = node.attrs.get("act_type", "")
        if act not in acts:
            self.fail(node, f"act_type {act!r} is not supported")
        self.add(node, acts[act]())

    def leaky_relu(self, node: _Node) -> None:
        act = node.attrs.get("act_type", "leaky")
        slope = self.attr(node, "slope", 0.25, float)
        if act == "leaky":
            self.add(node, nn.LeakyReLU(slope))
        elif act == "elu":
            self.add(node, nn.ELU(slope))
        elif act == "prelu":
            gamma = self.weight(node, 1, (None,), "gamma")
            m = nn.PReLU(int(gamma.shape[0]))
            with torch.no_grad():
                m.weight.copy_(gamma)
            self.add(node, m)
        else:
            self.fail(node, f"act_type {act!r} is not supported")

    def batch_norm(self, node: _Node) -> None:
        if self.attr(node, "axis", 1, int) != 1:
            self.fail(node, "only axis=1 is supported")
        eps = self.attr(node, "eps", 1e-3, float)
        momentum = self.attr(node, "momentum", 0.9, float)
        fix_gamma = self.attr(node, "fix_gamma", True, self._bool)
        global_stats = self.attr(node, "use_global_stats", False, self._bool)
        mean = self.weight(node, 3, (None,), "moving_mean")
        c = int(mean.shape[0])
        var = self.weight(node, 4, (c,), "moving_var")
        beta = self.weight(node, 2, (c,), "beta")
        bn = BatchNorm(c, eps, 1.0 - momentum, True, global_stats)
        assert bn.weight is not None and bn.bias is not None
        with torch.no_grad():
            if fix_gamma:
                # MXNet ignores the stored gamma when fix_gamma is set (it is 1 in use).
                self.weight(node, 1, (c,), "gamma")
                bn.weight.fill_(1.0)
                bn.weight.requires_grad_(False)
            else:
                bn.weight.copy_(self.weight(node, 1, (c,), "gamma"))
            bn.bias.copy_(beta)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        self.add(node, bn, "fix_gamma: gamma=1" if fix_gamma else "")

    def flatten(self, node: _Node) -> None:
        self.add(node, nn.Flatten())

    def dropout(self, node: _Node) -> None:
        if node.attrs.get("mode", "training") != "training":
            self.fail(node, f"dropout mode {node.attrs['mode']!r} is not supported")
        self.add(node, nn.Dropout(self.attr(node, "p", 0.5, float)))

    def softmax_output(self, node: _Node) -> None:
        if node.op == "SoftmaxOutput" and self.attr(node, "multi_output", False, self._bool):
            self.fail(node, "multi_output is not supported")
        if self.keep_softmax:
            axis = self.attr(node, "axis", -1, int) if node.op == "softmax" else 1
            self.add(node, nn.Softmax(dim=axis), "MXNet's forward output: probabilities")
        else:
            self.builder.alias(node.name, self.data_input(node))
            self.builder.mapping.append(
                MappingRow(node.name, node.op, "(dropped)", "", "outputs the logits")
            )

    def combine(self, node: _Node) -> None:
        if len(node.inputs) < 2 and node.op not in ("Concat", "concat"):
            self.fail(node, "needs at least 2 inputs")
        module: nn.Module
        if node.op in ("Concat", "concat"):
            module = Concat(self.attr(node, "dim", 1, int))
        else:
            module = Eltwise("prod" if node.op in ("elemwise_mul", "_Mul", "_mul") else "sum")
        names = [self.data_input(node, i) for i in range(len(node.inputs))]
        self.builder.add(node.name, module, names, node.name)
        self.builder.mapping.append(
            MappingRow(node.name, node.op, type(module).__name__, "", module.extra_repr())
        )

    def lsoftmax(self, node: _Node) -> None:
        from lsoftmax.schedules import Scaled
        from lsoftmax.torch import LSoftmaxLinear

        n = self.attr(node, "num_hidden", None, int)
        margin = self.attr(node, "margin", None, int)
        if n is None or margin is None:
            self.fail(node, "needs attributes num_hidden and margin")
        try:
            schedule = Scaled(
                self.attr(node, "beta", 1.0, float),
                self.attr(node, "scale", 1.0, float),
                self.attr(node, "beta_min", 0.0, float),
            )
        except (ValueError, TypeError) as e:
            self.fail(node, f"bad beta schedule: {e}")
        if len(node.inputs) != 3:
            self.fail(node, f"needs inputs [data, label, weight], has {len(node.inputs)}")
        w = self.weight(node, 2, (n, None), "weight")
        try:
            head = LSoftmaxLinear(int(w.shape[1]), n, margin, schedule)
        except (ValueError, TypeError) as e:
            self.fail(node, str(e))
        with torch.no_grad():
            head.weight.copy_(w)
        label = self.data_input(node, 1)
        self.add(
            node,
            head,
            f"eval: plain logits; train: margin {margin}, lambda=beta",
            kind="lsoftmax",
            label=label if self.builder.has(label) else None,
            flatten_from=1,
        )

    def handlers(self) -> dict[str, Callable[[_Node], None]]:
        return {
            "Convolution": self.convolution,
            "Pooling": self.pooling,
            "FullyConnected": self.fully_connected,
            "Activation": self.activation,
            "LeakyReLU": self.leaky_relu,
            "BatchNorm": self.batch_norm,
            "Flatten": self.flatten,
            "flatten": self.flatten,
            "Dropout": self.dropout,
            "SoftmaxOutput": self.softmax_output,
            "softmax": self.softmax_output,
            "SoftmaxActivation": self.softmax_output,
            "elemwise_add": self.combine,
            "_Plus": self.combine,
            "_plus": self.combine,
            "elemwise_mul": self.combine,
            "_Mul": self.combine,
            "_mul": self.combine,
            "Concat": self.combine,
            "concat": self.combine,
            "LSoftmax": self.lsoftmax,
            "Custom:LSoftmax": self.lsoftmax,
        }


SUPPORTED_OPS = (
    "Convolution",
    "Pooling",
    "FullyConnected",
    "Activation",
    "LeakyReLU",
    "BatchNorm",
    "Flatten",
    "Dropout",
    "elemwise_add/_Plus",
    "elemwise_mul/_Mul",
    "Concat",
    "SoftmaxOutput",
    "softmax",
    "SoftmaxActivation",
    "LSoftmax",
    "Custom(op_type=LSoftmax)",
)


def _load_symbol(path: str) -> tuple[list[_Node], list[int]]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror or e}") from e
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not a symbol JSON file ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise ValueError(f"{path}: not an MXNet symbol file (no 'nodes' list)")
    nodes: list[_Node] = []
    for i, raw_node in enumerate(doc["nodes"]):
        try:
            inputs = [int(ref[0]) for ref in raw_node.get("inputs", [])]
            outs = [int(ref[1]) if len(ref) > 1 else 0 for ref in raw_node.get("inputs", [])]
            node = _Node(i, str(raw_node["op"]), str(raw_node["name"]), _attrs(raw_node), inputs)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            raise ValueError(f"{path}: malformed node {i}") from None
        if any(not 0 <= j < i for j in inputs):
            raise ValueError(f"{path}: node {node.name!r} reads a node that does not precede it")
        if any(o != 0 for o in outs):
            raise ValueError(
                f"{path}: node {node.name!r} reads a secondary output; only output 0 is supported"
            )
        nodes.append(node)
    try:
        heads = [int(h[0]) for h in doc.get("heads", [])]
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"{path}: malformed heads") from None
    if not nodes or not heads or any(not 0 <= h < len(nodes) for h in heads):
        raise ValueError(f"{path}: no valid heads")
    return nodes, heads


def from_mxnet(
    symbol_json: str | os.PathLike[str],
    params: str | os.PathLike[str],
    *,
    keep_softmax: bool = True,
) -> ConvertedNet:
    """Convert an MXNet checkpoint (``prefix-symbol.json`` + ``prefix-NNNN.params``), eval mode.

    ``keep_softmax``: ``SoftmaxOutput`` becomes ``nn.Softmax`` (MXNet's own forward output,
    probabilities); with False it is dropped and the net outputs the logits.
    """
    sym_path, params_path = os.fspath(symbol_json), os.fspath(params)
    nodes, heads = _load_symbol(sym_path)
    conv = _Converter(sym_path, params_path, read_params(params_path), nodes, keep_softmax)
    handlers = conv.handlers()
    for node in nodes:
        if node.op != "null" and conv.op_name(node) not in handlers:
            raise ValueError(
                f"{sym_path}: node {node.name!r} has unsupported op {conv.op_name(node)!r} "
                f"(supported: {', '.join(SUPPORTED_OPS)})"
            )
    # Inputs: null nodes read as data (input 0) or as labels; null nodes read at any other
    # position are parameters, which must then be in the params file.
    label_ids = {
        n.inputs[1]
        for n in nodes
        if conv.op_name(n) in ("SoftmaxOutput", "LSoftmax", "Custom:LSoftmax") and len(n.inputs) > 1
    }
    param_ids = {
        j for n in nodes for j in n.inputs[1:] if nodes[j].op == "null" and j not in label_ids
    }
    free = [n for n in nodes if n.op == "null" and n.index not in param_ids]
    labels = [n for n in free if n.index in label_ids]
    datas = [n for n in free if n.index not in label_ids]
    if len(datas) != 1 or len(labels) > 1:
        raise ValueError(
            f"{sym_path}: expected one data input and at most one label, found "
            f"{[n.name for n in free]}"
        )
    data_name = conv.builder.define_input(datas[0].name)
    label_name = conv.builder.define_input(labels[0].name) if labels else None
    conv.builder.mapping.append(MappingRow(datas[0].name, "null", "(input)", "", "data"))
    for node in nodes:
        if node.op != "null":
            handlers[conv.op_name(node)](node)
    net = conv.builder.build(
        data_name,
        label_name,
        {"format": "mxnet", "symbol": sym_path, "params": params_path},
    )
    head_names = [nodes[h].name for h in heads]
    resolved = [conv.builder.resolve(n) for n in head_names]
    net.output_names = [conv.builder.aliases.get(n, n) for n in resolved]
    return net.eval()

"""Read Caffe ``.prototxt`` / ``.caffemodel`` files into a uniform layer list.

Both the current ``layer`` (V2) format and the legacy ``layers`` (V1, enum types, 4-D blobs)
are read. Every failure is a ``ValueError`` that names the file (and the layer where known).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
from google.protobuf import message as pb_message
from google.protobuf import text_format
from lsoftmax.converters.limits import MAX_TENSOR_ELEMENTS, check_elements
from lsoftmax.converters.proto_schema import load_proto

__all__ = [
    "CaffeBlob",
    "CaffeLayer",
    "parse_blob",
    "parse_caffemodel",
    "read_caffemodel",
    "read_prototxt",
    "schema",
]

# Caffe's UpgradeV1LayerType: V1 enum name -> layer type string.
V1_TYPES = {
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DATA": "Data",
    "DECONVOLUTION": "Deconvolution",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}


@functools.cache
def schema() -> dict[str, Any]:
    """The message classes of ``caffe.proto`` (parsed once)."""
    proto = resources.files("lsoftmax.converters").joinpath("caffe.proto")
    return load_proto(str(proto), proto.read_text(encoding="utf-8"))


@dataclass
class CaffeBlob:
    data: np.ndarray  # float32 (or float64 for double_data), already in `shape`
    legacy: bool  # a V1 blob: shape is (num, channels, height, width)

    def matches(self, expected: tuple[int, ...]) -> bool:
        """Caffe's rule: a legacy 4-D blob fits a shape whose left-padded 4-D form equals it."""
        shape = tuple(self.data.shape)
        if shape == tuple(expected):
            return True
        if self.legacy and len(expected) <= 4:
            return shape == (1,) * (4 - len(expected)) + tuple(expected)
        return False


@dataclass
class CaffeLayer:
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    msg: Any  # the LayerParameter / V1LayerParameter (its *_param fields)
    param_names: list[str] = field(default_factory=list)
    blobs: list[CaffeBlob] = field(default_factory=list)
    include: list[Any] = field(default_factory=list)
    exclude: list[Any] = field(default_factory=list)

    def param(self, name: str) -> Any:
        """The ``name`` parameter message (``"pooling_param"``); its defaults where the file's
        format has no such field (V1 has no ``flatten_param``, for one)."""
        if name in self.msg.DESCRIPTOR.fields_by_name:
            return getattr(self.msg, name)
        return getattr(schema()["caffe.LayerParameter"](), name)


@dataclass
class CaffeNet:
    path: str
    name: str
    layers: list[CaffeLayer]
    inputs: list[tuple[str, tuple[int, ...] | None]]  # NetParameter.input (+ shapes)
    legacy: bool


def _blob(msg: Any, where: str, legacy: bool) -> CaffeBlob:
    if msg.HasField("shape"):
        shape = tuple(int(d) for d in msg.shape.dim)
        legacy_blob = False
    else:
        shape = (msg.num, msg.channels, msg.height, msg.width)
        legacy_blob = True
    count = check_elements(where, "blob", shape, MAX_TENSOR_ELEMENTS)
    stored = len(msg.double_data) or len(msg.data)
    if stored != count:
        raise ValueError(
            f"{where}: blob holds {stored} values but its shape {list(shape)} needs {count}"
        )
    if len(msg.double_data):
        data = np.asarray(msg.double_data, dtype=np.float64)
    else:
        data = np.asarray(msg.data, dtype=np.float32)
    if data.size != count:
        raise ValueError(
            f"{where}: blob holds {data.size} values but its shape {list(shape)} needs {count}"
        )
    return CaffeBlob(data.reshape(shape), legacy or legacy_blob)


def _layers(net: Any, path: str) -> tuple[list[CaffeLayer], bool]:
    if len(net.layer) and len(net.layers):
        raise ValueError(f"{path}: uses both `layer` and legacy `layers`; Caffe rejects this")
    out: list[CaffeLayer] = []
    if len(net.layers):
        enum = net.layers[0].DESCRIPTOR.fields_by_name["type"].enum_type
        for i, v1 in enumerate(net.layers):
            name = v1.name or f"layers[{i}]"
            enum_name = (
                enum.values_by_number[v1.type].name
                if v1.type in enum.values_by_number
                else str(v1.type)
            )
            where = f"{path}: layer {name!r}"
            out.append(
                CaffeLayer(
                    name=name,
                    type=V1_TYPES.get(enum_name, enum_name),
                    bottoms=list(v1.bottom),
                    tops=list(v1.top),
                    msg=v1,
                    param_names=list(v1.param),
                    blobs=[_blob(b, f"{where} blob {j}", True) for j, b in enumerate(v1.blobs)],
                    include=list(v1.include),
                    exclude=list(v1.exclude),
                )
            )
        return out, True
    for i, lp in enumerate(net.layer):
        name = lp.name or f"layer[{i}]"
        where = f"{path}: layer {name!r}"
        out.append(
            CaffeLayer(
                name=name,
                type=lp.type,
                bottoms=list(lp.bottom),
                tops=list(lp.top),
                msg=lp,
                param_names=[p.name for p in lp.param],
                blobs=[_blob(b, f"{where} blob {j}", False) for j, b in enumerate(lp.blobs)],
                include=list(lp.include),
                exclude=list(lp.exclude),
            )
        )
    return out, False


def _net_inputs(net: Any, path: str) -> list[tuple[str, tuple[int, ...] | None]]:
    names = list(net.input)
    if len(net.input_shape):
        if len(net.input_shape) != len(names):
            raise ValueError(f"{path}: {len(names)} inputs but {len(net.input_shape)} shapes")
        return [
            (n, tuple(int(d) for d in s.dim)) for n, s in zip(names, net.input_shape, strict=True)
        ]
    if len(net.input_dim):
        dims = [int(d) for d in net.input_dim]
        if len(dims) != 4 * len(names):
            raise ValueError(f"{path}: input_dim needs 4 values per input, got {len(dims)}")
        return [(n, tuple(dims[4 * i : 4 * i + 4])) for i, n in enumerate(names)]
    return [(n, None) for n in names]


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise ValueError(f"cannot read {os.fspath(path)!r}: {e.strerror or e}") from e


def read_prototxt(path: str | os.PathLike[str]) -> CaffeNet:
    """Parse a text ``NetParameter``. Unknown fields are an error naming the line."""
    p = os.fspath(path)
    raw = _read_bytes(p)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not a UTF-8 text prototxt ({e})") from None
    net = schema()["caffe.NetParameter"]()
    try:
        text_format.Parse(text, net)
    except RecursionError:
        raise ValueError(f"{p}: not a valid Caffe prototxt: nested too deeply") from None
    except text_format.ParseError as strict_error:
        # A layer of a type we do not know usually carries a parameter message we do not know
        # either: report the layer type (the useful fact) rather than the unknown field.
        lenient = schema()["caffe.NetParameter"]()
        try:
            text_format.Parse(text, lenient, allow_unknown_field=True)
        except (text_format.ParseError, RecursionError):
            lenient = None
        if lenient is not None:
            from lsoftmax.converters.caffe_convert import unsupported_layer

            layers, _ = _layers(lenient, p)
            for layer in layers:
                unsupported_layer(layer, p)
        raise ValueError(f"{p}: not a valid Caffe prototxt: {strict_error}") from None
    layers, legacy = _layers(net, p)
    return CaffeNet(p, net.name, layers, _net_inputs(net, p), legacy)


def parse_blob(path: str | os.PathLike[str]) -> CaffeBlob:
    """Read a binary ``BlobProto`` file (a ``.binaryproto`` mean image)."""
    p = os.fspath(path)
    raw = _read_bytes(p)
    if not raw:
        raise ValueError(f"{p}: empty file, not a binaryproto blob")
    msg = schema()["caffe.BlobProto"]()
    try:
        msg.ParseFromString(raw)
    except (pb_message.DecodeError, RecursionError, ValueError) as e:
        raise ValueError(f"{p}: corrupt or truncated binaryproto ({e})") from None
    return _blob(msg, p, legacy=False)


def read_caffemodel(path: str | os.PathLike[str]) -> CaffeNet:
    """Parse a binary ``NetParameter`` (a Caffe snapshot)."""
    p = os.fspath(path)
    return parse_caffemodel(_read_bytes(p), p)


def parse_caffemodel(raw: bytes, p: str) -> CaffeNet:
    """``read_caffemodel`` on bytes already read (``p`` names them in errors)."""
    if not raw:
        raise ValueError(f"{p}: empty file, not a caffemodel")
    net = schema()["caffe.NetParameter"]()
    try:
        net.ParseFromString(raw)
    except (pb_message.DecodeError, RecursionError, ValueError) as e:
        raise ValueError(f"{p}: corrupt or truncated caffemodel ({e})") from None
    layers, legacy = _layers(net, p)
    if not layers:
        raise ValueError(f"{p}: no layers; not a caffemodel (or an empty net)")
    return CaffeNet(p, net.name, layers, _net_inputs(net, p), legacy)

"""Fuzzing every reader that takes a file, with hypothesis: Caffe prototxt and caffemodel, MXNet
symbol JSON and .params, and the ONNX models given to ``lsoftmax infer``. Each mutated input
must convert (or run), or fail with the documented error (ValueError naming the file for the
converters, a CLI error for infer); never a crash, another exception type, a hang (each
example has a deadline) or a large allocation (the process's peak RSS is bounded).

Briefly in the test suite; ``scripts/fuzz.sh`` runs many more examples
(``LSOFTMAX_FUZZ_EXAMPLES``). The seeds are built here, so no fixture files are needed.
"""

from __future__ import annotations

import json
import os
import resource
import struct
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lsoftmax.converters import from_caffe, from_mxnet
from lsoftmax.converters.caffe_reader import schema
from onnx import TensorProto, helper
from test_converters_mxnet import V2, write_params

EXAMPLES = int(os.environ.get("LSOFTMAX_FUZZ_EXAMPLES", "30"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=10_000,  # ms per example: a hang or a runaway loop fails the test
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=os.environ.get("LSOFTMAX_FUZZ_RANDOM") is None,
)
RSS_GROWTH_LIMIT_MIB = 1024  # peak RSS may grow this much over a whole fuzz test


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@pytest.fixture
def rss_bound():
    before = peak_rss_mib()
    yield
    grown = peak_rss_mib() - before
    assert grown <= RSS_GROWTH_LIMIT_MIB, f"peak RSS grew by {grown:.0f} MiB while fuzzing"


# ---- mutations -----------------------------------------------------------------------------

EXTREME_INTS = [0, 1, -1, 2**31 - 1, 2**31, 2**32 + 3, 2**62, 2**63 - 1, 10**30, 2000000]
EXTREME_TEXT = [str(v) for v in EXTREME_INTS] + ["nan", "inf", "-inf", "1e308", "5", "-0.5", '"x"']


@st.composite
def byte_mutations(draw: Any, seed: bytes) -> bytes:
    """Truncations, byte flips, insertions and extreme 4/8-byte integers written over fields."""
    b = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "int"]))
        pos = draw(st.integers(0, max(0, len(b) - 1)))
        if kind == "truncate":
            del b[pos:]
        elif kind == "flip":
            if b:
                b[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            width = draw(st.sampled_from([4, 8]))
            value = draw(st.sampled_from(EXTREME_INTS)) % (1 << (8 * width))
            b[pos : pos + width] = value.to_bytes(width, "little")
        if not b:
            break
    return bytes(b)


@st.composite
def text_mutations(draw: Any, seed: str) -> str:
    """Numbers replaced by extreme values, tokens dropped or duplicated, random characters."""
    tokens = seed.split(" ")
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(tokens) - 1))
        kind = draw(st.sampled_from(["number", "drop", "dup", "chars"]))
        if kind == "number":
            numeric = [j for j, t in enumerate(tokens) if t.strip().lstrip("-").isdigit()]
            if numeric:
                j = draw(st.sampled_from(numeric))
                tokens[j] = draw(st.sampled_from(EXTREME_TEXT))
        elif kind == "drop":
            del tokens[i]
        elif kind == "dup":
            tokens.insert(i, tokens[i])
        else:
            tokens[i] = draw(st.text(max_size=6))
        if not tokens:
            tokens = [""]
    return " ".join(tokens)


def expect_value_error(fn: Any, *names: str) -> None:
    """``fn()`` succeeds, or raises a ValueError whose message names one of ``names``."""
    try:
        fn()
    except ValueError as e:
        assert any(n in str(e) for n in names), f"error does not name the file: {e}"


# ---- Caffe ---------------------------------------------------------------------------------

CAFFE_NET = (
    'name: "fz" layer { name: "in" type: "Input" top: "data" '
    "input_param { shape { dim: 2 dim: 1 dim: 6 dim: 6 } } } "
    'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
    "convolution_param { num_output: 2 kernel_size: 3 stride: 1 pad: 0 group: 1 } } "
    'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" } '
    'layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" '
    "pooling_param { pool: MAX kernel_size: 2 stride: 2 } } "
    'layer { name: "drop" type: "Dropout" bottom: "pool" top: "pool" '
    "dropout_param { dropout_ratio: 0.5 } } "
    'layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" '
    "inner_product_param { num_output: 3 } } "
    'layer { name: "lm" type: "LargeMarginInnerProduct" bottom: "ip" top: "lm" '
    "largemargin_inner_product_param { num_output: 4 type: DOUBLE base: 10 gamma: 0.1 "
    "power: 1 lambda_min: 0 iteration: 0 } }"
)
CAFFE_BLOBS = {
    "conv": [(2, 1, 3, 3), (2,)],
    "ip": [(3, 8), (3,)],
    "lm": [(4, 3)],
}


def caffemodel_bytes() -> bytes:
    msg = schema()["caffe.NetParameter"]()
    text_format.Parse(CAFFE_NET, msg)
    rng = np.random.default_rng(0)
    for layer in msg.layer:
        for shape in CAFFE_BLOBS.get(layer.name, []):
            b = layer.blobs.add()
            b.shape.dim.extend(shape)
            b.data.extend(rng.standard_normal(int(np.prod(shape))).astype(np.float32).tolist())
    return msg.SerializeToString()


def test_caffe_seeds_convert(tmp_path: Path) -> None:
    """The seeds themselves are valid: the fuzzers start from models that convert."""
    (tmp_path / "n.prototxt").write_text(CAFFE_NET)
    (tmp_path / "n.caffemodel").write_bytes(caffemodel_bytes())
    net = from_caffe(tmp_path / "n.prototxt", tmp_path / "n.caffemodel")
    assert net is not None


@SETTINGS
@given(data=st.data())
def test_fuzz_caffe_prototxt(tmp_path: Path, rss_bound: None, data: st.DataObject) -> None:
    path = tmp_path / "fuzzed.prototxt"
    path.write_text(data.draw(text_mutations(CAFFE_NET)), encoding="utf-8")
    expect_value_error(lambda: from_caffe(path), str(path))


@SETTINGS
@given(data=st.data())
def test_fuzz_caffe_prototxt_with_weights(
    tmp_path: Path, rss_bound: None, data: st.DataObject
) -> None:
    proto, weights = tmp_path / "fuzzed.prototxt", tmp_path / "w.caffemodel"
    proto.write_text(data.draw(text_mutations(CAFFE_NET)), encoding="utf-8")
    weights.write_bytes(caffemodel_bytes())
    expect_value_error(lambda: from_caffe(proto, weights), str(proto), str(weights))


@SETTINGS
@given(data=st.data())
def test_fuzz_caffemodel(tmp_path: Path, rss_bound: None, data: st.DataObject) -> None:
    proto, weights = tmp_path / "n.prototxt", tmp_path / "fuzzed.caffemodel"
    proto.write_text(CAFFE_NET)
    weights.write_bytes(data.draw(byte_mutations(caffemodel_bytes())))
    expect_value_error(lambda: from_caffe(proto, weights), str(proto), str(weights))


# ---- MXNet ---------------------------------------------------------------------------------


def mxnet_symbol() -> dict[str, Any]:
    nodes = [
        {"op": "null", "name": "data", "inputs": []},
        {"op": "null", "name": "conv_weight", "inputs": []},
        {"op": "null", "name": "conv_bias", "inputs": []},
        {
            "op": "Convolution",
            "name": "conv",
            "attrs": {"kernel": "(3, 3)", "num_filter": "2", "stride": "(1, 1)", "pad": "(0, 0)"},
            "inputs": [[0, 0, 0], [1, 0, 0], [2, 0, 0]],
        },
        {"op": "Flatten", "name": "flat", "inputs": [[3, 0, 0]]},
        {"op": "null", "name": "label", "inputs": []},
        {"op": "null", "name": "lsm_weight", "inputs": []},
        {
            "op": "LSoftmax",
            "name": "lsm",
            "attrs": {"num_hidden": "3", "margin": "2", "beta": "1", "scale": "0.99"},
            "inputs": [[4, 0, 0], [5, 0, 0], [6, 0, 0]],
        },
    ]
    return {"nodes": nodes, "arg_nodes": [0, 1, 2, 5, 6], "heads": [[7, 0, 0]]}


def mxnet_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "arg:conv_weight": rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
        "arg:conv_bias": rng.standard_normal(2).astype(np.float32),
        "arg:lsm_weight": rng.standard_normal((3, 32)).astype(np.float32),
    }


@pytest.fixture
def mxnet_files(tmp_path: Path) -> tuple[Path, Path]:
    sym, params = tmp_path / "m-symbol.json", tmp_path / "m-0000.params"
    sym.write_text(json.dumps(mxnet_symbol()))
    write_params(params, mxnet_arrays(), V2)
    return sym, params


def test_mxnet_seeds_convert(mxnet_files: tuple[Path, Path]) -> None:
    assert from_mxnet(*mxnet_files) is not None


@SETTINGS
@given(data=st.data())
def test_fuzz_mxnet_symbol(
    mxnet_files: tuple[Path, Path], rss_bound: None, data: st.DataObject
) -> None:
    sym, params = mxnet_files
    fuzzed = sym.with_name("fuzzed-symbol.json")
    doc = mxnet_symbol()
    # Attribute values are where the symbol's numbers live: mutate them as text, then the
    # JSON as a whole.
    for node in doc["nodes"]:
        for key in list(node.get("attrs", {})):
            if data.draw(st.booleans()):
                node["attrs"][key] = data.draw(
                    st.one_of(
                        text_mutations(node["attrs"][key]),
                        st.sampled_from([*EXTREME_TEXT, "(" * 100000, "(1," * 5000]),
                    )
                )
    raw = json.dumps(doc).encode()
    if data.draw(st.booleans()):
        raw = data.draw(byte_mutations(raw))
    fuzzed.write_bytes(raw)
    expect_value_error(lambda: from_mxnet(fuzzed, params), str(fuzzed), str(params))


@SETTINGS
@given(data=st.data())
def test_fuzz_mxnet_params(
    mxnet_files: tuple[Path, Path], rss_bound: None, data: st.DataObject
) -> None:
    sym, params = mxnet_files
    fuzzed = params.with_name("fuzzed-0000.params")
    fuzzed.write_bytes(data.draw(byte_mutations(params.read_bytes())))
    expect_value_error(lambda: from_mxnet(sym, fuzzed), str(sym), str(fuzzed))


# ---- ONNX models given to `lsoftmax infer` -------------------------------------------------


def onnx_seed(op: str) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    if op == "LSoftmaxLinear":
        inits = [onnx.numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "W")]
        node = helper.make_node(
            op, ["X", "W", "labels"], ["Y"], domain="ai.lsoftmax", margin=3, **{"lambda": 0.5}
        )
        outs = ["Y"]
    else:
        inits = [
            onnx.numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "means"),
            onnx.numpy_helper.from_array(np.zeros((5, 4), np.float32), "log_var"),
        ]
        node = helper.make_node(
            op, ["X", "means", "log_var", "labels"], ["Y", "ll"], domain="ai.lsoftmax", alpha=0.5
        )
        outs = ["Y", "ll"]
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"]),
        ],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
        initializer=inits,
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.lsoftmax", 1)],
        ir_version=9,
    )


ATTR_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([v for v in EXTREME_INTS if -(2**63) <= v < 2**63]),  # ONNX ints are int64
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.text(max_size=8),
    st.lists(st.integers(-5, 5), min_size=1, max_size=3),
    st.lists(st.floats(-5, 5, width=32), min_size=1, max_size=3),
)


@SETTINGS
@given(op=st.sampled_from(["LSoftmaxLinear", "LGMLogits"]), data=st.data())
def test_fuzz_infer_models(tmp_path: Path, rss_bound: None, op: str, data: st.DataObject) -> None:
    """Structure-aware: attributes of any type and value, initializers of any shape and
    element type, inputs of any batch, labels anywhere in int64; then ``lsoftmax infer``."""
    from lsoftmax.cli import main

    model = onnx_seed(op)
    node = model.graph.node[0]
    names = ["margin", "lambda"] if op == "LSoftmaxLinear" else ["alpha", "alpha_lo"]
    names.append("include_logdet")
    for name in data.draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        for i, a in enumerate(node.attribute):
            if a.name == name:
                del node.attribute[i]
                break
        if data.draw(st.booleans()):
            node.attribute.append(helper.make_attribute(name, data.draw(ATTR_VALUES)))
    for init in model.graph.initializer:
        if data.draw(st.booleans()):
            shape = data.draw(st.lists(st.integers(0, 7), min_size=0, max_size=3))
            dtype = data.draw(st.sampled_from([np.float32, np.float64, np.int64]))
            fill = data.draw(st.sampled_from([0.0, 1.0, np.nan, -np.inf]))
            if dtype is np.int64 and not np.isfinite(fill):
                fill = -1.0
            value = np.full(shape, fill).astype(dtype)
            init.CopyFrom(onnx.numpy_helper.from_array(value, init.name))
    model_path = tmp_path / "fuzzed.onnx"
    model_path.write_bytes(model.SerializeToString())
    n = data.draw(st.integers(0, 5))
    x = np.full((n, data.draw(st.sampled_from([4, 3]))), data.draw(st.sampled_from([0.5, np.nan])))
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    labels = data.draw(st.lists(st.sampled_from([0, 4, 5, -1, 2**40]), min_size=n, max_size=n))
    np.save(tmp_path / "y.npy", np.asarray(labels, np.int64))
    code = main(
        ["infer", str(model_path), str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy")]
    )
    assert code in (0, 1, 2), code


def test_fuzz_params_header_layouts() -> None:
    """Every ndim/dims layout of the first array header is read or refused, never allocated
    beyond the file (the header claims up to 2^63 elements)."""
    from lsoftmax.converters.mxnet_params import parse_params

    for ndim in (0, 1, 3, 9, 2**31 - 1):
        for dim in (0, 1, 2**31 - 1, 2**62):
            raw = struct.pack("<QQQ", 0x112, 0, 1) + struct.pack("<Iii", V2, 0, ndim)
            raw += struct.pack("<q", dim) * min(ndim, 4)
            try:
                parse_params(raw, "h.params")
            except ValueError as e:
                assert "h.params" in str(e)

"""Bad input to the converters: every failure is a ValueError naming the file (and the layer),
never a crash, a hang or another exception type. Includes time-bounded fuzzing of the binary
readers."""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAFFE_MODELS as CAFFE
from conftest import MXNET_FIXTURES as MX
from conftest import needs_caffe_fixtures, needs_mxnet_fixtures
from google.protobuf import text_format
from hypothesis import given, settings
from hypothesis import strategies as st
from lsoftmax.converters import from_caffe, from_mxnet, load_converted, load_gluon_lgm
from lsoftmax.converters.caffe_reader import parse_caffemodel, read_prototxt, schema
from lsoftmax.converters.mxnet_params import parse_params, read_params
from test_converters_mxnet import V2, write_params

SMALL_NET = """
layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 5 } }
"""


def caffemodel(
    path: Path, text: str, blobs: dict[str, list[np.ndarray]], counts: dict[str, int] | None = None
) -> Path:
    """Write a caffemodel; ``counts`` overrides a layer's number of stored values."""
    msg = schema()["caffe.NetParameter"]()
    text_format.Parse(text, msg)
    for layer in msg.layer:
        for i, arr in enumerate(blobs.get(layer.name, [])):
            b = layer.blobs.add()
            b.shape.dim.extend(arr.shape)
            values = arr.astype(np.float32).ravel().tolist()
            if counts and layer.name in counts and i == 0:
                values = values[: counts[layer.name]]
            b.data.extend(values)
    path.write_bytes(msg.SerializeToString())
    return path


def good_blobs() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return {
        "conv": [rng.normal(size=(4, 3, 3, 3)), rng.normal(size=4)],
        "ip": [rng.normal(size=(5, 144)), rng.normal(size=5)],
    }


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text)
    return p


# ---- Caffe ---------------------------------------------------------------------------------


def test_small_net_converts(tmp_path: Path) -> None:
    # The baseline the error cases below break one thing at a time.
    net = from_caffe(
        write(tmp_path, "n.prototxt", SMALL_NET),
        caffemodel(tmp_path / "n.caffemodel", SMALL_NET, good_blobs()),
    )
    assert net(torch.zeros(2, 3, 8, 8)).shape == (2, 5)


def test_unknown_layer_type_is_named(tmp_path: Path) -> None:
    text = SMALL_NET + 'layer { name: "mystery" type: "Foo" bottom: "ip" top: "foo" }'
    with pytest.raises(
        ValueError, match=r"n\.prototxt: layer 'mystery' has unsupported type 'Foo'"
    ):
        from_caffe(write(tmp_path, "n.prototxt", text))
    # A type we do not know usually comes with a parameter message we do not know either.
    text = SMALL_NET + 'layer { name: "norm1" type: "LRN" bottom: "ip" top: "n" lrn_param { } }'
    with pytest.raises(ValueError, match=r"layer 'norm1' has unsupported type 'LRN'"):
        from_caffe(write(tmp_path, "n.prototxt", text))


def test_bad_prototxt_text(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"bad\.prototxt: not a valid Caffe prototxt: 7:15"):
        from_caffe(write(tmp_path, "bad.prototxt", SMALL_NET + "layer { name: }"))
    typo = SMALL_NET.replace("kernel_size", "kernel_sise")
    with pytest.raises(ValueError, match="kernel_sise"):
        from_caffe(write(tmp_path, "typo.prototxt", typo))
    deep = "layer { " + "transform_param { " * 5000 + "} " * 5001
    with pytest.raises(ValueError, match=r"deep\.prototxt: not a valid Caffe prototxt"):
        read_prototxt(write(tmp_path, "deep.prototxt", deep))
    (tmp_path / "bin.prototxt").write_bytes(b"\xff\xfe\x00layer")
    with pytest.raises(ValueError, match=r"bin\.prototxt: not a UTF-8"):
        read_prototxt(tmp_path / "bin.prototxt")
    with pytest.raises(ValueError, match=r"cannot read .*missing\.prototxt"):
        from_caffe(tmp_path / "missing.prototxt")
    with pytest.raises(ValueError, match="phase must be"):
        from_caffe(write(tmp_path, "n.prototxt", SMALL_NET), phase="deploy")


def test_corrupt_and_truncated_caffemodel(tmp_path: Path) -> None:
    proto = write(tmp_path, "n.prototxt", SMALL_NET)
    good = caffemodel(tmp_path / "good.caffemodel", SMALL_NET, good_blobs()).read_bytes()
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match=r"bad\.caffemodel: empty file"):
        from_caffe(proto, bad)
    # Cut inside the packed float data of the inner-product weight.
    bad.write_bytes(good[: len(good) - 1000])
    with pytest.raises(ValueError, match=r"bad\.caffemodel: corrupt or truncated"):
        from_caffe(proto, bad)
    bad.write_bytes(b"\x08" * 10 + b"\xff" * 10)
    with pytest.raises(ValueError, match=r"bad\.caffemodel"):
        from_caffe(proto, bad)


def test_weights_that_do_not_fit_the_prototxt(tmp_path: Path) -> None:
    proto = write(tmp_path, "n.prototxt", SMALL_NET)
    blobs = good_blobs()
    blobs["conv"][0] = np.zeros((6, 3, 3, 3))
    model = caffemodel(tmp_path / "w.caffemodel", SMALL_NET, blobs)
    with pytest.raises(
        ValueError,
        match=r"w\.caffemodel: layer 'conv' \(Convolution\) blob 0 has shape \[6, 3, 3, 3\]"
        r".*n\.prototxt implies \[4, 3, 3, 3\]",
    ):
        from_caffe(proto, model)
    # A shape that agrees with the conv but not with the input the prototxt declares.
    blobs = good_blobs()
    blobs["ip"][0] = np.zeros((5, 100))
    model = caffemodel(tmp_path / "w.caffemodel", SMALL_NET, blobs)
    with pytest.raises(
        ValueError, match=r"layer 'ip' \(InnerProduct\) blob 0 has shape \[5, 100\]"
    ):
        from_caffe(proto, model)
    model = caffemodel(tmp_path / "w.caffemodel", SMALL_NET, good_blobs(), counts={"conv": 7})
    with pytest.raises(ValueError, match=r"layer 'conv' blob 0: blob holds 7 values but its shape"):
        from_caffe(proto, model)


def test_missing_and_extra_blobs(tmp_path: Path) -> None:
    proto = write(tmp_path, "n.prototxt", SMALL_NET)
    blobs = good_blobs()
    del blobs["ip"]
    with pytest.raises(
        ValueError, match=r"m\.caffemodel: no weights for layer 'ip' \(InnerProduct\)"
    ):
        from_caffe(proto, caffemodel(tmp_path / "m.caffemodel", SMALL_NET, blobs))
    no_bias = SMALL_NET.replace("num_output: 4", "num_output: 4 bias_term: false")
    with pytest.raises(ValueError, match=r"layer 'conv' \(Convolution\) has 2 blobs, expected 1"):
        from_caffe(
            write(tmp_path, "nb.prototxt", no_bias),
            caffemodel(tmp_path / "m.caffemodel", SMALL_NET, good_blobs()),
        )
    other = SMALL_NET.replace('name: "ip" type: "InnerProduct"', 'name: "ip" type: "Softmax"')
    with pytest.raises(
        ValueError,
        match=r"m\.caffemodel: layer 'ip' has 2 blobs, but a Softmax in .*o\.prototxt takes none",
    ):
        from_caffe(
            write(tmp_path, "o.prototxt", other),
            caffemodel(tmp_path / "m.caffemodel", SMALL_NET, good_blobs()),
        )


def test_graph_errors_name_the_layer(tmp_path: Path) -> None:
    text = SMALL_NET.replace('bottom: "conv" top: "ip"', 'bottom: "nothing" top: "ip"')
    with pytest.raises(ValueError, match=r"layer 'ip' \(InnerProduct\): reads blob 'nothing'"):
        from_caffe(write(tmp_path, "g.prototxt", text))
    text = SMALL_NET.replace("dim: 8 dim: 8", "dim: 2 dim: 2")
    with pytest.raises(ValueError, match=r"layer 'conv' \(Convolution\): does not fit its input"):
        from_caffe(write(tmp_path, "g.prototxt", text))
    pool = SMALL_NET + (
        'layer { name: "p" type: "Pooling" bottom: "conv" top: "p" '
        "pooling_param { pool: STOCHASTIC kernel_size: 2 } }"
    )
    with pytest.raises(ValueError, match=r"layer 'p' \(Pooling\): STOCHASTIC"):
        from_caffe(write(tmp_path, "g.prototxt", pool))
    zero = SMALL_NET.replace("kernel_size: 3", "kernel_size: 0")
    with pytest.raises(ValueError, match=r"layer 'conv' \(Convolution\): kernel must be positive"):
        from_caffe(write(tmp_path, "g.prototxt", zero))
    blobs = good_blobs()
    blobs["conv"][1] = np.zeros((0,))
    with pytest.raises(ValueError, match=r"layer 'conv' \(Convolution\) blob 1 is empty"):
        from_caffe(
            write(tmp_path, "g.prototxt", SMALL_NET),
            caffemodel(tmp_path / "e.caffemodel", SMALL_NET, blobs),
        )
    with pytest.raises(ValueError, match="no input"):
        from_caffe(write(tmp_path, "g.prototxt", 'layer { name: "r" type: "ReLU" }'))


# ---- MXNet ---------------------------------------------------------------------------------


def test_params_file_errors(tmp_path: Path) -> None:
    p = tmp_path / "x.params"
    arrays = {"arg:w": np.ones((2, 3), np.float32)}
    cases: list[tuple[Callable[[bytes], bytes], str]] = [
        (lambda b: b[:10], "too short"),
        (lambda b: struct.pack("<Q", 0x113) + b[8:], "not an MXNet .params file"),
        (lambda b: b[:-3], "truncated"),
        (lambda b: b + b"\x00", "trailing bytes"),
        (lambda b: b[:24] + struct.pack("<I", 0xDEADBEEF) + b[28:], "bad magic or ndim"),
        (lambda b: b[:28] + struct.pack("<i", 2) + b[32:], "sparse storage"),
        (lambda b: b[:32] + struct.pack("<i", 1000) + b[36:], "ndim 1000"),
        (lambda b: b[:36] + struct.pack("<q", 1 << 40) + b[44:], "truncated"),
        (lambda b: b[:36] + struct.pack("<q", -2) + b[44:], "negative dimension"),
        (lambda b: b[:60] + struct.pack("<i", 99) + b[64:], "unknown dtype flag 99"),
        (lambda b: b[:16] + struct.pack("<Q", 1 << 60) + b[24:], "array count"),
    ]
    for mutate, message in cases:
        write_params(p, arrays, V2)
        p.write_bytes(mutate(p.read_bytes()))
        with pytest.raises(ValueError, match=rf"x\.params: .*{message}"):
            read_params(p)
    with pytest.raises(ValueError, match=r"cannot read .*nope\.params"):
        read_params(tmp_path / "nope.params")


@needs_mxnet_fixtures
def test_symbol_errors(tmp_path: Path) -> None:
    sym, params = MX / "lsoftmax_lenet-symbol.json", MX / "lsoftmax_lenet-0000.params"
    text = sym.read_text()
    bad = tmp_path / "s.json"
    bad.write_text(text.replace('"op": "Activation"', '"op": "Frobnicate"', 1))
    with pytest.raises(
        ValueError, match=r"s\.json: node 'activation0' has unsupported op 'Frobnicate'"
    ):
        from_mxnet(bad, params)
    bad.write_text(text.replace('"op_type": "LSoftmax"', '"op_type": "Other"'))
    with pytest.raises(ValueError, match=r"node 'custom0' has unsupported op 'Custom:Other'"):
        from_mxnet(bad, params)
    bad.write_text(text[:100])
    with pytest.raises(ValueError, match=r"s\.json: not a symbol JSON"):
        from_mxnet(bad, params)
    bad.write_text('{"nodes": 3}')
    with pytest.raises(ValueError, match="no 'nodes' list"):
        from_mxnet(bad, params)
    bad.write_text(text.replace('"num_filter": "8"', '"num_filter": "eight"'))
    with pytest.raises(
        ValueError, match=r"node 'convolution0' \(Convolution\): bad attribute num_filter"
    ):
        from_mxnet(bad, params)
    bad.write_text(text.replace('"num_filter": "8"', '"num_filter": "6"'))
    with pytest.raises(
        ValueError,
        match=r"0000\.params: 'convolution0_weight' .* has shape \[8, 1, 5, 5\], "
        r"expected \[6, '\?', 5, 5\]",
    ):
        from_mxnet(bad, params)
    arrays = read_params(params)
    del arrays["arg:fullyconnected0_bias"]
    write_params(tmp_path / "p.params", arrays)
    with pytest.raises(ValueError, match=r"p\.params: no array 'fullyconnected0_bias'"):
        from_mxnet(sym, tmp_path / "p.params")


@needs_mxnet_fixtures
def test_gluon_and_saved_model_errors(tmp_path: Path) -> None:
    from torch import nn

    with pytest.raises(ValueError, match=r"lgm_lenetplus\.params: expected exactly one L-GM"):
        load_gluon_lgm(MX / "lgm_lenetplus.params")
    with pytest.raises(
        ValueError, match=r"maps to 'features\.0\.0\.weight', which feature_net lacks"
    ):
        load_gluon_lgm(
            MX / "lgm_lenetplus.params", nn.Linear(2, 2), head_params=MX / "lgm_head.params"
        )
    head = read_params(MX / "lgm_head.params")
    head["var"][0, 0] = -1.0
    write_params(tmp_path / "h.params", head)
    with pytest.raises(ValueError, match=r"h\.params: L-GM var must be positive"):
        load_gluon_lgm(tmp_path / "h.params")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"junk\.pt"):
        load_converted(tmp_path / "junk.pt")


# ---- fuzzing -------------------------------------------------------------------------------


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:
        return bytes(b[: rng.randrange(len(b))])
    if kind == 1:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 2:
        pos = rng.randrange(len(b))
        b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        # Overwrite a 4- or 8-byte field with an extreme integer (sizes, counts, magics).
        width = rng.choice((4, 8))
        pos = rng.randrange(max(1, len(b) - width))
        value = rng.choice((0, 1, 0x7F, 0xFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 62, (1 << 64) - 1))
        b[pos : pos + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    return bytes(b)


def fuzz(seeds: list[bytes], parse: Callable[[bytes], object], seconds: float, limit: int) -> int:
    # The deadline only guards against a hang; each test asserts that all `limit` cases ran.
    rng = random.Random(1234)
    deadline = time.monotonic() + seconds
    n = 0
    while n < limit and time.monotonic() < deadline:
        try:
            parse(mutate(rng.choice(seeds), rng))
        except ValueError as e:
            assert "fuzzed" in str(e), str(e)
        n += 1
    return n


def write_then(path: Path, convert: Callable[[Path], object]) -> Callable[[bytes], object]:
    def run(data: bytes) -> object:
        path.write_bytes(data)
        return convert(path)

    return run


@needs_caffe_fixtures
def test_fuzz_caffemodel_reader(tmp_path: Path) -> None:
    seeds = [(CAFFE / "lgm_tiny_iso.caffemodel").read_bytes()]
    seeds.append(caffemodel(tmp_path / "s.caffemodel", SMALL_NET, good_blobs()).read_bytes())
    n = fuzz(seeds, lambda b: parse_caffemodel(b, "fuzzed.caffemodel"), 120.0, 600)
    print(f"{n} mutated caffemodels parsed")
    assert n == 600
    # Whole conversions too (through a file): mutated weights reach the layer checks.
    proto = CAFFE / "lgm_tiny_iso.prototxt"
    convert = write_then(tmp_path / "fuzzed.caffemodel", lambda p: from_caffe(proto, p))
    # Bounded by count, not by time: a loaded machine must not turn this into a timing test.
    n = fuzz(seeds[:1], convert, 60.0, 40)
    print(f"{n} mutated caffemodels converted")
    assert n == 40


@needs_mxnet_fixtures
def test_fuzz_params_reader(tmp_path: Path) -> None:
    arrays = {
        k: v for k, v in read_params(MX / "lsoftmax_lenet-0000.params").items() if v.size < 100
    }
    write_params(tmp_path / "small.params", arrays, V2)
    seeds = [(MX / "lgm_head.params").read_bytes(), (tmp_path / "small.params").read_bytes()]
    n = fuzz(seeds, lambda b: parse_params(b, "fuzzed.params"), 120.0, 600)
    print(f"{n} mutated params files parsed")
    assert n == 600
    sym = MX / "lsoftmax_lenet-symbol.json"
    lenet = [(MX / "lsoftmax_lenet-0000.params").read_bytes()]
    convert = write_then(tmp_path / "fuzzed.params", lambda p: from_mxnet(sym, p))
    n = fuzz(lenet, convert, 60.0, 30)
    print(f"{n} mutated params files converted")
    assert n == 30


@settings(max_examples=300, deadline=None)
@given(tail=st.binary(max_size=96))
def test_params_reader_any_bytes_after_header(tail: bytes) -> None:
    try:
        parse_params(struct.pack("<QQQ", 0x112, 0, 1) + tail, "h.params")
    except ValueError as e:
        assert "h.params" in str(e)

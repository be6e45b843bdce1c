"""The converters' resource policy (converters/limits.py): sizes a model file declares are
checked before anything of that size is allocated, and every refusal is a ValueError naming
the file and the layer (docs/reliability.md)."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest
from lsoftmax.converters import from_caffe, from_mxnet
from lsoftmax.converters.limits import MAX_MODEL_ELEMENTS, MAX_TENSOR_ELEMENTS
from test_converters_errors import SMALL_NET, caffemodel, good_blobs, write
from test_converters_mxnet import V2, write_params
from test_fuzz import mxnet_arrays, mxnet_symbol


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ip_net(num_output: int, input_dims: tuple[int, ...] = (1, 3, 8, 8)) -> str:
    dims = " ".join(f"dim: {d}" for d in input_dims)
    return (
        f'layer {{ name: "in" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }} '
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
        f"inner_product_param {{ num_output: {num_output} }} }}"
    )


def test_shape_mismatch_is_reported_before_allocating(tmp_path: Path) -> None:
    """num_output 2,000,000 against a (5, 144) blob reached 2.3 GB RSS before the mismatch."""
    text = SMALL_NET.replace("num_output: 5", "num_output: 2000000")
    proto = write(tmp_path, "n.prototxt", text)
    weights = caffemodel(tmp_path / "n.caffemodel", SMALL_NET, good_blobs())
    before = peak_rss_mib()
    with pytest.raises(ValueError, match=r"layer 'ip' .*blob 0 has shape \[5, 144\]") as info:
        from_caffe(proto, weights)
    assert str(weights) in str(info.value)
    assert peak_rss_mib() - before < 200


@pytest.mark.parametrize("num_output", [20_000_000, 4_000_000_000])
def test_huge_layer_without_weights_is_refused(tmp_path: Path, num_output: int) -> None:
    """20M outputs attempted 20 GB (then a RuntimeError); a 200-byte prototxt, 80 TB."""
    proto = write(tmp_path, "n.prototxt", ip_net(num_output))
    before = peak_rss_mib()
    with pytest.raises(ValueError, match=r"layer 'ip' \(InnerProduct\): parameter of shape") as e:
        from_caffe(proto)
    assert str(proto) in str(e.value) and str(MAX_TENSOR_ELEMENTS) in str(e.value)
    assert peak_rss_mib() - before < 200


def test_model_total_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each layer under the per-tensor limit, together over the model limit (lowered here so
    the test allocates little: the rule is the same)."""
    from lsoftmax.converters import caffe_convert

    monkeypatch.setattr(caffe_convert, "MAX_MODEL_ELEMENTS", 4000)
    layers = [
        'layer { name: "in" type: "Input" top: "d" input_param { shape { dim: 1 dim: 30 } } }'
    ]
    for i in range(5):
        layers.append(
            f'layer {{ name: "ip{i}" type: "InnerProduct" bottom: "d" top: "o{i}" '
            "inner_product_param { num_output: 30 } }"
        )
    proto = write(tmp_path, "n.prototxt", " ".join(layers))
    with pytest.raises(ValueError, match=r"layer 'ip4'.*the model's parameters reach 4650"):
        from_caffe(proto)
    assert MAX_MODEL_ELEMENTS == 2**28  # the documented value


def test_huge_input_dim_is_refused_naming_the_input(tmp_path: Path) -> None:
    """A huge input_dim attempted 43 GB and then gave a misleading error."""
    proto = write(tmp_path, "n.prototxt", ip_net(4, (1, 3, 100000, 100000)))
    with pytest.raises(ValueError, match=r"input 'data'.*one sample.*more than the") as e:
        from_caffe(proto)
    assert str(proto) in str(e.value)
    with pytest.raises(ValueError, match=r"input_shape must be positive"):
        from_caffe(proto, input_shape=(1, 0, 4, 4))


def test_blob_dims_overflowing_int64_name_the_file(tmp_path: Path) -> None:
    weights = caffemodel(tmp_path / "n.caffemodel", SMALL_NET, good_blobs())
    from lsoftmax.converters.caffe_reader import schema

    msg = schema()["caffe.NetParameter"]()
    msg.ParseFromString(weights.read_bytes())
    blob = msg.layer[1].blobs[0]
    del blob.shape.dim[:]
    blob.shape.dim.extend([2**62, 2**62, 4])
    weights.write_bytes(msg.SerializeToString())
    with pytest.raises(ValueError, match=r"layer 'conv' blob 0: blob of shape") as e:
        from_caffe(write(tmp_path, "n.prototxt", SMALL_NET), weights)
    assert str(weights) in str(e.value)


@pytest.mark.parametrize("ratio", ["5", "-0.5", "1", "nan"])
def test_dropout_ratio_names_the_layer(tmp_path: Path, ratio: str) -> None:
    text = SMALL_NET + (
        'layer { name: "drop" type: "Dropout" bottom: "ip" top: "ip" '
        f"dropout_param {{ dropout_ratio: {ratio} }} }}"
    )
    with pytest.raises(ValueError, match=r"layer 'drop' \(Dropout\): dropout_ratio must be"):
        from_caffe(write(tmp_path, "n.prototxt", text))


def _mxnet(tmp_path: Path, **attrs: dict[str, str]) -> tuple[Path, Path]:
    doc = mxnet_symbol()
    for node in doc["nodes"]:
        node.setdefault("attrs", {}).update(attrs.get(node["name"], {}))
    sym, params = tmp_path / "m-symbol.json", tmp_path / "m-0000.params"
    sym.write_text(json.dumps(doc))
    write_params(params, mxnet_arrays(), V2)
    return sym, params


@pytest.mark.parametrize("value", ["(" * 100_000, "(1," * 40_000 + ")"])
def test_mxnet_overlong_attribute(tmp_path: Path, value: str) -> None:
    """A kernel attribute of 100k characters raised MemoryError."""
    sym, params = _mxnet(tmp_path, conv={"kernel": value})
    with pytest.raises(ValueError, match=r"node 'conv' \(Convolution\): attribute kernel is"):
        from_mxnet(sym, params)


def test_mxnet_margin_beyond_limit_is_refused(tmp_path: Path) -> None:
    sym, params = _mxnet(tmp_path, lsm={"margin": "2000000"})
    with pytest.raises(ValueError, match=r"node 'lsm'.*margin must be an integer in \[1, 2\^20\]"):
        from_mxnet(sym, params)
    sym, params = _mxnet(tmp_path, lsm={"margin": str(2**20)})
    net = from_mxnet(sym, params)
    assert net.layers["lsm"].margin == 2**20

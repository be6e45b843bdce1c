"""Caffe -> torch conversion: fixture checksums, numpy parity, every layer variant, ONNX, CLI."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import CAFFE_MODELS as CAFFE
from conftest import CONVERTER_TOL as TOL
from conftest import FIXTURES, needs_caffe_fixtures
from google.protobuf import text_format
from lsoftmax.converters import from_caffe, load_converted
from lsoftmax.converters.caffe_reader import read_caffemodel, schema
from lsoftmax.converters.graph import ConvertedNet
from lsoftmax.converters.modules import BatchNorm, InvStdBatchNorm
from lsoftmax.converters.proto_schema import load_proto
from reference import lsoftmax_reference
from test_converters_reference import caffe_forward, max_rel

from lsoftmax.schedules import Exponential, StepUp
from lsoftmax.torch import LSoftmaxLinear

MODELS = ["lsoftmax_mnist_tiny", "lenet_v1_legacy", "lgm_tiny_iso"]


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def module_of(net: ConvertedNet, source_name: str) -> torch.nn.Module:
    (node,) = [n for n in net.nodes if n.source_name == source_name]
    return net.layers[node.key]


V1_NAMES = {"CONVOLUTION": "Convolution", "INNER_PRODUCT": "InnerProduct"}


def caffe_layout(net: ConvertedNet, name: str, ltype: str) -> list[np.ndarray] | None:
    """The converted module's tensors in the source blob layout, where the map is exact."""
    ltype = V1_NAMES.get(ltype, ltype)
    m = module_of(net, name)
    t = lambda v: v.detach().numpy()  # noqa: E731
    if ltype in ("Convolution", "InnerProduct", "Scale"):
        return [t(m.weight)] + ([t(m.bias)] if m.bias is not None else [])
    if ltype == "BN":
        return [t(m.weight), t(m.bias), t(m.running_mean), t(m.running_inv_std)]
    if ltype == "LargeMarginInnerProduct":
        return [t(m.weight)]
    return None  # BatchNorm (sums / factor) and ClassDistance (log of floored sigma)


def fixture_input(name: str, batch: int = 3) -> np.ndarray:
    info = json.loads((CAFFE / f"{name}.json").read_text())
    shape = (batch, *info["input_shapes"]["data"][1:])
    return np.random.default_rng(7).normal(size=shape).astype(np.float32)


def reference(name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """The numpy forward over the caffemodel itself (the TRAIN snapshot, Split layers and all);
    labels only feed Split and loss layers, so zeros do."""
    msg = schema()["caffe.NetParameter"]()
    msg.ParseFromString((CAFFE / f"{name}.caffemodel").read_bytes())
    return caffe_forward(msg, {"data": x, "label": np.zeros(len(x))}, phase="train")


@pytest.fixture(scope="module")
def converted() -> dict[str, ConvertedNet]:
    return {n: from_caffe(CAFFE / f"{n}.prototxt", CAFFE / f"{n}.caffemodel") for n in MODELS}


@needs_caffe_fixtures
@pytest.mark.parametrize("name", MODELS)
def test_fixture_weights_match_json_checksums(
    name: str, converted: dict[str, ConvertedNet]
) -> None:
    info = json.loads((CAFFE / f"{name}.json").read_text())
    raw = {layer.name: layer for layer in read_caffemodel(CAFFE / f"{name}.caffemodel").layers}
    net = converted[name]
    checked = 0
    for layer in info["layers"]:
        if not layer["blobs"]:
            continue
        # What the reader read is exactly the stored tensor...
        for blob, ref in zip(raw[layer["name"]].blobs, layer["blobs"], strict=True):
            raw_shape = ref.get("legacy_dims_num_channels_height_width", ref["shape"])
            assert list(blob.data.shape) == raw_shape
            assert sha(blob.data) == ref["sha256_f32le"], (layer["name"], ref["semantic"])
        # ...and so is what the torch module holds, where the layout maps one to one.
        tensors = caffe_layout(net, layer["name"], layer["type"])
        if tensors is None:
            continue
        assert len(tensors) == len(layer["blobs"])
        for tensor, ref in zip(tensors, layer["blobs"], strict=True):
            # The fork's BN blobs are stored (1, C); the module keeps (C,).
            arr = tensor.reshape(ref["shape"]) if layer["type"] == "BN" else tensor
            assert list(arr.shape) == ref["shape"], (layer["name"], ref["semantic"])
            assert sha(arr) == ref["sha256_f32le"], (layer["name"], ref["semantic"])
            assert float(arr.astype(np.float64).sum()) == pytest.approx(ref["sum"], abs=1e-4)
            checked += 1
    assert checked > 0


@needs_caffe_fixtures
def test_fixture_batchnorm_and_sigma_conversions(converted: dict[str, ConvertedNet]) -> None:
    info = json.loads((CAFFE / "lgm_tiny_iso.json").read_text())
    net = converted["lgm_tiny_iso"]
    by_name = {layer["name"]: layer for layer in info["layers"]}
    raw = {layer.name: layer for layer in read_caffemodel(CAFFE / "lgm_tiny_iso.caffemodel").layers}
    for name in ("conv0_bn", "conv1_bn"):
        bn = module_of(net, name)
        assert isinstance(bn, BatchNorm)
        b = [x.data.astype(np.float64) for x in raw[name].blobs]
        assert np.allclose(bn.running_mean.numpy(), b[0] / b[2][0], rtol=1e-6)
        assert np.allclose(bn.running_var.numpy(), b[1] / b[2][0], rtol=1e-6)
        assert [x["shape"] for x in by_name[name]["blobs"]] == [list(x.shape) for x in b]
    head = module_of(net, "classifier")
    sigma = raw["classifier"].blobs[1].data.astype(np.float64)
    var = np.exp(head.log_var.detach().numpy().astype(np.float64)).ravel()
    assert np.allclose(var, np.maximum(sigma, 0) + 1e-4, rtol=1e-6)
    assert sha(head.means.detach().numpy()) == by_name["classifier"]["blobs"][0]["sha256_f32le"]
    assert head.include_logdet is False
    assert isinstance(head.alpha_schedule, StepUp)
    assert head.alpha_schedule.value(0) == pytest.approx(0.1)
    assert head.alpha_schedule.value(5000) == pytest.approx(0.2)
    assert head.alpha_schedule.value(10**6) == pytest.approx(0.3)
    assert head.lambda_lkd == pytest.approx(0.1)


@needs_caffe_fixtures
def test_saved_model_reloads(tmp_path: Path, converted: dict[str, ConvertedNet]) -> None:
    from lsoftmax.converters import save_converted

    net = converted["lgm_tiny_iso"]
    save_converted(net, tmp_path / "lgm.pt")
    again = load_converted(tmp_path / "lgm.pt")
    x = torch.from_numpy(fixture_input("lgm_tiny_iso", 2))
    assert torch.equal(again(x), net(x))
    assert (
        module_of(again, "classifier").alpha_schedule == module_of(net, "classifier").alpha_schedule
    )


@needs_caffe_fixtures
@pytest.mark.parametrize("name", MODELS)
def test_fixture_outputs_match_numpy_forward(name: str, converted: dict[str, ConvertedNet]) -> None:
    x = fixture_input(name)
    net = converted[name]
    out = net(torch.from_numpy(x)).detach().numpy()
    ref = reference(name, x)
    (top,) = net.output_names
    assert max_rel(out, ref[top]) <= TOL


@needs_caffe_fixtures
def test_lsoftmax_fixture_head_takes_train_copy(converted: dict[str, ConvertedNet]) -> None:
    net = converted["lsoftmax_mnist_tiny"]
    head = module_of(net, "ip2")
    assert isinstance(head, LSoftmaxLinear)
    assert head.margin == 4  # the TRAIN copy's QUADRUPLE, though phase=test picked SINGLE
    # Caffe's schedule fields are float32: the values Caffe itself computes with.
    assert head.schedule == Exponential(1000.0, float(np.float32(2.5e-5)), 35.0, 0.0, 0)
    x = fixture_input("lsoftmax_mnist_tiny", 6)
    labels = np.array([0, 3, 9, 1, 4, 4])
    ref = reference("lsoftmax_mnist_tiny", x)
    # Training mode with labels: margin logits at lambda(step 0); BN kept at its statistics.
    net.train()
    for m in net.modules():
        if isinstance(m, InvStdBatchNorm):
            m.eval()
    try:
        out = net(torch.from_numpy(x), torch.from_numpy(labels)).detach().numpy()
    finally:
        net.eval()
    feat = torch.from_numpy(ref["bn_ip"])
    w = torch.from_numpy(head.weight.detach().numpy()).double()
    lam = Exponential(1000.0, float(np.float32(2.5e-5)), 35.0).value(0)
    expected = lsoftmax_reference(feat, w, torch.from_numpy(labels), 4, lam).numpy()
    assert max_rel(out, expected) <= TOL
    assert int(head.step) == 1
    head.step.zero_()


# ---- synthetic nets written through the project's caffe.proto -----------------------------


def write_net(
    tmp: Path, text: str, blobs: dict[str, list[np.ndarray]], snapshot: str | None = None
) -> tuple[Path, Path, Any]:
    """Write NAME.prototxt + NAME.caffemodel; returns them and the full message with blobs.

    ``blobs`` are keyed by layer name; ``snapshot="train"`` keeps only layers a TRAIN net has
    (what Caffe's snapshot holds), so TEST-only layers must find weights by shared param name.
    """
    NetParameter = schema()["caffe.NetParameter"]
    full = NetParameter()
    text_format.Parse(text, full)
    layers = full.layer if len(full.layer) else full.layers
    for layer in layers:
        for arr in blobs.get(layer.name, []):
            b = layer.blobs.add()
            if len(full.layers):  # V1: legacy num/channels/height/width, left-padded with 1s
                b.num, b.channels, b.height, b.width = (1,) * (4 - arr.ndim) + arr.shape
            else:
                b.shape.dim.extend(arr.shape)
            b.data.extend(arr.astype(np.float32).ravel().tolist())
    model = NetParameter()
    model.CopyFrom(full)
    if snapshot == "train":
        del model.layer[:]
        for layer in full.layer:
            if not any(r.HasField("phase") and r.phase == 1 for r in layer.include):
                model.layer.add().CopyFrom(layer)
    proto_path, model_path = tmp / "net.prototxt", tmp / "net.caffemodel"
    proto_path.write_text(text)
    model_path.write_bytes(model.SerializeToString())
    return proto_path, model_path, full


def f32(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    return (rng.normal(size=shape) * scale).astype(np.float32)


def check_parity(
    tmp: Path, text: str, blobs: dict[str, list[np.ndarray]], shape: tuple[int, ...], **kw: Any
) -> ConvertedNet:
    proto, model, full = write_net(tmp, text, blobs, kw.pop("snapshot", None))
    net = from_caffe(proto, model, input_shape=shape, **kw)
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    out = net(torch.from_numpy(x))
    outs = out if isinstance(out, tuple) else (out,)
    ref = caffe_forward(full, {net.data_name: x})
    assert len(outs) == len(net.output_names)
    for o, name in zip(outs, net.output_names, strict=True):
        assert max_rel(o.detach().numpy(), ref[name.split("@")[0]]) <= TOL, name
    return net


def test_convolution_variants(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    text = """
    input: "data" input_dim: 2 input_dim: 4 input_dim: 9 input_dim: 8
    layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
      convolution_param { num_output: 6 group: 2 kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 0
                          stride_h: 2 stride_w: 1 dilation: 2 } }
    layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2"
      convolution_param { num_output: 3 kernel_size: 1 bias_term: false } }
    layer { name: "c3" type: "Convolution" bottom: "c2" top: "c3"
      convolution_param { num_output: 2 kernel_size: 3 kernel_size: 2 pad: 1 pad: 2 stride: 2 } }
    """
    blobs = {
        "c1": [f32(rng, 6, 2, 3, 2), f32(rng, 6)],
        "c2": [f32(rng, 3, 6, 1, 1)],
        "c3": [f32(rng, 2, 3, 3, 2), f32(rng, 2)],
    }
    net = check_parity(tmp_path, text, blobs, (2, 4, 9, 8))
    c1 = module_of(net, "c1")
    assert (c1.groups, c1.dilation, c1.stride, c1.padding) == (2, (2, 2), (2, 1), (1, 0))
    assert module_of(net, "c2").bias is None


@pytest.mark.parametrize(
    ("pool", "hw"),
    [
        ("pool: MAX kernel_size: 3 stride: 2", (7, 8)),
        ("pool: MAX kernel_size: 3 stride: 2 pad: 1", (7, 6)),
        ("pool: AVE kernel_size: 3 stride: 2 pad: 1", (7, 6)),
        ("pool: AVE kernel_size: 2 stride: 2", (5, 7)),
        ("pool: MAX kernel_size: 2 stride: 3 pad: 1", (4, 4)),  # last window dropped
        ("pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 1", (6, 5)),
        ("pool: MAX global_pooling: true", (5, 3)),
        ("pool: AVE global_pooling: true", (5, 3)),
    ],
)
def test_pooling_variants(tmp_path: Path, pool: str, hw: tuple[int, int]) -> None:
    text = f"""
    layer {{ name: "in" type: "Input" top: "data"
      input_param {{ shape {{ dim: 2 dim: 3 dim: {hw[0]} dim: {hw[1]} }} }} }}
    layer {{ name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param {{ {pool} }} }}
    """
    check_parity(tmp_path, text, {}, (2, 3, *hw))


def test_inner_product_activation_and_norm_variants(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    text = """
    layer { name: "in" type: "Input" top: "data"
      input_param { shape { dim: 3 dim: 4 dim: 3 dim: 3 } } }
    layer { name: "bn" type: "BatchNorm" bottom: "data" top: "data"
      batch_norm_param { eps: 0.001 } }
    layer { name: "sc" type: "Scale" bottom: "data" top: "data" scale_param { bias_term: true } }
    layer { name: "pr" type: "PReLU" bottom: "data" top: "pr" }
    layer { name: "bn0" type: "BatchNorm" bottom: "pr" top: "bn0" }
    layer { name: "sc2" type: "Scale" bottom: "bn0" top: "sc2" }
    layer { name: "fbn" type: "BN" bottom: "sc2" top: "fbn" }
    layer { name: "ip" type: "InnerProduct" bottom: "fbn" top: "ip"
      inner_product_param { num_output: 5 transpose: true } }
    layer { name: "lrelu" type: "ReLU" bottom: "ip" top: "ip" relu_param { negative_slope: 0.1 } }
    layer { name: "pr2" type: "PReLU" bottom: "ip" top: "pr2" prelu_param { channel_shared: true } }
    layer { name: "drop" type: "Dropout" bottom: "pr2" top: "pr2"
      dropout_param { dropout_ratio: 0.3 } }
    layer { name: "ip2" type: "InnerProduct" bottom: "pr2" top: "ip2"
      inner_product_param { num_output: 4 bias_term: false } }
    layer { name: "sig" type: "Sigmoid" bottom: "ip2" top: "sig" }
    layer { name: "tanh" type: "TanH" bottom: "sig" top: "tanh" }
    layer { name: "prob" type: "Softmax" bottom: "tanh" top: "prob" }
    """
    blobs = {
        "bn": [f32(rng, 4), np.abs(f32(rng, 4)) * 4 + 0.5, np.array([2.0], np.float32)],
        "sc": [f32(rng, 4), f32(rng, 4)],
        "pr": [f32(rng, 4)],
        # scale_factor 0: Caffe treats the statistics as all zero (x / sqrt(eps)).
        "bn0": [f32(rng, 4), f32(rng, 4), np.array([0.0], np.float32)],
        "sc2": [f32(rng, 4, scale=0.01)],
        "fbn": [f32(rng, 1, 4, 1, 1), f32(rng, 1, 4, 1, 1), f32(rng, 1, 4, 1, 1),
                np.abs(f32(rng, 1, 4, 1, 1)) + 0.5],
        "ip": [f32(rng, 36, 5), f32(rng, 5)],
        "pr2": [np.array([0.2], np.float32)],
        "ip2": [f32(rng, 4, 5)],
    }  # fmt: skip
    net = check_parity(tmp_path, text, blobs, (3, 4, 3, 3))
    assert net.output_names == ["prob"]


def test_flatten_and_inner_product_axis(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    text = """
    input: "data" input_shape { dim: 2 dim: 3 dim: 2 dim: 2 }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
      inner_product_param { num_output: 3 axis: 2 } }
    layer { name: "flat" type: "Flatten" bottom: "ip" top: "flat" }
    """
    net = check_parity(tmp_path, text, {"ip": [f32(rng, 3, 4), f32(rng, 3)]}, (2, 3, 2, 2))
    assert net(torch.zeros(2, 3, 2, 2)).shape == (2, 9)


def test_legacy_v1_layer_variants(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    text = """
    name: "v1" input: "data" input_dim: 2 input_dim: 3 input_dim: 7 input_dim: 7
    layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
      convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 2 group: 1 } }
    layers { name: "split" type: SPLIT bottom: "conv" top: "a" top: "b" }
    layers { name: "relu" type: RELU bottom: "a" top: "a" relu_param { negative_slope: 0.05 } }
    layers { name: "pool" type: POOLING bottom: "a" top: "pool"
      pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
    layers { name: "drop" type: DROPOUT bottom: "pool" top: "pool" }
    layers { name: "flat" type: FLATTEN bottom: "pool" top: "flat" }
    layers { name: "ip" type: INNER_PRODUCT bottom: "flat" top: "ip"
      inner_product_param { num_output: 6 } }
    layers { name: "sig" type: SIGMOID bottom: "ip" top: "sig" }
    layers { name: "tanh" type: TANH bottom: "b" top: "tanh" }
    layers { name: "prob" type: SOFTMAX bottom: "sig" top: "prob" }
    """
    blobs = {
        "conv": [f32(rng, 4, 3, 3, 3), f32(rng, 4)],  # stored (4,3,3,3) and (1,1,1,4)
        "ip": [f32(rng, 6, 36), f32(rng, 6)],  # stored (1,1,6,36) and (1,1,1,6)
    }
    net = check_parity(tmp_path, text, blobs, (2, 3, 7, 7))
    assert net.output_names == ["tanh", "prob"]  # in the order the layers produce them
    stored = {layer.name: layer for layer in read_caffemodel(tmp_path / "net.caffemodel").layers}
    assert stored["ip"].blobs[0].data.shape == (1, 1, 6, 36)  # the legacy layout was exercised
    assert stored["ip"].blobs[1].data.shape == (1, 1, 1, 6)


def test_eltwise_and_concat(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    text = """
    input: "data" input_dim: 2 input_dim: 3 input_dim: 5 input_dim: 5
    layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
      convolution_param { num_output: 3 kernel_size: 3 pad: 1 } }
    layer { name: "sum" type: "Eltwise" bottom: "data" bottom: "c1" top: "sum"
      eltwise_param { operation: SUM coeff: 0.5 coeff: -2 } }
    layer { name: "prod" type: "Eltwise" bottom: "sum" bottom: "c1" bottom: "data" top: "prod"
      eltwise_param { operation: PROD } }
    layer { name: "max" type: "Eltwise" bottom: "prod" bottom: "sum" top: "max"
      eltwise_param { operation: MAX } }
    layer { name: "cat" type: "Concat" bottom: "max" bottom: "c1" top: "cat" }
    layer { name: "cat2" type: "Concat" bottom: "cat" bottom: "cat" top: "cat2"
      concat_param { concat_dim: 2 } }
    """
    net = check_parity(tmp_path, text, {"c1": [f32(rng, 3, 3, 3, 3), f32(rng, 3)]}, (2, 3, 5, 5))
    assert net.output_names == ["cat2"]
    assert net(torch.zeros(2, 3, 5, 5)).shape == (2, 6, 10, 5)


def lsoftmax_net(base: float, test_name: str = "ip2_test") -> str:
    return f"""
    layer {{ name: "data" type: "Input" top: "data" top: "label"
      input_param {{ shape {{ dim: 4 dim: 6 }} shape {{ dim: 4 }} }} }}
    layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "feat"
      inner_product_param {{ num_output: 3 }} }}
    layer {{ name: "ip2" type: "LargeMarginInnerProduct" bottom: "feat" bottom: "label"
      top: "logits" top: "lambda" param {{ name: "shared_w" }} include {{ phase: TRAIN }}
      largemargin_inner_product_param {{ num_output: 5 type: TRIPLE base: {base} gamma: 0.001
        power: 2 lambda_min: 0 iteration: 10 }} }}
    layer {{ name: "{test_name}" type: "LargeMarginInnerProduct" bottom: "feat" bottom: "label"
      top: "logits" top: "lambda" param {{ name: "shared_w" lr_mult: 0 }} include {{ phase: TEST }}
      largemargin_inner_product_param {{ num_output: 5 type: SINGLE base: 0 gamma: 1 }} }}
    layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "logits" bottom: "label" top: "loss" }}
    """


@pytest.mark.parametrize("phase", ["test", "train"])
def test_lsoftmax_shared_weight_and_margin(tmp_path: Path, phase: str) -> None:
    rng = np.random.default_rng(5)
    w = f32(rng, 5, 3)
    blobs = {"ip1": [f32(rng, 3, 6), f32(rng, 3)], "ip2": [w], "ip2_test": [w]}
    net = check_parity(tmp_path, lsoftmax_net(0.0), blobs, (4, 6), snapshot="train", phase=phase)
    head = module_of(net, "ip2_test" if phase == "test" else "ip2")
    assert isinstance(head, LSoftmaxLinear) and head.margin == 3
    assert head.schedule == Exponential(0.0, float(np.float32(0.001)), 2.0, 0.0, 10)
    assert np.array_equal(head.weight.detach().numpy(), w)
    assert net.label_name == "label"
    # Training mode with labels: full margin (lambda = 0), checked against the reference.
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(4, 6)).astype(np.float32))
    labels = torch.tensor([0, 4, 2, 2])
    feat = module_of(net, "ip1")(x).detach().double()
    net.train()
    out = net(x, labels).detach().numpy()
    net.eval()
    ref = lsoftmax_reference(feat, head.weight.detach().double(), labels, 3, 0.0).numpy()
    assert max_rel(out, ref) <= TOL
    assert not np.allclose(out, net(x).detach().numpy())  # the margin changed the target logit


@pytest.mark.parametrize("isotropic", [True, False])
def test_class_distance(tmp_path: Path, isotropic: bool) -> None:
    rng = np.random.default_rng(6)
    sigma = np.abs(f32(rng, 5)) + 0.2 if isotropic else np.abs(f32(rng, 5, 4)) + 0.2
    sigma.ravel()[0] = -0.5  # below both of Caffe's floors
    sigma.ravel()[1] = 1e-9
    text = f"""
    layer {{ name: "data" type: "Input" top: "data" top: "label"
      input_param {{ shape {{ dim: 3 dim: 4 }} shape {{ dim: 3 }} }} }}
    layer {{ name: "cd" type: "ClassDistance" bottom: "data" bottom: "label" top: "cd"
      class_distance_param {{ num_output: 5 isotropic: {str(isotropic).lower()}
        margin_mul {{ value: 0.5 }} center_coef: 0.01 }} }}
    """
    net = check_parity(tmp_path, text, {"cd": [f32(rng, 5, 4, scale=1.0), sigma]}, (3, 4))
    head = module_of(net, "cd")
    assert head.isotropic is isotropic and head.include_logdet is False
    assert head.current_alpha == pytest.approx(0.5)


def test_prototxt_without_weights_initializes(tmp_path: Path) -> None:
    text = lsoftmax_net(1000.0)
    proto = tmp_path / "deploy.prototxt"
    proto.write_text(text)
    net = from_caffe(proto)
    assert net(torch.zeros(4, 6)).shape == (4, 5)
    assert math.isfinite(float(net(torch.randn(4, 6)).detach().sum()))


@needs_caffe_fixtures
def test_original_prototxts_parse_and_build() -> None:
    for name, shape in [
        ("lsoftmax_mnist_train_test", (1, 1, 28, 28)),
        ("lgm_cifar100_simple_trainval", (1, 3, 32, 32)),
    ]:
        net = from_caffe(FIXTURES / "caffe" / "prototxt" / f"{name}.prototxt", input_shape=shape)
        assert len(net.output_names) == 1, name


# ---- schema --------------------------------------------------------------------------------


def test_schema_field_numbers_match_formats() -> None:
    msgs = schema()
    expected = {
        "caffe.NetParameter": {"layer": 100, "layers": 2, "input": 3, "input_shape": 8,
                               "input_dim": 4},
        "caffe.LayerParameter": {"bn_param": 201, "largemargin_inner_product_param": 202,
                                 "class_distance_param": 150, "convolution_param": 106,
                                 "batch_norm_param": 139, "scale_param": 142, "blobs": 7,
                                 "param": 6, "include": 8},
        "caffe.V1LayerParameter": {"type": 5, "blobs": 6, "param": 1001, "name": 4},
        "caffe.BlobProto": {"shape": 7, "data": 5, "double_data": 8, "num": 1, "width": 4},
        "caffe.LargeMarginInnerProductParameter": {"type": 2, "base": 5, "gamma": 6,
                                                   "power": 7, "iteration": 8,
                                                   "lambda_min": 9},
        "caffe.ClassDistanceParameter": {"margin_mul": 5, "center_coef": 7,
                                         "update_sigma": 11, "isotropic": 12},
        "caffe.BNParameter": {"momentum": 3, "eps": 4, "frozen": 5},
    }  # fmt: skip
    for msg, fields in expected.items():
        desc = msgs[msg].DESCRIPTOR
        for field, number in fields.items():
            assert desc.fields_by_name[field].number == number, (msg, field)
    blob = msgs["caffe.BlobProto"].DESCRIPTOR.fields_by_name["data"]
    assert blob.is_packed
    assert msgs["caffe.ClassDistanceParameter"]().isotropic is True  # proto default


def test_proto_parser_reports_bad_schema(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"x\.proto:2: unknown type 'Nope'"):
        load_proto("x.proto", 'syntax = "proto2";\nmessage A { optional Nope f = 1; }')
    with pytest.raises(ValueError, match=r"x\.proto:1: expected '='"):
        load_proto("x.proto", "message A { optional int32 f 1; }")
    with pytest.raises(ValueError, match="only proto2"):
        load_proto("x.proto", 'syntax = "proto3";')


# ---- ONNX, CLI, saving -------------------------------------------------------------------


@needs_caffe_fixtures
def test_fixture_exports_to_onnx_and_runs(
    tmp_path: Path, converted: dict[str, ConvertedNet]
) -> None:
    # "custom": the ai.lsoftmax node run by the project's ONNX Runtime kernel (other tests here
    # cover the "portable" and "function" flavours).
    from lsoftmax.exporters import export_onnx

    from lsoftmax import ort

    net = converted["lsoftmax_mnist_tiny"]
    x = fixture_input("lsoftmax_mnist_tiny", 4)
    model = export_onnx(net.eval(), (torch.from_numpy(x),), tmp_path / "m.onnx", mode="custom")
    assert any(n.domain == "ai.lsoftmax" for n in model.graph.node)
    sess = ort.session(str(tmp_path / "m.onnx"), providers="cpu")
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x})
    ref = reference("lsoftmax_mnist_tiny", x)
    assert max_rel(got, ref["ip2"]) <= TOL


@needs_caffe_fixtures
def test_lgm_fixture_exports_to_onnx(tmp_path: Path, converted: dict[str, ConvertedNet]) -> None:
    ort = pytest.importorskip("onnxruntime")
    from lsoftmax.exporters import export_onnx
    from lsoftmax.exporters.translations import translation_table

    if torch.ops.lsoftmax.lgm_logits.default not in translation_table():
        pytest.skip("lsoftmax.exporters has no ONNX translation for lsoftmax::lgm_logits yet")
    x = fixture_input("lgm_tiny_iso", 4)
    export_onnx(
        converted["lgm_tiny_iso"], (torch.from_numpy(x),), tmp_path / "g.onnx", mode="portable"
    )
    sess = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x})
    ref = reference("lgm_tiny_iso", x)
    assert max_rel(got, ref["classifier"]) <= TOL


@needs_caffe_fixtures
def test_cli_convert_caffe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lsoftmax.cli import main

    out = tmp_path / "lenet.pt"
    rc = main([
        "convert", "caffe", str(CAFFE / "lenet_v1_legacy.prototxt"),
        str(CAFFE / "lenet_v1_legacy.caffemodel"), "--out", str(out),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    for needle in ("conv1", "CONVOLUTION" if False else "Convolution", "Conv2d", "[20, 1, 5, 5]",
                   "InnerProduct", "[500, 800]", "(dropped)", "outputs: ip2"):  # fmt: skip
        assert needle in printed, needle
    net = load_converted(out)
    x = fixture_input("lenet_v1_legacy", 2)
    ref = reference("lenet_v1_legacy", x)
    assert max_rel(net(torch.from_numpy(x)).detach().numpy(), ref["ip2"]) <= TOL


@needs_caffe_fixtures
def test_cli_reports_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lsoftmax.cli import main

    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(b"\x0a\xff\xff")
    rc = main([
        "convert", "caffe", str(CAFFE / "lenet_v1_legacy.prototxt"), str(bad),
        "--out", str(tmp_path / "x.pt"),
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "bad.caffemodel" in err and err.count("\n") == 1

"""What converted and exported models hand their users: Caffe's ``transform_param`` applied in
the converted net (against a numpy forward), output names that say what the output is
(``probabilities`` for MXNet's softmax, not ``logits``), and the L-GM OOD score ``loglik`` in
``lsoftmax export`` of an L-GM checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import MXNET_FIXTURES, needs_mxnet_fixtures
from lsoftmax.converters import from_caffe, from_mxnet
from lsoftmax.converters.caffe_reader import schema
from lsoftmax.converters.modules import CaffeTransform
from lsoftmax.exporters import export_onnx, output_names
from onnx.reference import ReferenceEvaluator
from reference import max_rel_err
from test_converters_reference import caffe_forward, caffe_transform

from lsoftmax import ort as lort
from lsoftmax.checkpoint import load_model
from lsoftmax.cli import main


def _net(transform: str, data_type: str = "Data", channels: int = 3) -> str:
    return f"""
name: "t"
layer {{ name: "data" type: "{data_type}" top: "data" top: "label"
  include {{ phase: TEST }}
  transform_param {{ {transform} }}
  data_param {{ source: "x" batch_size: 2 }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label"
  include {{ phase: TRAIN }}
  transform_param {{ scale: 100 }}
  data_param {{ source: "y" batch_size: 2 }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 2 kernel_size: 3 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param {{ num_output: 4 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""


TRANSFORMS = {
    "mean+scale": ("mean_value: 127.5 scale: 0.0078125", (2, 3, 8, 8)),
    "per-channel": ("mean_value: 10 mean_value: 20 mean_value: 30 scale: 0.5", (2, 3, 8, 8)),
    "crop": ("crop_size: 6 mean_value: 100", (2, 3, 9, 8)),
    "scale only": ("scale: 0.00390625", (2, 3, 8, 8)),
}


@pytest.mark.parametrize("case", list(TRANSFORMS))
def test_caffe_transform_param_matches_numpy_forward(case: str, tmp_path: Path) -> None:
    transform, shape = TRANSFORMS[case]
    proto_path = tmp_path / "t.prototxt"
    proto_path.write_text(_net(transform))
    net = from_caffe(proto_path, input_shape=shape)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=shape).astype(np.float32)  # raw pixels, as Data reads them
    got = net(torch.from_numpy(x)).detach().numpy()
    # The numpy forward runs the same prototxt with the converted weights.
    from google.protobuf import text_format

    msg = schema()["caffe.NetParameter"]()
    text_format.Parse(proto_path.read_text(), msg)
    conv = net.layers["conv"]
    ip = net.layers["ip"]
    for layer in msg.layer:
        blobs = {"conv": (conv.weight, conv.bias), "ip": (ip.weight, ip.bias)}.get(layer.name)
        for t in blobs or ():
            b = layer.blobs.add()
            b.shape.dim.extend(t.shape)
            b.data.extend(t.detach().numpy().ravel().tolist())
    ref = caffe_forward(msg, {"data": x})["ip"]
    assert max_rel_err(got, ref) <= 1e-5
    if "crop" not in case:  # (without the crop the weights would not fit)
        # Without the transform the output differs: the test sees a dropped transform_param.
        plain = from_caffe(proto_path, input_shape=shape, transform=False)
        plain.load_state_dict(net.state_dict(), strict=False)
        assert max_rel_err(plain(torch.from_numpy(x)).detach().numpy(), ref) > 1e-3
    assert any(row.source_type == "transform_param" for row in net.mapping)


def test_numpy_transform_reference_by_hand() -> None:
    class P:
        crop_size, scale, mean_value = 2, 0.5, [1.0]

    x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    out = caffe_transform(x, P())
    np.testing.assert_array_equal(out[0, 0], (np.array([[5, 6], [9, 10]]) - 1.0) * 0.5)


def test_mean_file_is_read_and_cropped(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    mean = rng.uniform(0, 255, size=(3, 9, 8)).astype(np.float32)
    blob = schema()["caffe.BlobProto"]()
    blob.num, blob.channels, blob.height, blob.width = 1, 3, 9, 8
    blob.data.extend(mean.ravel().tolist())
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
    proto_path = tmp_path / "t.prototxt"
    proto_path.write_text(_net('mean_file: "mean.binaryproto" crop_size: 6 scale: 2'))
    net = from_caffe(proto_path, input_shape=(2, 3, 9, 8))
    (module,) = [m for m in net.layers.values() if isinstance(m, CaffeTransform)]
    x = rng.uniform(0, 255, size=(2, 3, 9, 8)).astype(np.float32)
    got = module(torch.from_numpy(x)).numpy()

    class P:
        crop_size, scale, mean_value = 6, 2.0, []

    ref = caffe_transform(x.astype(np.float64), P(), mean_image=mean.astype(np.float64))
    assert max_rel_err(got, ref) <= 1e-6


@pytest.mark.parametrize(
    ("transform", "shape", "match"),
    [
        ('mean_file: "nowhere.binaryproto"', (2, 3, 8, 8), "mean_file 'nowhere.binaryproto' not"),
        ("mean_value: 1 mean_value: 2", (2, 3, 8, 8), "2 mean_value entries for 3 channels"),
        ('mean_value: 1 mean_file: "m.binaryproto"', (2, 3, 8, 8), "both mean_file and mean"),
        ("crop_size: 9", (2, 3, 8, 8), "crop_size 9 does not fit"),
    ],
)
def test_bad_transform_param_is_a_clear_error(
    transform: str, shape: tuple[int, ...], match: str, tmp_path: Path
) -> None:
    p = tmp_path / "t.prototxt"
    p.write_text(_net(transform))
    with pytest.raises(ValueError, match=match):
        from_caffe(p, input_shape=shape)


def test_transformed_net_exports_and_runs_everywhere(tmp_path: Path) -> None:
    p = tmp_path / "t.prototxt"
    p.write_text(_net("crop_size: 6 mean_value: 10 mean_value: 20 mean_value: 30 scale: 0.1"))
    net = from_caffe(p, input_shape=(2, 3, 8, 8))
    x = torch.rand(4, 3, 8, 8) * 255
    proto = export_onnx(net, (x,), tmp_path / "t.onnx", mode="portable")
    assert [o.name for o in proto.graph.output] == ["logits"]
    with torch.no_grad():
        expected = net(x).numpy()
    (got,) = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})
    assert max_rel_err(got, expected) <= 1e-5


@needs_mxnet_fixtures
@pytest.mark.parametrize("keep_softmax", [True, False], ids=["softmax", "logits"])
def test_mxnet_probability_output_is_named_for_what_it_is(
    keep_softmax: bool, tmp_path: Path
) -> None:
    net = from_mxnet(
        MXNET_FIXTURES / "lsoftmax_lenet-symbol.json",
        MXNET_FIXTURES / "lsoftmax_lenet-0000.params",
        keep_softmax=keep_softmax,
    )
    name = "probabilities" if keep_softmax else "logits"
    assert output_names(net) == [name]
    x = torch.randn(3, 1, 28, 28)
    proto = export_onnx(net, (x,), tmp_path / "m.onnx", mode="function")
    assert [o.name for o in proto.graph.output] == [name]
    sess = lort.session(proto.SerializeToString())
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    if keep_softmax:
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    with torch.no_grad():
        assert max_rel_err(out, net(x)) <= 1e-5


def test_output_names_validation() -> None:
    class Bad(torch.nn.Module):
        onnx_output_names = "logits"

    with pytest.raises(TypeError, match="onnx_output_names must be a list"):
        output_names(Bad())
    assert output_names(torch.nn.Linear(2, 2)) == ["logits"]


def test_cli_export_of_lgm_keeps_loglik(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "lgm"
    tiny = ["--dataset", "digits", "--limit", "128", "--batch-size", "64", "--no-progress"]
    assert main(["train", *tiny, "--threads", "1", "--loss", "lgm", "--epochs", "1",
                 "--out", str(run)]) == 0  # fmt: skip
    out = tmp_path / "lgm.onnx"
    assert main(["export", str(run / "checkpoint.pt"), str(out)]) == 0
    assert "loglik" in capsys.readouterr().out
    model, _ = load_model(run / "checkpoint.pt")
    proto = onnx.load(out)
    assert [o.name for o in proto.graph.output] == ["logits", "loglik"]
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        logits, loglik = model.head.inference(model.features(x))
    feeds = {proto.graph.input[0].name: x.numpy()}
    for got in (
        lort.session(out.read_bytes()).run(None, feeds),
        ReferenceEvaluator(proto).run(None, feeds),
    ):
        assert max_rel_err(got[0], logits) <= 1e-5
        assert max_rel_err(got[1], loglik) <= 1e-5

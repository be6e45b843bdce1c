"""SphereFace's Caffe layer (wy1iu/sphereface: ``MarginInnerProduct``, A-Softmax) ->
``MarginLinear(margin=SphereFace(m))`` with the layer's lambda schedule, then ONNX.

The fixture (tests/fixtures/sphereface: prototxt + caffemodel written by make_fixture.py in the
fork's format) is checked against ``caffe_forward``, a float64 numpy run of the Caffe net whose
``margin_inner_product`` follows the layer's own Forward_cpu (sign formulas, in-place weight
normalization, lambda by iteration).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import CONVERTER_TOL
from google.protobuf import text_format
from lsoftmax.converters import from_caffe
from lsoftmax.converters.caffe_reader import schema
from lsoftmax.exporters import export_onnx
from test_converters_reference import caffe_forward, max_rel

from lsoftmax import ort as lort
from lsoftmax.margins import SphereFace
from lsoftmax.schedules import Exponential
from lsoftmax.torch import MarginLinear

HERE = Path(__file__).parent / "fixtures" / "sphereface"
PROTOTXT = HERE / "sphereface_tiny.prototxt"
CAFFEMODEL = HERE / "sphereface_tiny.caffemodel"
SHAPE = (4, 3, 8, 8)


def _caffe_net() -> object:
    """The caffemodel's message (weights) with the prototxt's layer list, as Caffe runs it."""
    net_cls = schema()["caffe.NetParameter"]
    snapshot = net_cls()
    snapshot.ParseFromString(CAFFEMODEL.read_bytes())
    return snapshot


def _plain_reference(x: np.ndarray) -> np.ndarray:
    """Caffe's fc6 without the margin (the layer's plain x . w_j / |w_j|)."""
    feeds = {"data": x, "label": np.zeros(len(x))}  # the Split needs a label blob
    return caffe_forward(_caffe_net(), feeds, phase="train")["fc6"]


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 255, SHAPE).astype(np.float32)  # raw pixels: the net applies the transform
    label = np.array([0, 4, 2, 1])
    return x, label


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return from_caffe(PROTOTXT, CAFFEMODEL, input_shape=SHAPE)


def test_fixture_parses_as_the_fork_writes_it() -> None:
    proto = text_format.Parse(PROTOTXT.read_text(), schema()["caffe.NetParameter"]())
    fc6 = next(layer for layer in proto.layer if layer.type == "MarginInnerProduct")
    p = fc6.margin_inner_product_param
    assert (p.num_output, p.type, p.base, p.gamma, p.power, p.lambda_min, p.iteration) == (
        5, 3, 1000.0, pytest.approx(0.12), 1.0, 5.0, 0,
    )  # fmt: skip
    snap = _caffe_net()
    names = [(layer.name, layer.type) for layer in snap.layer]
    assert ("label_data_1_split", "Split") in names and ("fc6", "MarginInnerProduct") in names


def test_head_is_sphereface_with_the_layer_schedule(net: torch.nn.Module) -> None:
    heads = [m for m in net.modules() if isinstance(m, MarginLinear)]
    assert len(heads) == 1
    head = heads[0]
    assert head.margin == SphereFace(4)
    # Caffe's float32 fields as stored: gamma 0.12 is 0.119999997...
    assert head.schedule == Exponential(1000.0, float(np.float32(0.12)), 1.0, 5.0, 0)
    row = next(r for r in net.mapping if r.source_name == "fc6")
    assert (row.source_type, row.target) == ("MarginInnerProduct", "MarginLinear")


def test_eval_logits_match_caffe(net: torch.nn.Module) -> None:
    x, _ = _data()
    ref = _plain_reference(x)
    with torch.no_grad():
        got = net.eval()(torch.from_numpy(x))
    assert max_rel(got.numpy(), ref) <= CONVERTER_TOL


@pytest.mark.parametrize("step", [0, 5000], ids=["lambda-892", "lambda-min"])
def test_training_logits_match_caffe_at_the_step(net: torch.nn.Module, step: int) -> None:
    """The TRAIN forward at head step ``step`` is Caffe's at iter_ = iteration + step + 1 (the
    layer increments before it computes); 5000 is past the floor lambda_min = 5."""
    x, label = _data()
    head = next(m for m in net.modules() if isinstance(m, MarginLinear))
    feeds = {"data": x, "label": label.astype(np.float64)}
    ref = caffe_forward(_caffe_net(), feeds, phase="train", margin_iter=step + 1)["fc6"]
    with torch.no_grad():
        head.step.fill_(step)
        got = net.train()(torch.from_numpy(x), torch.from_numpy(label))
    net.eval()
    assert max_rel(got.numpy(), ref) <= CONVERTER_TOL
    # The margin really applied: the targets moved away from the plain logits.
    plain = caffe_forward(_caffe_net(), feeds, phase="train")["fc6"]
    rows = np.arange(len(label))
    assert np.abs(ref[rows, label] - plain[rows, label]).min() > 1e-3


def test_converted_net_exports_to_onnx(net: torch.nn.Module, tmp_path: Path) -> None:
    x, _ = _data()
    proto = export_onnx(
        net.eval(), torch.from_numpy(x), tmp_path / "sphereface.onnx", mode="function"
    )
    assert [n.op_type for n in proto.graph.node if n.domain == "ai.lsoftmax"] == ["MarginLinear"]
    ref = _plain_reference(x)
    for sess in (
        lort.session(tmp_path / "sphereface.onnx"),
        onnxruntime.InferenceSession(str(tmp_path / "sphereface.onnx")),
    ):
        (got,) = sess.run(None, {sess.get_inputs()[0].name: x})
        assert max_rel(got, ref) <= CONVERTER_TOL

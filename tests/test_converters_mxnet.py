"""MXNet -> torch conversion: the .params reader (every layout), MXNet's own outputs, every op
variant against a numpy forward, the Gluon L-GM loader, ONNX and the CLI."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import CONVERTER_TOL as TOL
from conftest import MXNET_FIXTURES as MX
from conftest import needs_mxnet_fixtures
from lsoftmax.converters import from_mxnet, load_converted, load_gluon_lgm
from lsoftmax.converters.mxnet_params import read_params
from reference import lsoftmax_reference
from test_converters_reference import max_rel, mxnet_forward
from torch import nn

from lsoftmax.schedules import Scaled
from lsoftmax.torch import LSoftmaxLinear

# ---- an independent .params writer (MXNet's NDArray::Save layouts) ------------------------

V1, V2, V3, LEGACY = 0xF993FAC8, 0xF993FAC9, 0xF993FACA, None
CODES = {"float32": 0, "float64": 1, "float16": 2, "uint8": 3, "int32": 4, "int8": 5, "int64": 6}


def write_params(
    path: Path, arrays: dict[str, np.ndarray], magic: int | None = V2, names: bool = True
) -> None:
    buf = bytearray(struct.pack("<QQQ", 0x112, 0, len(arrays)))
    for a in arrays.values():
        if magic is None:
            buf += struct.pack("<I", a.ndim) + b"".join(struct.pack("<I", d) for d in a.shape)
        else:
            buf += struct.pack("<I", magic)
            if magic != V1:
                buf += struct.pack("<i", 0)  # dense storage
            buf += struct.pack("<i", a.ndim) + b"".join(struct.pack("<q", d) for d in a.shape)
        if a.ndim == 0:
            continue  # MXNet writes nothing more for an empty (none) array
        buf += struct.pack("<iii", 1, 0, CODES[a.dtype.name])
        buf += a.astype(a.dtype.newbyteorder("<")).tobytes()
    keys = list(arrays) if names else []
    buf += struct.pack("<Q", len(keys))
    for k in keys:
        raw = k.encode()
        buf += struct.pack("<Q", len(raw)) + raw
    path.write_bytes(bytes(buf))


@pytest.mark.parametrize("magic", [V1, V2, V3, LEGACY], ids=["v1", "v2", "v3", "legacy"])
def test_params_reader_layouts_and_dtypes(tmp_path: Path, magic: int | None) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        f"arg:{dt}": (rng.normal(size=(2, 3)) * 50).astype(dt)
        for dt in ("float32", "float64", "float16", "uint8", "int32", "int8", "int64")
    }
    arrays["aux:vector"] = rng.normal(size=(5,)).astype(np.float32)
    arrays["arg:4d"] = rng.normal(size=(2, 1, 3, 2)).astype(np.float32)
    write_params(tmp_path / "a.params", arrays, magic)
    got = read_params(tmp_path / "a.params")
    assert list(got) == list(arrays)
    for k, a in arrays.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape and np.array_equal(got[k], a)


def test_params_without_names_and_empty_arrays(tmp_path: Path) -> None:
    arrays = {"a": np.arange(3, dtype=np.float32), "b": np.zeros((), np.float32)}
    write_params(tmp_path / "n.params", arrays, V2, names=False)
    got = read_params(tmp_path / "n.params")
    assert list(got) == ["0", "1"]
    assert np.array_equal(got["0"], arrays["a"]) and got["1"].size == 0


@needs_mxnet_fixtures
def test_fixture_params_shapes() -> None:
    p = read_params(MX / "lsoftmax_lenet-0000.params")
    assert p["arg:custom0_weight"].shape == (10, 2)
    assert p["arg:convolution0_weight"].shape == (8, 1, 5, 5)
    head = read_params(MX / "lgm_head.params")
    assert set(head) == {"mean", "var"} and head["var"].shape == (10, 2)


# ---- the L-Softmax LeNet checkpoint against MXNet's own outputs ---------------------------


@pytest.fixture(scope="module")
def lenet() -> dict[str, Any]:
    sym = json.loads((MX / "lsoftmax_lenet-symbol.json").read_text())
    return {
        "sym": sym,
        "params": read_params(MX / "lsoftmax_lenet-0000.params"),
        "expected": dict(np.load(MX / "lsoftmax_lenet_expected.npz")),
    }


@needs_mxnet_fixtures
def test_numpy_reference_reproduces_mxnet(lenet: dict[str, Any]) -> None:
    e = lenet["expected"]
    ref = mxnet_forward(lenet["sym"], lenet["params"], e["data"])
    assert max_rel(ref["embedding"], e["embedding"]) <= TOL
    assert max_rel(ref["custom0"], e["lsoftmax_eval"]) <= TOL
    assert max_rel(ref["softmaxoutput0"], e["softmax_eval"]) <= TOL


@needs_mxnet_fixtures
def test_lenet_eval_outputs_match_mxnet(lenet: dict[str, Any]) -> None:
    e = lenet["expected"]
    x = torch.from_numpy(e["data"])
    probs = from_mxnet(MX / "lsoftmax_lenet-symbol.json", MX / "lsoftmax_lenet-0000.params")
    assert max_rel(probs(x).detach().numpy(), e["softmax_eval"]) <= TOL
    logits = from_mxnet(
        MX / "lsoftmax_lenet-symbol.json", MX / "lsoftmax_lenet-0000.params", keep_softmax=False
    )
    assert logits.output_names == ["custom0"]
    assert max_rel(logits(x).detach().numpy(), e["lsoftmax_eval"]) <= TOL


@needs_mxnet_fixtures
def test_lenet_train_logits_match_mxnet(lenet: dict[str, Any]) -> None:
    """MXNet's port blends with lambda = beta (here 100, scale 1): the same convention as ours
    (``(beta f + |x||w| psi) / (1 + beta)``), with beta at the first training step."""
    e = lenet["expected"]
    net = from_mxnet(
        MX / "lsoftmax_lenet-symbol.json", MX / "lsoftmax_lenet-0000.params", keep_softmax=False
    )
    head = next(m for m in net.modules() if isinstance(m, LSoftmaxLinear))
    assert head.margin == 4 and head.schedule == Scaled(100.0, 1.0, 0.0)
    labels = torch.from_numpy(e["softmax_label"].astype(np.int64))
    net.train()
    out = net(torch.from_numpy(e["data"]), labels).detach().numpy()
    net.eval()
    assert max_rel(out, e["lsoftmax_train_m4_beta100"]) <= TOL
    w = torch.from_numpy(lenet["params"]["arg:custom0_weight"]).double()
    ref = lsoftmax_reference(torch.from_numpy(e["embedding"]).double(), w, labels, 4, 100.0)
    assert max_rel(ref.numpy(), e["lsoftmax_train_m4_beta100"]) <= TOL
    # The margin is visible: the target logits differ from the eval logits.
    assert not np.allclose(e["lsoftmax_train_m4_beta100"], e["lsoftmax_eval"], rtol=1e-6)


# ---- synthetic symbols covering every op variant -------------------------------------------


class Sym:
    def __init__(self) -> None:
        self.nodes: list[dict[str, Any]] = []
        self.params: dict[str, np.ndarray] = {}
        self.rng = np.random.default_rng(11)

    def var(self, name: str, value: np.ndarray | None = None, aux: bool = False) -> int:
        self.nodes.append({"op": "null", "name": name, "inputs": []})
        if value is not None:
            self.params[f"{'aux' if aux else 'arg'}:{name}"] = value.astype(np.float32)
        return len(self.nodes) - 1

    def op(self, op: str, name: str, inputs: list[int], **attrs: Any) -> int:
        self.nodes.append({
            "op": op, "name": name, "attrs": {k: str(v) for k, v in attrs.items()},
            "inputs": [[i, 0, 0] for i in inputs],
        })  # fmt: skip
        return len(self.nodes) - 1

    def rand(self, *shape: int, scale: float = 0.5) -> np.ndarray:
        return self.rng.normal(size=shape) * scale

    def save(self, tmp: Path, head: int) -> tuple[Path, Path, dict[str, Any]]:
        doc = {"nodes": self.nodes, "arg_nodes": [], "heads": [[head, 0, 0]], "attrs": {}}
        sym_path, params_path = tmp / "s-symbol.json", tmp / "s-0000.params"
        sym_path.write_text(json.dumps(doc))
        write_params(params_path, self.params)
        return sym_path, params_path, doc


def bn(s: Sym, name: str, x: int, c: int, **attrs: Any) -> int:
    ins = [x, s.var(f"{name}_gamma", s.rand(c) + 1), s.var(f"{name}_beta", s.rand(c))]
    ins += [s.var(f"{name}_moving_mean", s.rand(c), aux=True)]
    ins += [s.var(f"{name}_moving_var", np.abs(s.rand(c)) + 0.3, aux=True)]
    return s.op("BatchNorm", name, ins, **attrs)


def test_op_variants_match_numpy(tmp_path: Path) -> None:
    s = Sym()
    x = s.var("data")
    c = s.op("Convolution", "conv", [x, s.var("conv_w", s.rand(6, 2, 3, 3)), s.var("conv_b", s.rand(6))],  # noqa: E501
             kernel="(3, 3)", num_filter=6, num_group=2, pad="(1, 1)", stride="(2, 1)")  # fmt: skip
    h = bn(s, "bn1", c, 6, fix_gamma=False, eps=1e-4)
    h = s.op("LeakyReLU", "lrelu", [h], act_type="leaky", slope=0.2)
    h = bn(s, "bn2", h, 6)  # fix_gamma defaults to True: the stored gamma is ignored
    h = s.op("LeakyReLU", "prelu", [h, s.var("prelu_gamma", np.abs(s.rand(6)))], act_type="prelu")
    h = s.op("Pooling", "pfull", [h], kernel="(3, 3)", stride="(2, 2)", pad="(1, 1)",
             pool_type="avg", pooling_convention="full", count_include_pad="False")  # fmt: skip
    h = s.op("Convolution", "conv2", [h, s.var("conv2_w", s.rand(4, 6, 1, 1))],
             kernel="(1, 1)", num_filter=4, no_bias="True")  # fmt: skip
    skip = h
    h = s.op("Activation", "relu", [h], act_type="relu")
    h = s.op("elemwise_add", "res", [h, skip])
    h = s.op("Concat", "cat", [h, skip], dim=1, num_args=2)
    h = s.op("Convolution", "conv3", [h, s.var("conv3_w", s.rand(4, 8, 1, 1))],
             kernel="(1, 1)", num_filter=4, no_bias="True")  # fmt: skip
    h = s.op("Pooling", "pvalid", [h], kernel="(2, 2)", stride="(1, 1)", pool_type="max")
    g = s.op("Pooling", "pglobal", [h], kernel="(1, 1)", pool_type="avg", global_pool="True")
    h = s.op("Activation", "sig", [h], act_type="sigmoid")
    h = s.op("Flatten", "flat", [h])
    h = s.op("Dropout", "drop", [h], p=0.5)
    h = s.op("FullyConnected", "fc", [h, s.var("fc_w", s.rand(5, 24)), s.var("fc_b", s.rand(5))],
             num_hidden=5)  # fmt: skip
    h = s.op("Activation", "tanh", [h], act_type="tanh")
    h = s.op("FullyConnected", "fc2", [h, s.var("fc2_w", s.rand(3, 5))], num_hidden=3,
             no_bias="True", flatten="False")  # fmt: skip
    label = s.var("softmax_label")
    head = s.op("LSoftmax", "ls", [h, label, s.var("ls_w", s.rand(4, 3))],
                num_hidden=4, margin=2, beta=10, scale=0.5, beta_min=1)  # fmt: skip
    out = s.op("SoftmaxOutput", "sm", [head, label])
    sym_path, params_path, doc = s.save(tmp_path, out)
    data = np.random.default_rng(1).normal(size=(3, 4, 9, 7)).astype(np.float32)
    ref = mxnet_forward(doc, s.params, data)
    net = from_mxnet(sym_path, params_path)
    assert max_rel(net(torch.from_numpy(data)).detach().numpy(), ref["sm"]) <= TOL
    logits_net = from_mxnet(sym_path, params_path, keep_softmax=False)
    assert max_rel(logits_net(torch.from_numpy(data)).detach().numpy(), ref["ls"]) <= TOL
    ls = next(m for m in net.modules() if isinstance(m, LSoftmaxLinear))
    assert ls.margin == 2 and ls.schedule == Scaled(10.0, 0.5, 1.0)
    # Global pooling is a separate branch: check it on its own head.
    nodes2 = [*s.nodes[: g + 1], {"op": "Flatten", "name": "gflat", "inputs": [[g, 0, 0]]}]
    sym2 = tmp_path / "g-symbol.json"
    sym2.write_text(json.dumps({"nodes": nodes2, "heads": [[g + 1, 0, 0]]}))
    ref2 = mxnet_forward({"nodes": nodes2}, s.params, data)
    gnet = from_mxnet(sym2, params_path)
    assert max_rel(gnet(torch.from_numpy(data)).detach().numpy(), ref2["gflat"]) <= TOL


# ---- Gluon L-GM --------------------------------------------------------------------------


def lenet_plus() -> nn.Module:
    """The Gluon LeNet++ of the fixture in torch: three (conv5x5 pad 2, LeakyReLU 0.01) x 2 +
    max-pool stages of 4/8/16 channels, then a 2-D embedding."""

    def stage(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 5, padding=2), nn.LeakyReLU(0.01),
            nn.Conv2d(cout, cout, 5, padding=2), nn.LeakyReLU(0.01), nn.MaxPool2d(2, 2),
        )  # fmt: skip

    return nn.Sequential(stage(1, 4), stage(4, 8), stage(8, 16), nn.Flatten(), nn.Linear(144, 2))


def gluon_key(name: str) -> str:
    # Gluon "features.3.weight" is the Dense layer, torch index 4 (after the Flatten).
    name = name.removeprefix("features.")
    return name.replace("3.", "4.", 1) if name.startswith("3.") else name


@needs_mxnet_fixtures
def test_gluon_lgm_matches_mxnet() -> None:
    e = dict(np.load(MX / "lgm_lenetplus_expected.npz"))
    model = load_gluon_lgm(
        MX / "lgm_lenetplus.params", lenet_plus(), gluon_key, head_params=MX / "lgm_head.params"
    )
    x = torch.from_numpy(e["data"])
    assert max_rel(model.features(x).detach().numpy(), e["features"]) <= TOL
    assert max_rel(model(x).detach().numpy(), e["lgm_logits"]) <= TOL
    # Independent float64 check of the Gluon convention: logits keep -1/2 log|V|.
    head = read_params(MX / "lgm_head.params")
    f, mu, var = (v.astype(np.float64) for v in (e["features"], head["mean"], head["var"]))
    ref = -0.5 * ((f[:, None] - mu[None]) ** 2 / var[None]).sum(-1) - 0.5 * np.log(var).sum(-1)
    assert max_rel(ref, e["lgm_logits"]) <= TOL
    assert model.lgm.include_logdet is True


@needs_mxnet_fixtures
def test_gluon_lgm_exports_to_onnx(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from lsoftmax.exporters import export_onnx

    e = dict(np.load(MX / "lgm_lenetplus_expected.npz"))
    model = load_gluon_lgm(
        MX / "lgm_lenetplus.params", lenet_plus(), gluon_key, head_params=MX / "lgm_head.params"
    )
    export_onnx(model, (torch.from_numpy(e["data"]),), tmp_path / "g.onnx", mode="function")
    sess = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: e["data"]})
    assert max_rel(got, e["lgm_logits"]) <= TOL


@needs_mxnet_fixtures
def test_gluon_lgm_head_only_and_combined_file(tmp_path: Path) -> None:
    e = dict(np.load(MX / "lgm_lenetplus_expected.npz"))
    lgm = load_gluon_lgm(MX / "lgm_head.params")
    _, logits = lgm(torch.from_numpy(e["features"]))
    assert max_rel(logits.detach().numpy(), e["lgm_logits"]) <= TOL
    both = {**read_params(MX / "lgm_lenetplus.params")}
    both.update({f"output.{k}": v for k, v in read_params(MX / "lgm_head.params").items()})
    write_params(tmp_path / "all.params", both)
    model = load_gluon_lgm(tmp_path / "all.params", lenet_plus(), gluon_key)
    assert max_rel(model(torch.from_numpy(e["data"])).detach().numpy(), e["lgm_logits"]) <= TOL


# ---- ONNX and CLI ------------------------------------------------------------------------


@needs_mxnet_fixtures
def test_cli_convert_mxnet_and_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ort = pytest.importorskip("onnxruntime")
    from lsoftmax.cli import main

    e = dict(np.load(MX / "lsoftmax_lenet_expected.npz"))
    out, onnx_path = tmp_path / "m.pt", tmp_path / "m.onnx"
    rc = main([
        "convert", "mxnet", str(MX / "lsoftmax_lenet-symbol.json"),
        str(MX / "lsoftmax_lenet-0000.params"), "--out", str(out), "--logits",
        "--onnx", str(onnx_path), "--input-shape", "4,1,28,28",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    for needle in ("custom0", "Custom:LSoftmax", "LSoftmaxLinear", "weight[10, 2]", "(dropped)"):
        assert needle in printed, needle
    net = load_converted(out)
    assert max_rel(net(torch.from_numpy(e["data"])).detach().numpy(), e["lsoftmax_eval"]) <= TOL
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: e["data"]})
    assert max_rel(got, e["lsoftmax_eval"]) <= TOL

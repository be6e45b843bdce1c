"""L-GM through ONNX: torch eager vs the numpy API vs the float64 reference vs ONNX Runtime
(``ai.lsoftmax::LGMLogits`` kernel, model-local function body, portable standard ops).

Parity is ``max_rel_err``: <= 1e-5 in float32, <= 1e-10 in float64. Each model is exported once
(``mode="custom"``) and turned into the other modes with ``finalize``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import TOL
from lsoftmax.exporters import TrainingOpError, export_onnx, finalize
from onnx_models import copy_model, lgm_node_model
from reference import max_rel_err
from test_lgm_core import lgm_reference
from torch import Tensor, nn

from lsoftmax import lgm_core
from lsoftmax import ort as lort
from lsoftmax.torch import LGMClassifier, LGMLoss

MODES = ("custom", "function", "portable")
ALPHA = 0.75  # exact in float32 (ONNX float attributes are float32)
CASES = pytest.mark.parametrize(
    ("dtype", "isotropic"),
    [(torch.float32, False), (torch.float32, True), (torch.float64, False), (torch.float64, True)],
    ids=["f32-diag", "f32-iso", "f64-diag", "f64-iso"],
)


class Net(nn.Module):
    """A linear feature layer and an L-GM head; with labels, the training-form logits."""

    def __init__(self, dtype: torch.dtype, isotropic: bool, with_labels: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Linear(6, 4, dtype=dtype)
        self.lgm = LGMLoss(5, 4, isotropic=isotropic, dtype=dtype)
        with torch.no_grad():
            self.lgm.log_var.normal_(0.0, 0.4)
        self.head = LGMClassifier(self.lgm)
        self.with_labels = with_labels

    def forward(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        feat = self.features(x)
        if not self.with_labels:
            return self.head(feat)
        lv = self.lgm.effective_log_var()
        return torch.ops.lsoftmax.lgm_logits(feat, self.lgm.means, lv, labels, ALPHA, True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache: dict[tuple[torch.dtype, bool, bool], tuple[Net, onnx.ModelProto]] = {}
    tmp = tmp_path_factory.mktemp("lgm_onnx")

    def get(dtype: torch.dtype, isotropic: bool, with_labels: bool) -> tuple[Net, onnx.ModelProto]:
        key = (dtype, isotropic, with_labels)
        if key not in cache:
            net = Net(dtype, isotropic, with_labels).eval()
            x = torch.randn(3, 6, dtype=dtype)
            args = (x, torch.tensor([0, 1, 4])) if with_labels else (x,)
            cache[key] = (net, export_onnx(net, args, tmp / "m.onnx", mode="custom"))
        return cache[key]

    return get


def _run(proto: onnx.ModelProto, mode: str, feeds: list[np.ndarray], library: bool = True):
    model = finalize(copy_model(proto), mode).SerializeToString()
    sess = lort.session(model) if library else onnxruntime.InferenceSession(model)
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, feeds, strict=True)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_labels", [False, True], ids=["inference", "labels"])
@CASES
def test_parity_torch_numpy_reference_ort(exported, dtype, isotropic, with_labels, mode) -> None:
    net, proto = exported(dtype, isotropic, with_labels)
    gen = torch.Generator().manual_seed(1)
    x = 2.0 * torch.randn(11, 6, generator=gen, dtype=dtype)
    labels = torch.randint(0, 5, (11,), generator=gen)
    y = labels if with_labels else None
    feeds = [x.numpy(), labels.numpy()] if with_labels else [x.numpy()]
    got = _run(proto, mode, feeds)
    with torch.no_grad():
        eager = net(x, y) if with_labels else net(x)
        feat = net.features(x)
        lv = net.lgm.effective_log_var()
        means = net.lgm.means
    alpha = ALPHA if with_labels else 0.0
    ref = lgm_reference(feat, means, lv, y, alpha, True)
    via_numpy = lgm_core.lgm_forward(
        feat.numpy(),
        means.detach().numpy(),
        lv.numpy(),
        None if y is None else y.numpy(),
        alpha=alpha,
    )
    for name, i in (("logits", 0), ("loglik", 1)):
        assert got[i].dtype == feat.numpy().dtype
        assert max_rel_err(got[i], ref[i]) <= TOL[dtype], (name, "ort vs reference")
        assert max_rel_err(eager[i], ref[i]) <= TOL[dtype], (name, "torch vs reference")
        assert max_rel_err(got[i], eager[i]) <= TOL[dtype], (name, "ort vs torch")
        assert max_rel_err(via_numpy[i], ref[i]) <= TOL[dtype], (name, "numpy vs reference")


@CASES
def test_function_body_runs_without_the_library(exported, dtype, isotropic) -> None:
    _, proto = exported(dtype, isotropic, True)
    x = torch.randn(9, 6, dtype=dtype, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(9) % 5
    feeds = [x.numpy(), labels.numpy()]
    body = _run(proto, "function", feeds, library=False)
    before = lort.kernel_calls()
    kernel = _run(proto, "function", feeds, library=True)
    assert lort.kernel_calls() > before  # the registered kernel ran, not the body
    for a, b in zip(body, kernel, strict=True):
        assert max_rel_err(a, b) <= TOL[dtype]


def _feeds(labels: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "X": rng.standard_normal((len(labels), 3)).astype(np.float32),
        "means": rng.standard_normal((2, 3)).astype(np.float32),
        "log_var": np.zeros((2, 3), np.float32),
        "labels": labels,
    }


def test_ort_kernel_rejects_bad_input() -> None:
    sess = lort.session(lgm_node_model(onnx.TensorProto.FLOAT, alpha=0.5))
    with pytest.raises(
        onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument,
        match=r"labels\[1\] = 2 is out of range",
    ):
        sess.run(None, _feeds(np.array([0, 2], np.int64)))
    bad_lv = _feeds(np.array([0, 1], np.int64))
    bad_lv["log_var"] = bad_lv["log_var"][:, :2].copy()
    with pytest.raises(Exception, match="log_var"):
        sess.run(None, bad_lv)
    float_labels = lort.session(
        lgm_node_model(onnx.TensorProto.FLOAT, labels_type=onnx.TensorProto.FLOAT)
    )
    with pytest.raises(Exception, match="labels must be int64 or int32"):
        float_labels.run(None, _feeds(np.array([0.0, 1.0], np.float32)))
    with pytest.raises(Exception, match="alpha"):
        lort.session(lgm_node_model(onnx.TensorProto.FLOAT, alpha=-1.0))
    with pytest.raises(Exception, match="include_logdet"):
        lort.session(lgm_node_model(onnx.TensorProto.FLOAT, include_logdet=2))


def test_include_logdet_attribute_in_every_mode() -> None:
    """include_logdet=0 in the kernel and in both standard-op forms (int attribute reference in
    the function body) against the reference."""
    model = onnx.load_from_string(lgm_node_model(onnx.TensorProto.FLOAT, include_logdet=0))
    feeds = _feeds(np.array([1, 0, 1], np.int64))
    feeds["log_var"] = np.array([[0.3, -0.2, 0.1], [0.5, 0.4, -0.6]], np.float32)
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    ref = lgm_reference(t["X"], t["means"], t["log_var"], t["labels"], 0.0, False)
    for mode, library in (("custom", True), ("function", False), ("portable", False)):
        proto = finalize(copy_model(model), mode).SerializeToString()
        sess = lort.session(proto) if library else onnxruntime.InferenceSession(proto)
        got = sess.run(None, feeds)
        for a, b in zip(got, ref, strict=True):
            assert max_rel_err(a, b) <= 1e-5, mode


@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "nolabels"])
def test_tight_clusters_keep_loglik_accurate_in_every_mode(with_labels) -> None:
    """Samples 1e-3 from their class means (1 apart): the GEMM expansion alone would give the
    own-class distance with ~50 % error in float32; kernel and standard-op forms both get the
    log-likelihood (the OOD score) right to float32 accuracy."""
    rng = np.random.default_rng(3)
    n, c, d = 64, 4, 3
    means = rng.standard_normal((c, d))
    labels = rng.integers(0, c, n)
    feeds = {
        "X": (means[labels] + 1e-3 * rng.standard_normal((n, d))).astype(np.float32),
        "means": means.astype(np.float32),
        "log_var": np.full((c, d), np.log(1e-6), np.float32),
        "labels": labels,
    }
    model = onnx.load_from_string(lgm_node_model(onnx.TensorProto.FLOAT, alpha=0.5))
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_value = c
    model.graph.input[2].type.tensor_type.shape.dim[0].dim_value = c
    if not with_labels:
        del model.graph.input[3]
        del model.graph.node[0].input[3]
        del feeds["labels"]
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    y = t["labels"] if with_labels else None
    ref = lgm_reference(t["X"], t["means"], t["log_var"], y, 0.5 if with_labels else 0.0, True)
    for mode, library in (("custom", True), ("function", False), ("portable", False)):
        proto = finalize(copy_model(model), mode).SerializeToString()
        sess = lort.session(proto) if library else onnxruntime.InferenceSession(proto)
        logits, loglik = sess.run(None, feeds)
        assert max_rel_err(loglik, ref[1]) <= 1e-5, mode
        assert max_rel_err(logits, ref[0]) <= 1e-5, mode


def test_training_forward_is_refused_by_the_exporter(tmp_path) -> None:
    class Train(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lgm = LGMLoss(3, 2)

        def forward(self, feat: Tensor, target: Tensor) -> Tensor:
            return self.lgm(feat, target)[1]

    with pytest.raises(TrainingOpError, match=r"model\.eval"):
        export_onnx(
            Train().train(), (torch.randn(4, 2), torch.tensor([0, 1, 2, 0])), tmp_path / "t.onnx"
        )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_labels", [False, True], ids=["inference", "labels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_every_mode_in_onnx_reference_evaluator(exported, dtype, with_labels, mode) -> None:
    """The same files in onnx's ReferenceEvaluator (custom mode through ``new_ops``) and ONNX
    Runtime, against the float64 reference."""
    from onnx.reference import ReferenceEvaluator
    from onnx_models import reference_kernels

    net, proto = exported(dtype, False, with_labels)
    gen = torch.Generator().manual_seed(4)
    x = 2.0 * torch.randn(7, 6, generator=gen, dtype=dtype)
    labels = torch.randint(0, 5, (7,), generator=gen)
    y = labels if with_labels else None
    feeds = [x.numpy(), labels.numpy()] if with_labels else [x.numpy()]
    model = finalize(copy_model(proto), mode)
    names = [i.name for i in model.graph.input]
    evaluator = ReferenceEvaluator(model, new_ops=reference_kernels() if mode == "custom" else None)
    got_ref = evaluator.run(None, dict(zip(names, feeds, strict=True)))
    got_ort = _run(proto, mode, feeds, library=mode == "custom")
    with torch.no_grad():
        feat = net.features(x)
        ref = lgm_reference(
            feat, net.lgm.means, net.lgm.effective_log_var(), y, ALPHA if with_labels else 0.0, True
        )
    for i, name in enumerate(("logits", "loglik")):
        assert max_rel_err(got_ref[i], ref[i]) <= TOL[dtype], (name, "ReferenceEvaluator")
        assert max_rel_err(got_ort[i], ref[i]) <= TOL[dtype], (name, "ONNX Runtime")

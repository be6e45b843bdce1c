"""ONNX Runtime library: wrongly typed attributes fail at session creation (never a silent
default), labels are checked even with no classes, a float64 alpha survives ONNX's float32
attributes, and one session per op called from many threads gives the single-threaded results
exactly (docs/reliability.md)."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_models import lgm_node_model
from test_lgm_core import lgm_reference
from test_ort_ops import op_model

from lsoftmax import ort as lort

F32, F64 = TensorProto.FLOAT, TensorProto.DOUBLE


def _with_attribute(model: bytes, attr: onnx.AttributeProto) -> bytes:
    proto = onnx.load_from_string(model)
    proto.graph.node[0].attribute.append(attr)
    return proto.SerializeToString()


WRONG_TYPES = [
    ("LSoftmaxLinear", "lambda", helper.make_attribute("lambda", "5.0"), "a string"),
    ("LSoftmaxLinear", "lambda", helper.make_attribute("lambda", [5.0, 6.0]), "a list of floats"),
    ("LSoftmaxLinear", "lambda", helper.make_attribute("lambda", [5, 6]), "a list of ints"),
    ("LSoftmaxLinear", "margin", helper.make_attribute("margin", "4"), "a string"),
    ("LSoftmaxLinear", "margin", helper.make_attribute("margin", [4, 5]), "a list of ints"),
    ("LGMLogits", "alpha", helper.make_attribute("alpha", "1.0"), "a string"),
    ("LGMLogits", "alpha", helper.make_attribute("alpha", 1), "an int"),
    ("LGMLogits", "alpha_lo", helper.make_attribute("alpha_lo", "0"), "a string"),
    ("LGMLogits", "include_logdet", helper.make_attribute("include_logdet", "0"), "a string"),
    ("LGMLogits", "include_logdet", helper.make_attribute("include_logdet", 0.0), "a float"),
    (
        "LGMLogits",
        "include_logdet",
        helper.make_attribute("include_logdet", onnx.numpy_helper.from_array(np.array(0))),
        "a tensor",
    ),
]


@pytest.mark.parametrize(
    ("op", "name", "attr", "got"), WRONG_TYPES, ids=[f"{o}-{n}-{g}" for o, n, _, g in WRONG_TYPES]
)
def test_wrongly_typed_attribute_fails_at_session_creation(op, name, attr, got) -> None:
    if op == "LSoftmaxLinear":
        base = op_model({} if name == "margin" else {"margin": 2})
    else:
        base = lgm_node_model(F32)
    with pytest.raises(Exception, match=f"{op}: attribute '{name}' must be .*, got {got}"):
        lort.session(_with_attribute(base, attr))


@pytest.mark.parametrize("label_type", [TensorProto.INT64, TensorProto.INT32])
def test_labels_are_checked_with_no_classes(label_type: int) -> None:
    sess = lort.session(op_model({"margin": 2}, c=0, label_type=label_type))
    x = np.ones((3, 6), np.float32)
    w = np.ones((0, 6), np.float32)
    y = np.zeros(3, np.int64 if label_type == TensorProto.INT64 else np.int32)
    with pytest.raises(Exception, match="weight must have at least one class"):
        sess.run(None, {"X": x, "W": w, "labels": y})
    # Without rows there is no label to check, and the output is empty.
    out = sess.run(None, {"X": x[:0], "W": w, "labels": y[:0]})[0]
    assert out.shape == (0, 0)


def test_float64_alpha_is_exact_to_float64_precision(tmp_path) -> None:
    """alpha = 0.3 is not a float32 value: the exporter writes alpha + alpha_lo and the kernel
    and both standard-op forms add them in double (6.5e-7 error before, float32 rounding)."""
    import torch
    from lsoftmax.exporters import export_onnx

    from lsoftmax.torch import LGMLoss

    alpha = 0.3
    torch.manual_seed(0)

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lgm = LGMLoss(4, 3, alpha=alpha, dtype=torch.float64)
            with torch.no_grad():
                self.lgm.means.mul_(8.0)  # distances of tens: an alpha error shows

        def forward(self, x, y):
            return torch.ops.lsoftmax.lgm_logits(
                x, self.lgm.means, self.lgm.effective_log_var(), y, alpha, True
            )

    head = Head().eval()
    x = torch.randn(6, 3, dtype=torch.float64) * 8
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    ref = lgm_reference(
        x, head.lgm.means.detach(), head.lgm.effective_log_var().detach(), y, alpha, True
    )
    for mode in ("custom", "function", "portable"):
        path = tmp_path / f"{mode}.onnx"
        export_onnx(head, (x, y), str(path), mode=mode)
        sess = lort.session(str(path))
        feeds = dict(zip([i.name for i in sess.get_inputs()], [x.numpy(), y.numpy()], strict=True))
        logits = sess.run(None, feeds)[0]
        err = np.abs(logits - ref[0].numpy()).max()
        assert err <= 1e-10 * max(1.0, np.abs(ref[0].numpy()).max()), (mode, err)
        if mode == "function":  # the body alone (no library) adds alpha_lo too
            import onnxruntime

            body = onnxruntime.InferenceSession(str(path)).run(None, feeds)[0]
            assert np.abs(body - ref[0].numpy()).max() <= 1e-10 * np.abs(ref[0].numpy()).max()


# --- concurrency ----------------------------------------------------------------------------

THREADS = 8
ROUNDS = 12


def _hammer(sess, feeds_list: list[dict[str, np.ndarray]]) -> None:
    """Every thread runs every feed (in a thread-specific order) ROUNDS times; each result must
    equal the single-threaded one bit for bit."""
    expected = [sess.run(None, f) for f in feeds_list]
    failures: list[str] = []
    start = threading.Barrier(THREADS)

    def work(t: int) -> None:
        start.wait()
        order = list(range(len(feeds_list)))
        rng = np.random.default_rng(t)
        for _ in range(ROUNDS):
            rng.shuffle(order)
            for i in order:
                got = sess.run(None, feeds_list[i])
                for a, b in zip(got, expected[i], strict=True):
                    if a.shape != b.shape or not np.array_equal(a, b, equal_nan=True):
                        failures.append(f"thread {t} feed {i}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures, failures[:5]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_lsoftmax_linear_session_is_thread_safe(dtype: int) -> None:
    np_t = np.float32 if dtype == F32 else np.float64
    sess = lort.session(op_model({"margin": 4, "lambda": 0.5}, dtype=dtype, d=32, c=20))
    rng = np.random.default_rng(1)
    w = rng.standard_normal((20, 32)).astype(np_t)
    feeds = []
    for n in (1, 3, 17, 64, 200):  # mixed batch sizes: single-row GEMV and GEMM paths
        feeds.append(
            {
                "X": rng.standard_normal((n, 32)).astype(np_t),
                "W": w,
                "labels": rng.integers(0, 20, n).astype(np.int64),
            }
        )
    _hammer(sess, feeds)


@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "nolabels"])
def test_lgm_logits_session_is_thread_safe(with_labels: bool) -> None:
    c, d = 10, 16
    sess = lort.session(
        lgm_node_model(
            F32, c=c, d=d, labels_type=TensorProto.INT64 if with_labels else None, alpha=0.5
        )
    )
    rng = np.random.default_rng(2)
    means = rng.standard_normal((c, d)).astype(np.float32)
    log_var = (0.3 * rng.standard_normal((c, d))).astype(np.float32)
    feeds = []
    for n in (1, 5, 33, 128):
        f = {
            "X": rng.standard_normal((n, d)).astype(np.float32),
            "means": means,
            "log_var": log_var,
        }
        if with_labels:
            f["labels"] = rng.integers(0, c, n).astype(np.int64)
        feeds.append(f)
    _hammer(sess, feeds)

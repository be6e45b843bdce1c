"""``lsoftmax.checkpoint`` and the ``lsoftmax export`` / ``lsoftmax infer`` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lsoftmax.exporters import export_onnx
from onnx_models import MLP, WithLabels, inputs
from reference import max_rel_err

from lsoftmax import checkpoint
from lsoftmax.cli import main

FACTORY = "tests.onnx_models.MLP"


def _factory(**kwargs: Any) -> torch.nn.Module:
    return MLP(**kwargs)


checkpoint.register_factory(FACTORY, _factory)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(3)
    model = MLP(margin=3).eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    extra = {"input_shape": [12], "dtype": "float32", "epoch": 2, "optim": {"lr": torch.ones(2)}}
    checkpoint.save_checkpoint(path, FACTORY, {"margin": 3}, model, extra)
    return path, model


def test_checkpoint_roundtrip(saved: tuple[Path, torch.nn.Module]) -> None:
    path, model = saved
    loaded, meta = checkpoint.load_model(path)
    assert isinstance(loaded, MLP) and not loaded.training and loaded.head.margin == 3
    assert meta["input_shape"] == [12] and meta["dtype"] == "float32"
    assert meta["model_name"] == FACTORY and meta["model_kwargs"] == {"margin": 3}
    assert meta["extra"]["epoch"] == 2 and torch.equal(meta["extra"]["optim"]["lr"], torch.ones(2))
    x, _ = inputs(model, 4, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_checkpoint_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load_model(tmp_path / "missing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        checkpoint.load_model(tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ValueError, match="not a readable lsoftmax checkpoint"):
        checkpoint.load_model(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an lsoftmax checkpoint"):
        checkpoint.load_model(tmp_path / "foreign.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")  # a pickled class: refused
    with pytest.raises(ValueError, match="not a readable lsoftmax checkpoint"):
        checkpoint.load_model(tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="JSON"):
        checkpoint.save_checkpoint(tmp_path / "x.pt", FACTORY, {"m": object()}, MLP(), {})


def test_checkpoint_with_wrong_weights(tmp_path: Path) -> None:
    checkpoint.save_checkpoint(tmp_path / "c.pt", FACTORY, {"feat_dim": 8}, MLP(), {})
    with pytest.raises(ValueError, match="weights do not fit model"):
        checkpoint.load_model(tmp_path / "c.pt")


def test_export_then_infer(
    saved: tuple[Path, torch.nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, model = saved
    onnx_path = tmp_path / "m.onnx"
    assert (
        main(["export", str(path), str(onnx_path), "--mode", "function", "--batch-size", "3"]) == 0
    )
    assert "mode function" in capsys.readouterr().out
    for batch, summary in ((5, "top-1 per row: "), (40, "argmax counts")):
        x, _ = inputs(model, batch, torch.float32, seed=batch)
        np.save(tmp_path / "x.npy", x.numpy())
        out_path = tmp_path / "out.npy"
        assert main(["infer", str(onnx_path), str(tmp_path / "x.npy"), "--out", str(out_path)]) == 0
        printed = capsys.readouterr().out
        assert f"shape ({batch}, 7)" in printed and summary in printed
        with torch.no_grad():
            expected = model(x)
        got = np.load(out_path)
        assert max_rel_err(got, expected) <= 1e-5
        if batch == 5:
            top1 = " ".join(str(int(i)) for i in expected.argmax(dim=1))
            assert f"top-1 per row: {top1}" in printed


def test_infer_with_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    net = WithLabels(model, 4, 0.5)
    x, t = inputs(model, 6, torch.float32)
    export_onnx(net, (x, t), tmp_path / "l.onnx", mode="custom")
    np.save(tmp_path / "x.npy", x.numpy().astype(np.float64))  # cast to the model's float32
    np.save(tmp_path / "t.npy", t.numpy().astype(np.int32))
    args = ["infer", str(tmp_path / "l.onnx"), str(tmp_path / "x.npy")]
    out = str(tmp_path / "o.npy")
    assert main([*args, "--margin-labels", str(tmp_path / "t.npy"), "--out", out]) == 0
    with torch.no_grad():
        assert max_rel_err(np.load(out), net(x, t)) <= 1e-5
    capsys.readouterr()
    assert main(args) == 2  # the labels input is required
    assert "needs --margin-labels" in capsys.readouterr().err


def test_infer_int32_labels_input_does_not_wrap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A graph whose labels input is int32: a cast would turn 2**32 + 3 into 3 (a valid label).
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"]), helper.make_node("Identity", ["L"], ["M"])],
        "int32_labels",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("L", TensorProto.INT32, ["N"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("M", TensorProto.INT32, ["N"])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.ones((3, 3), np.float32))
    args = ["infer", str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"), "--margin-labels"]
    np.save(tmp_path / "ok.npy", np.array([0, 1, 2], np.int64))
    assert main([*args, str(tmp_path / "ok.npy")]) == 0  # in range: cast and run
    capsys.readouterr()
    np.save(tmp_path / "big.npy", np.array([0, 2**32 + 3, 1], np.int64))
    err = _error([*args, str(tmp_path / "big.npy")], capsys)
    assert "4294967299" in err and "int32" in err


def test_infer_labels_give_accuracy(
    saved: tuple[Path, torch.nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, model = saved
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(path), str(onnx_path)]) == 0
    x, _ = inputs(model, 20, torch.float32, seed=7)
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    truth = pred.copy()
    truth[:5] = (truth[:5] + 1) % 7  # 5 of 20 wrong: accuracy 0.75, independent of the model
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", truth)
    capsys.readouterr()
    assert main(["infer", str(onnx_path), str(tmp_path / "x.npy"), "--labels",
                 str(tmp_path / "y.npy")]) == 0
    assert "accuracy 0.7500 (15/20 rows)" in capsys.readouterr().out
    np.save(tmp_path / "short.npy", truth[:3])
    err = _error(["infer", str(onnx_path), str(tmp_path / "x.npy"), "--labels",
                  str(tmp_path / "short.npy")], capsys)
    assert "3 labels for 20 input rows" in err
    np.save(tmp_path / "float.npy", truth.astype(np.float32))
    err = _error(["infer", str(onnx_path), str(tmp_path / "x.npy"), "--labels",
                  str(tmp_path / "float.npy")], capsys)
    assert "--labels must be a 1-D integer array" in err
    np.save(tmp_path / "huge.npy", np.full(20, 2**64 - 1, np.uint64))
    err = _error(["infer", str(onnx_path), str(tmp_path / "x.npy"), "--labels",
                  str(tmp_path / "huge.npy")], capsys)
    assert f"--labels holds {2**64 - 1}, outside the model's 7 classes" in err


def test_infer_out_names_the_file_it_writes(
    saved: tuple[Path, torch.nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, model = saved
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(path), str(onnx_path)]) == 0
    x, _ = inputs(model, 3, torch.float32)
    np.save(tmp_path / "x.npy", x.numpy())
    capsys.readouterr()
    assert main(["infer", str(onnx_path), str(tmp_path / "x.npy"), "--out",
                 str(tmp_path / "logits")]) == 0
    assert f"saved {tmp_path / 'logits.npy'}" in capsys.readouterr().out
    assert np.load(tmp_path / "logits.npy").shape == (3, 7)
    (tmp_path / "d").mkdir()
    err = _error(["infer", str(onnx_path), str(tmp_path / "x.npy"), "--out",
                  str(tmp_path / "d")], capsys)
    assert "is a directory" in err


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_errors_are_one_line(
    saved: tuple[Path, torch.nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = saved
    onnx_path = tmp_path / "p.onnx"
    assert main(["export", str(path), str(onnx_path), "--mode", "portable"]) == 0
    np.save(tmp_path / "x.npy", np.zeros((2, 12), np.float32))
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    x = str(tmp_path / "x.npy")
    assert "does not exist" in _error(["infer", str(tmp_path / "none.onnx"), x], capsys)
    assert "cannot load ONNX model" in _error(["infer", str(tmp_path / "bad.onnx"), x], capsys)
    err = _error(["infer", str(onnx_path), str(tmp_path / "bad.npy")], capsys)
    assert "not a readable .npy" in err
    assert "does not exist" in _error(["infer", str(onnx_path), str(tmp_path / "no.npy")], capsys)
    err = _error(["infer", str(onnx_path), x, "--margin-labels", x], capsys)
    assert "no labels input" in err
    np.save(tmp_path / "wrong.npy", np.zeros((2, 5), np.float32))
    assert "shape" in _error(["infer", str(onnx_path), str(tmp_path / "wrong.npy")], capsys)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        err = _error(["infer", str(onnx_path), x, "--device", "cuda"], capsys)
        assert err.startswith("lsoftmax infer: error: --device cuda:")
    err = _error(["export", str(tmp_path / "bad.pt"), str(tmp_path / "o.onnx")], capsys)
    assert err.startswith("lsoftmax export: error:") and "checkpoint" in err
    err = _error(["export", str(path), str(tmp_path / "o.onnx"), "--opset", "9"], capsys)
    assert "opset" in err

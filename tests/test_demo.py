"""``lsoftmax demo``: train, export, run in ONNX Runtime, compare (a short version)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lsoftmax.cli import main


def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--epochs", "3", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    acc = re.search(r"test accuracy\s+([\d.]+)\s+([\d.]+)", text)
    diff = re.search(r"max \|logit difference\|: ([\d.e+-]+)", text)
    assert acc and diff, text
    acc_torch, acc_ort = float(acc.group(1)), float(acc.group(2))
    assert acc_torch == acc_ort and acc_torch > 0.5  # 3 epochs are plenty for 8x8 digits
    assert float(diff.group(1)) < 1e-3

    # The exported file really is the custom-op model, and ORT with our library reproduces the
    # reloaded checkpoint's logits.
    import onnx

    from lsoftmax import ort
    from lsoftmax.checkpoint import load_model
    from lsoftmax.data import load_digits

    proto = onnx.load(str(out / "model.onnx"))
    assert any(n.domain == "ai.lsoftmax" for n in proto.graph.node)
    model, _ = load_model(out / "run" / "checkpoint.pt")
    x = load_digits().x_test[:32]
    sess = ort.session(out / "model.onnx")
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_demo_bad_margin(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--margin", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lsoftmax demo: error: --margin must be an integer >= 1, got 0"

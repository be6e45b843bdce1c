"""``lsoftmax train --nproc 2``: a DDP backbone and a class-sharded head on 2 gloo processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lsoftmax.cli import main

TINY = ["--dataset", "digits", "--limit", "512", "--batch-size", "64", "--no-progress"]
TINY += ["--threads", "1", "--schedule", "constant", "--lambda", "2", "--margin", "2"]


def test_train_nproc_2(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "3", "--nproc", "2", "--out", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["nproc"] == 2 and cfg["margin"] == 2
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert [m["step"] for m in metrics] == [8, 16, 24]  # 512 / 64 global batches per epoch
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    final = json.loads((run / "final.json").read_text())
    assert final["test_acc"] > 0.5  # 10 classes: chance is 0.1
    head = torch.load(run / "head.pt", weights_only=True)
    assert tuple(head["weight"].shape) == (10, 32) and int(head["step"]) == 24
    body = torch.load(run / "body.pt", weights_only=True)
    assert not any(k.startswith("head.") for k in body)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--nproc", "0"], "--nproc must be >= 1, got 0"),
        (["--nproc", "2", "--sample-rate", "0"], "sample_rate must be in (0, 1], got 0.0"),
        (["--nproc", "2", "--loss", "lgm"], "no --resume, no --loss lgm"),
    ],
)
def test_nproc_errors_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["train", *TINY, *extra, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err

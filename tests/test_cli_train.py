"""``lsoftmax train`` end to end on tiny configurations: files, resume, datasets, errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_data import make_idx_dir

from lsoftmax.checkpoint import load_model
from lsoftmax.cli import main
from lsoftmax.schedules import Exponential

TINY = ["--dataset", "digits", "--limit", "192", "--batch-size", "64", "--no-progress"]
TINY += ["--threads", "1"]
# A schedule that moves a lot within a few steps, so resume mistakes show in lambda.
FAST = ["--schedule", "exponential", "--base", "100", "--gamma", "0.2", "--power", "3"]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", *TINY, *FAST, "--margin", "2", "--epochs", "2", "--out", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["margin"] == 2 and cfg["schedule"]["kind"] == "exponential"
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert [m["step"] for m in metrics] == [3, 6]  # 192 samples / 64 per batch
    sched = Exponential(base=100, gamma=0.2, power=3)
    assert metrics[1]["lambda_first"] == pytest.approx(sched.value(3))
    assert metrics[1]["lambda_last"] == pytest.approx(sched.value(5))
    final = json.loads((run / "final.json").read_text())
    assert final["test_acc"] == pytest.approx(metrics[-1]["test_acc"])
    assert 0.0 <= final["test_acc"] <= 1.0
    model, meta = load_model(run / "checkpoint.pt")
    assert meta["input_shape"] == [1, 8, 8] and meta["dtype"] == "float32"
    assert meta["epoch"] == 2 and meta["config"]["margin"] == 2 and "optimizer" in meta
    assert model.step == 6 and model.head.margin == 2


def test_resume_continues_the_lambda_sequence(tmp_path: Path) -> None:
    common = [*TINY, *FAST, "--margin", "4", "--milestones", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", *common, "--epochs", "3", "--out", str(full)]) == 0
    assert main(["train", *common, "--epochs", "1", "--out", str(part)]) == 0
    resume = ["train", "--resume", str(part / "checkpoint.pt"), "--epochs", "3", "--no-progress"]
    assert main([*resume, "--out", str(part)]) == 0
    a, b = read_metrics(full), read_metrics(part)
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b, strict=True):
        for key in ("epoch", "step", "lr", "lambda_first", "lambda_last"):
            assert ra[key] == rb[key], key
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
    assert a[2]["lr"] == pytest.approx(0.01)  # the milestone survived the resume
    ma, _ = load_model(full / "checkpoint.pt")
    mb, _ = load_model(part / "checkpoint.pt")
    assert ma.step == mb.step == 9
    for (k, x), (_, y) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=k)


def test_train_idx_dataset_with_conv_net(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "fmnist", n_train=48, n_test=16, gz=True)
    run = tmp_path / "run"
    args = ["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "fmnist")]
    args += ["--model", "mnist_net", "--width", "4", "--convs-per-stage", "1", "--feat-dim", "8"]
    args += ["--epochs", "1", "--batch-size", "16", "--margin", "1", "--no-progress"]
    assert main([*args, "--out", str(run)]) == 0
    model, meta = load_model(run / "checkpoint.pt")
    assert meta["input_shape"] == [1, 28, 28] and model.step == 3


def test_train_lgm(tmp_path: Path) -> None:
    run = tmp_path / "lgm"
    args = ["train", *TINY, "--loss", "lgm", "--alpha", "0.2", "--feat-dim", "2", "--epochs", "1"]
    assert main([*args, "--out", str(run)]) == 0
    model, meta = load_model(run / "checkpoint.pt")
    assert model.head_kind == "lgm" and model.head.means.shape == (10, 2)
    assert meta["config"]["lgm"]["alpha"] == 0.2
    assert read_metrics(run)[0]["lambda_last"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "imagenet"], "unknown --dataset 'imagenet'"),
        (["--margin", "0"], "--margin must be an integer in [1, 2^20]"),
        (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fm"], "apt-get install"),
        (["--schedule", "cosine"], "schedule must be onset, exponential, scaled or constant"),
        (["--schedule", "exponential", "--gamma", "-1"], "gamma"),
        (["--resume", "/nonexistent/checkpoint.pt"], "no such checkpoint"),
        (["--loss", "focal"], "--loss"),
        (["--limit", "0"], "limit"),
    ],
)
def test_bad_arguments_exit_nonzero_with_one_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *args, "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lsoftmax train: error:") and message in err
    assert len(err.splitlines()) == 1


def test_corrupt_checkpoint_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"this is not a checkpoint")
    assert main(["train", "--resume", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a readable lsoftmax checkpoint" in err and len(err.splitlines()) == 1


def test_subprocess_train_and_bad_dataset(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = tmp_path / "sub"
    ok = subprocess.run(
        [sys.executable, "-m", "lsoftmax", "train", *TINY, "--epochs", "1", "--out", str(run)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "test accuracy" in ok.stdout and (run / "checkpoint.pt").is_file()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "lsoftmax",
            "train",
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert "dataset-fashion-mnist" in bad.stderr


def test_lgm_guard_when_head_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import lsoftmax.models

    monkeypatch.setattr(lsoftmax.models, "lgm_available", lambda: False)
    assert main(["train", *TINY, "--loss", "lgm", "--out", str(tmp_path)]) == 2
    assert "needs lsoftmax.torch.LGMLoss" in capsys.readouterr().err


def test_resume_without_out_writes_into_the_checkpoint_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where a default runs/latest would go
    run = tmp_path / "a"
    assert main(["train", *TINY, *FAST, "--epochs", "1", "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run / "checkpoint.pt"), "--epochs", "2"]) == 0
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]
    assert json.loads((run / "final.json").read_text())["epochs"] == 2
    assert not (tmp_path / "runs").exists()


def test_new_run_into_an_existing_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "r"
    assert main(["train", *TINY, "--margin", "2", "--epochs", "2", "--out", str(run)]) == 0
    before = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", *TINY, "--margin", "3", "--epochs", "1", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err
    assert (run / "checkpoint.pt").read_bytes() == before  # untouched
    args = ["train", *TINY, "--margin", "3", "--epochs", "1", "--out", str(run), "--overwrite"]
    assert main(args) == 0
    assert [m["epoch"] for m in read_metrics(run)] == [1]
    assert json.loads((run / "config.json").read_text())["margin"] == 3
    assert json.loads((run / "final.json").read_text())["epochs"] == 1
    # An empty directory is not a run: no --overwrite needed.
    (tmp_path / "empty").mkdir()
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "empty")]) == 0


def test_resume_into_another_directory_carries_the_metrics(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *TINY, *FAST, "--epochs", "1", "--out", str(a)]) == 0
    args = ["train", "--resume", str(a / "checkpoint.pt"), "--epochs", "2", "--no-progress"]
    assert main([*args, "--out", str(b)]) == 0
    assert [m["epoch"] for m in read_metrics(b)] == [1, 2]
    assert [m["epoch"] for m in read_metrics(a)] == [1]  # the source run is left as it was
    assert main([*args, "--out", str(b)]) == 2  # b holds a run now


def _interrupt_during_save(monkeypatch: pytest.MonkeyPatch, at_epoch: int) -> None:
    """Make the checkpoint save of ``at_epoch`` receive a real SIGINT halfway through writing."""
    import signal

    import lsoftmax.checkpoint

    real = lsoftmax.checkpoint.save_checkpoint

    def save(path: Path, *args: object, **kwargs: object) -> None:
        if args[-1]["epoch"] == at_epoch:  # type: ignore[index]
            Path(path).write_bytes(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGINT)
        real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(lsoftmax.checkpoint, "save_checkpoint", save)


def test_sigint_during_save_leaves_a_consistent_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, full = tmp_path / "run", tmp_path / "full"
    common = [*TINY, *FAST, "--margin", "2"]
    assert main(["train", *common, "--epochs", "3", "--out", str(full)]) == 0
    _interrupt_during_save(monkeypatch, at_epoch=2)
    # Ctrl-C in a terminal reaches Python's default handler; pytest-xdist's workers ignore
    # SIGINT (SIG_IGN), which the CLI rightly keeps ignoring, so install the default here.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["train", *common, "--epochs", "3", "--out", str(run)]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    # The save finished before the interrupt took effect: epoch 2 is complete on disk.
    assert not (run / "checkpoint.pt.tmp").exists()
    _, meta = load_model(run / "checkpoint.pt")
    assert meta["epoch"] == 2
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]
    assert main(["train", "--resume", str(run / "checkpoint.pt"), "--no-progress"]) == 0
    got, want = read_metrics(run), read_metrics(full)
    assert [m["epoch"] for m in got] == [1, 2, 3]  # no duplicated epoch
    for a, b in zip(got, want, strict=True):
        assert (a["step"], a["lambda_last"]) == (b["step"], b["lambda_last"])


def test_resume_drops_a_metrics_line_the_checkpoint_lacks(tmp_path: Path) -> None:
    # What a kill between the metrics line and the checkpoint would leave: metrics one ahead,
    # a stale .tmp and a half-written last line.
    run = tmp_path / "run"
    assert main(["train", *TINY, *FAST, "--epochs", "2", "--out", str(run)]) == 0
    first = read_metrics(run)[0]
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**first, "epoch": 3}) + "\n" + '{"epoch": 4, "st')
    (run / "checkpoint.pt.tmp").write_bytes(b"partial")
    assert main(["train", "--resume", str(run / "checkpoint.pt"), "--epochs", "3"]) == 0
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3]
    assert read_metrics(run)[2]["step"] == 9
    assert not (run / "checkpoint.pt.tmp").exists()



@pytest.mark.parametrize("head", [["--loss", "lgm"], ["--margin", "1"]])
def test_feat2d_net_trains_at_the_default_lr(head: list[str], tmp_path: Path) -> None:
    # At lr 0.1 both blew up in epoch 1 (L-GM: "log_var[0, 1] is not finite"; softmax: NaN).
    run = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--model", "feat2d_net", *head, "--epochs", "1"]
    assert main([*args, "--threads", "1", "--no-progress", "--out", str(run)]) == 0
    (metrics,) = read_metrics(run)
    assert metrics["lr"] == 0.01 and json.loads((run / "config.json").read_text())["lr"] == 0.01
    assert math.isfinite(metrics["train_loss"]) and metrics["test_acc"] > 0.15  # chance: 0.1

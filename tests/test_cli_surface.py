"""The CLI surface: ``--version``, defaults in ``--help``, ``--device``, one provider spelling,
``export --opset`` out of range."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from conftest import ROOT

import lsoftmax
from lsoftmax.cli import main


def test_version_matches_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert capsys.readouterr().out.strip() == f"lsoftmax {project['version']}"
    assert lsoftmax.__version__ == project["version"]


@pytest.mark.parametrize(
    ("command", "options"),
    [
        (["train"], {"--lr": "0.1", "--batch-size": "128", "--momentum": "0.9",
                     "--weight-decay": "0.0005", "--device": "cpu", "--seed": "0"}),
        (["infer"], {"--device": "cpu"}),
        (["export"], {"--mode": "function", "--batch-size": "2"}),
    ],
)  # fmt: skip
def test_help_shows_defaults(
    command: list[str], options: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    for option, default in options.items():
        # The option's help entry runs from its name to the next option's.
        entry = text[text.index(f"  {option}") :].split("\n  -")[0]
        assert f"(default: {default}" in " ".join(entry.split()), (option, entry)


def test_train_device_cuda_without_a_gpu_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    run = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--epochs", "1", "--device", "cuda"]
    assert main([*args, "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lsoftmax train: error: --device cuda: CUDA is not available")
    assert len(err.splitlines()) == 1
    assert not run.exists()  # nothing was written: the check came first


def test_demo_device_cuda_without_a_gpu_fails_first(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    assert main(["demo", "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert "--device cuda: CUDA is not available" in captured.err
    assert "training" not in captured.out  # it stopped before training


def test_device_rejects_unknown_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--device", "tpu"])
    assert e.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


def test_old_provider_spelling_is_a_deprecated_alias(capsys: pytest.CaptureFixture[str]) -> None:
    from lsoftmax.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["infer", "m.onnx", "x.npy", "--provider", "cpu"])
    assert args.device == "cpu"
    assert "--provider is deprecated; use --device cpu" in capsys.readouterr().err
    args = parser.parse_args(["infer", "m.onnx", "x.npy", "--device", "cuda"])
    assert args.device == "cuda"
    args = parser.parse_args(["demo", "--providers", "cuda"])
    assert args.device == "cuda"
    assert "--providers is deprecated; use --device cuda" in capsys.readouterr().err


def test_export_opset_out_of_range_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    train = ["train", "--dataset", "digits", "--limit", "64", "--epochs", "1", "--no-progress"]
    assert main([*train, "--out", str(run)]) == 0
    capsys.readouterr()
    out = tmp_path / "m.onnx"
    for opset in ("99", "17"):
        assert main(["export", str(run / "checkpoint.pt"), str(out), "--opset", opset]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lsoftmax export: error: --opset must be between 18 and")
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    assert main(["export", str(run / "checkpoint.pt"), str(out), "--opset", "19"]) == 0
    assert "opset 19" in capsys.readouterr().out and out.is_file()


def test_subprocess_version_and_exit_status() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lsoftmax", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.startswith("lsoftmax ")

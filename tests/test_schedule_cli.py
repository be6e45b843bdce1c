"""The length-aware onset schedule through ``lsoftmax train``: resolved to the run's length."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lsoftmax.cli import main
from lsoftmax.schedules import Onset, schedule_from_dict
from lsoftmax.train import resolve_schedule, steps_per_epoch

TINY = ["--dataset", "digits", "--limit", "200", "--batch-size", "64", "--no-progress"]
TINY += ["--threads", "1", "--margin", "2"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("epochs", [2, 6])
def test_onset_follows_the_run_length(tmp_path: Path, epochs: int) -> None:
    run = tmp_path / f"e{epochs}"
    args = ["--schedule", "onset", "--reach", "2", "--at", "0.5", "--warmup", "0.25"]
    args += ["--lambda-min", "0"]
    assert main(["train", *TINY, *args, "--epochs", str(epochs), "--out", str(run)]) == 0
    total = epochs * 4  # 200 samples in batches of 64: 4 steps per epoch
    sched = json.loads((run / "config.json").read_text())["schedule"]
    assert sched == {
        "kind": "onset",
        "total_steps": total,
        "reach": 2.0,
        "at": 0.5,
        "warmup": 0.25,
        "base": 1000.0,
        "lambda_min": 0.0,
    }
    want = Onset(total, reach=2.0, at=0.5, warmup=0.25, lambda_min=0.0)
    metrics = _metrics(run)
    for m in metrics:
        assert m["lambda_first"] == want.value(m["step"] - 4)
        assert m["lambda_last"] == want.value(m["step"] - 1)
    # Softmax through the first quarter of the run; lambda 2 exactly at the half.
    assert metrics[0]["lambda_first"] == 1000.0
    assert want.value(total // 2) == pytest.approx(2.0, rel=1e-12)


def test_the_default_schedule_is_the_onset_one(tmp_path: Path) -> None:
    run = tmp_path / "default"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 0
    sched = json.loads((run / "config.json").read_text())["schedule"]
    assert sched["kind"] == "onset" and sched["total_steps"] == 4
    assert schedule_from_dict(sched) == Onset(4)


def test_resolve_schedule_only_fills_a_missing_length() -> None:
    d = Onset(10).to_dict()
    assert resolve_schedule(d, 99) == d
    assert resolve_schedule({**d, "total_steps": None}, 99)["total_steps"] == 99
    exp = {"kind": "exponential", "base": 1.0}
    assert resolve_schedule(exp, 99) is exp
    assert steps_per_epoch(200, 64) == 4 and steps_per_epoch(192, 64) == 3


def test_onset_errors_name_the_option(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = ["--schedule", "onset", "--at", "2"]
    assert main(["train", *TINY, *bad, "--epochs", "1", "--out", str(tmp_path / "x")]) == 2
    assert "at must be a fraction" in capsys.readouterr().err


def test_an_option_of_another_schedule_is_an_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # --gamma belongs to the exponential schedule: with the default (onset) it would be ignored.
    assert main(["train", *TINY, "--gamma", "1e-3", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "lsoftmax train: error: --gamma does not apply to the onset schedule "
        "(it takes --reach, --at, --warmup, --base, --lambda-min)"
    )
    assert not (tmp_path / "x").exists()

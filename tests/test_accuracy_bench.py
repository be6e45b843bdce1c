"""Feature-quality measures against hand-computed values, and the accuracy benchmark end to end
on its smoke recipe (digits, seconds)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from lsoftmax.feature_quality import angular_stats, nearest_neighbour_accuracy, tar_at_far

BENCH = ROOT / "benchmarks" / "accuracy.py"


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_angular_stats_on_known_angles() -> None:
    # Class 0 at 0 deg +- 10 deg, class 1 at 90 deg +- 20 deg, class 2 at 180 deg exactly; norms
    # vary (the measures use directions only).
    f = np.array([_unit(-10), _unit(10), _unit(70), _unit(110), _unit(180), _unit(180)])
    f *= np.array([[1.0], [3.0], [0.5], [2.0], [7.0], [1.0]])
    stats = angular_stats(f, np.array([0, 0, 1, 1, 2, 2]))
    assert stats["intra"] == pytest.approx((10 + 10 + 20 + 20 + 0 + 0) / 6, rel=1e-12)
    assert stats["inter"] == pytest.approx((90 + 180 + 90) / 3, rel=1e-12)
    assert stats["inter_min"] == pytest.approx(90, rel=1e-12)


def test_nearest_neighbour_is_leave_one_out_cosine() -> None:
    # Directions only: the long vector at 0 deg is the nearest neighbour of the one at -5 deg.
    f = np.array([np.multiply(40, _unit(0)), _unit(60), _unit(50), _unit(-5)])
    y = np.array([0, 1, 0, 0])
    # 0 -> nearest is 3 (ok), 1 -> 2 (wrong), 2 -> 1 (wrong), 3 -> 0 (ok)
    assert nearest_neighbour_accuracy(f, y) == 0.5


def test_tar_at_far_counts_pairs() -> None:
    # Two tight classes far apart: every same-class pair beats every different-class pair.
    f = np.array([_unit(0), _unit(1), _unit(2), _unit(90), _unit(91), _unit(92)])
    y = np.array([0, 0, 0, 1, 1, 1])
    assert tar_at_far(f, y, 0.1) == 1.0
    # One class spread over 120 deg: its widest pair (0 vs 120) falls below the 9 negatives'
    # threshold at FAR 0.2 (the 2nd largest negative similarity, cos 30 deg).
    g = np.array([_unit(0), _unit(60), _unit(120), _unit(90), _unit(95), _unit(85)])
    h = np.array([0, 0, 0, 1, 1, 1])
    iu = np.triu_indices(6, k=1)
    sim = (g @ g.T)[iu]
    same = (h[:, None] == h[None, :])[iu]
    neg = np.sort(sim[~same])
    threshold = neg[len(neg) - 1 - int(0.2 * len(neg))]
    assert tar_at_far(g, h, 0.2) == pytest.approx(float((sim[same] > threshold).mean()))
    assert 0.0 < tar_at_far(g, h, 0.2) < 1.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: angular_stats(np.zeros((3, 2)), np.array([0, 1, 1])), "nonzero"),
        (lambda: angular_stats(np.ones((3, 2)), np.array([0, 0, 0])), "two classes"),
        (lambda: angular_stats(np.ones((3, 2)), np.array([0, 1])), "labels must have shape"),
        (lambda: tar_at_far(np.ones((3, 2)), np.array([0, 1, 1]), 1.5), "far must be"),
        (lambda: tar_at_far(np.eye(3), np.array([0, 0, 0]), 0.1), "different-class pairs"),
        (lambda: nearest_neighbour_accuracy(np.ones((1, 2)), np.array([0])), "N >= 2"),
    ],
)
def test_bad_inputs_name_the_problem(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def _bench():
    spec = importlib.util.spec_from_file_location("accuracy_bench", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_smoke_recipe_and_rescore(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    out = tmp_path / "acc"
    assert bench.main(["--recipe", "smoke", "--out", str(out)]) == 0
    info = json.loads((out / "results.json").read_text())
    rows = info["results"]
    assert [(r["margin"], r["seed"]) for r in rows] == [(1, 0), (2, 0)]
    for r in rows:
        final = json.loads((out / f"m{r['margin']}_s0" / "final.json").read_text())
        assert r["test_error"] == final["test_error"] and r["final_lambda"] == final["lambda"]
        assert 0 < r["angle_intra"] < 90 and 0 < r["angle_inter"] <= 180
        assert 0.0 <= r["openset_1nn"] <= 1.0 and 0.0 <= r["openset_tar"] <= 1.0
    # Lambda is reported (here the margin run really left softmax) and the schedule was
    # resolved to the run's length: 2 epochs of 8 classes' digits.
    assert rows[1]["final_lambda"] < 1e-3
    cfg = json.loads((out / "m2_s0" / "config.json").read_text())
    assert cfg["schedule"]["total_steps"] == rows[1]["steps"]
    text = capsys.readouterr().out
    assert "| 2 | 0 |" in text and "unseen 1-NN" in text
    # --score recomputes the same table from the checkpoints.
    assert bench.main(["--recipe", "smoke", "--score", str(out / "m1_s0"), str(out / "m2_s0")]) == 0
    again = capsys.readouterr().out
    assert text.split("\n| margin | seed |")[1].split("\n\n")[0] in again
    # --diagnose reads the same runs: one row each, the softmax run's cut at --cut's margin.
    runs = [str(out / "m1_s0"), str(out / "m2_s0")]
    argv = ["--recipe", "smoke", "--diagnose", *runs, "--cut", "2", "5", "--diag-samples", "50"]
    assert bench.main(argv) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 4 and "(2, 5)" in table[2] and f"| {runs[1]} | 2 |" in table[3]


class _Identity(torch.nn.Module):
    """A model whose features are its inputs and whose head is a bias-free linear layer."""

    def __init__(self, weight: list[list[float]]) -> None:
        super().__init__()
        self.head = torch.nn.Linear(2, len(weight), bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(weight))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_margin_cut_against_hand_computed_values() -> None:
    bench = _bench()
    # Class 0's weight along the x axis (norm 2), class 1's along y (norm 1); two class-0
    # features of norm 3 at 30 degrees and one at 60 degrees, whose best other logit is class 1.
    model = _Identity([[2.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([_unit(30.0), _unit(30.0), _unit(60.0)]) * 3.0
    y = torch.tensor([0, 0, 0])
    r = bench.margin_cut(model, x, y, margin=2, lam=1.0)
    # m = 2, theta < 90 deg: psi = cos(2 theta); the cut is |x||w| (cos - psi) / (1 + lambda).
    cuts = [
        6 * (math.cos(math.radians(t)) - math.cos(math.radians(2 * t))) / 2 for t in (30, 30, 60)
    ]
    gaps = [6 * math.cos(math.radians(t)) - 3 * math.sin(math.radians(t)) for t in (30, 30, 60)]
    assert r["cut"] == pytest.approx(cuts[0]) and r["gap"] == pytest.approx(gaps[0])
    assert r["feat_norm"] == pytest.approx(3.0) and r["weight_norm"] == pytest.approx(2.0)
    assert r["target_angle"] == pytest.approx(30.0)
    assert r["train_acc_plain"] == pytest.approx(sum(g > 0 for g in gaps) / 3)
    meets_margin = [g - c > 0 for g, c in zip(gaps, cuts, strict=True)]
    assert r["train_acc_margin"] == pytest.approx(sum(meets_margin) / 3)
    assert r["train_acc_margin"] < r["train_acc_plain"]  # the 60-degree row fails the margin


def test_benchmark_rejects_an_option_of_another_schedule(tmp_path: Path) -> None:
    bench = _bench()
    with pytest.raises(SystemExit, match="--gamma does not apply"):
        bench.recipe_of(bench.parse_args(["--recipe", "fmnist", "--gamma", "1e-3"]))
    with pytest.raises(SystemExit, match="held-out"):
        bench.main(["--recipe", "smoke", "--held-out", "3", "3", "--out", str(tmp_path)])


def test_recipe_weight_decay_and_its_override() -> None:
    bench = _bench()
    assert bench.recipe_of(bench.parse_args(["--recipe", "fmnist"]))["weight_decay"] == 5e-4
    long = bench.recipe_of(bench.parse_args(["--recipe", "fmnist-long"]))
    assert (long["weight_decay"], long["epochs"], long["milestones"]) == (5e-5, 16, [10, 14])
    over = bench.parse_args(["--recipe", "fmnist-long", "--weight-decay", "1e-4"])
    assert bench.recipe_of(over)["weight_decay"] == 1e-4

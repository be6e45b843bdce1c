"""``lsoftmax plot features|schedule|curves``: PNGs that exist, decode and have content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lsoftmax.cli import main
from lsoftmax.plots import plot_features

TINY = ["--dataset", "digits", "--limit", "256", "--batch-size", "64", "--no-progress"]
TINY += ["--threads", "1"]


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
    # Not a blank canvas: a plot has many distinct colours.
    assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 20


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {"ls2d": root / "ls2d", "lgm": root / "lgm", "wide": root / "wide"}
    base = ["train", *TINY, "--epochs", "2"]
    assert main([*base, "--feat-dim", "2", "--margin", "2", "--out", str(out["ls2d"])]) == 0
    assert main([*base, "--feat-dim", "2", "--loss", "lgm", "--out", str(out["lgm"])]) == 0
    assert main([*base, "--feat-dim", "8", "--out", str(out["wide"])]) == 0
    return out


def test_plot_schedule(tmp_path: Path) -> None:
    png = tmp_path / "sched.png"
    args = ["plot", "schedule", "--schedule", "exponential", "--base", "1000", "--gamma", "1e-3"]
    assert main([*args, "--iters", "1000", "-o", str(png)]) == 0
    assert_png(png)
    scaled = tmp_path / "scaled.png"
    assert (
        main(["plot", "schedule", "--schedule", "scaled", "--iters", "50", "-o", str(scaled)]) == 0
    )
    assert_png(scaled)


def test_plot_curves(runs: dict[str, Path]) -> None:
    assert main(["plot", "curves", str(runs["ls2d"])]) == 0
    assert_png(runs["ls2d"] / "curves.png")


def test_plot_features_lsoftmax_and_lgm(runs: dict[str, Path], tmp_path: Path) -> None:
    assert main(["plot", "features", str(runs["ls2d"])]) == 0
    assert_png(runs["ls2d"] / "features.png")
    png = tmp_path / "lgm.png"
    assert main(["plot", "features", str(runs["lgm"] / "checkpoint.pt"), "-o", str(png)]) == 0
    assert_png(png)


def test_plot_features_draws_lgm_ellipses(tmp_path: Path) -> None:
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg", force=True)
    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(60, 2)), np.arange(60) % 3
    means, variances = rng.normal(size=(3, 2)), np.array([[1.0, 4.0], [0.25, 0.25], [2.0, 1.0]])
    captured = {}
    original = plt.close

    def keep(fig):  # inspect the figure before plot_features closes it
        captured["fig"] = fig
        return original(fig)

    plt.close = keep
    try:
        plot_features(feats, labels, tmp_path / "f.png", means=means, variances=variances)
    finally:
        plt.close = original
    ellipses = captured["fig"].axes[0].patches
    assert len(ellipses) == 3
    np.testing.assert_allclose(
        [(e.width, e.height) for e in ellipses], 2 * np.sqrt(variances), rtol=1e-12
    )
    np.testing.assert_allclose([e.center for e in ellipses], means, rtol=1e-12)
    assert_png(tmp_path / "f.png")


def test_plot_errors(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plot", "features", str(runs["wide"])]) == 2
    assert "not 2" in capsys.readouterr().err
    assert main(["plot", "curves", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "metrics.jsonl" in err and len(err.splitlines()) == 1
    assert main(["plot", "schedule", "--iters", "0", "-o", str(tmp_path / "x.png")]) == 2
    assert "iters" in capsys.readouterr().err
    with pytest.raises(ValueError, match="features must be"):
        plot_features(np.zeros((4, 3)), np.zeros(4, int), tmp_path / "y.png")


def _capture_figure(monkeypatch: pytest.MonkeyPatch) -> dict:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    captured: dict = {}
    original = plt.close

    def keep(fig):  # inspect the figure before the plot function closes it
        captured["fig"] = fig
        return original(fig)

    monkeypatch.setattr(plt, "close", keep)
    return captured


def test_plot_features_side_by_side(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import torch

    from lsoftmax.checkpoint import load_model
    from lsoftmax.data import load_digits

    captured = _capture_figure(monkeypatch)
    png = tmp_path / "both.png"
    assert main(["plot", "features", str(runs["ls2d"]), str(runs["lgm"]), "-o", str(png)]) == 0
    assert_png(png)
    panels = [ax for ax in captured["fig"].axes if ax.get_visible()]
    assert len(panels) == 2
    for ax in panels:
        assert ax.get_xlabel() == "feature 1" and ax.get_ylabel() == "feature 2"
    # Each panel's title states its loss and its test accuracy, recomputed here independently.
    model, _ = load_model(runs["ls2d"] / "checkpoint.pt")
    ds = load_digits()
    with torch.no_grad():
        acc = float((model.eval()(ds.x_test).argmax(1) == ds.y_test).double().mean())
    assert "L-Softmax m=2" in panels[0].get_title()
    assert f"accuracy {acc:.4f}" in panels[0].get_title()
    assert "L-GM" in panels[1].get_title()
    cfg = json.loads((runs["lgm"] / "config.json").read_text())
    assert cfg["loss"] == "lgm"


def test_plot_curves_overlays_runs_with_the_lr(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lsoftmax.plots import read_metrics

    captured = _capture_figure(monkeypatch)
    png = tmp_path / "curves.png"
    assert main(["plot", "curves", str(runs["ls2d"]), str(runs["wide"]), "-o", str(png)]) == 0
    assert_png(png)
    axes = {ax.get_ylabel(): ax for ax in captured["fig"].axes}
    lr_ax = axes["learning rate"]
    lines = lr_ax.get_lines()
    assert len(lines) == 2  # one LR line per run
    assert list(lines[0].get_ydata()) == [r["lr"] for r in read_metrics(runs["ls2d"])]
    acc_ax = next(ax for label, ax in axes.items() if label.startswith("accuracy"))
    legend = [t.get_text() for t in acc_ax.get_legend().get_texts()]
    assert legend == ["ls2d: L-Softmax m=2", "wide: L-Softmax m=4"]

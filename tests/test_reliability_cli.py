"""CLI arguments are checked before any data or model is loaded, with messages naming the flag
(docs/reliability.md)."""

from __future__ import annotations

import re

import pytest

from lsoftmax.cli import main


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--margin", "2000000"], r"--margin must be an integer in \[1, 2\^20\], got 2000000"),
        (["--margin", "0"], r"--margin must be an integer in \[1, 2\^20\], got 0"),
        (["--model", "mlp", "--hidden", "16", "0"], "--hidden must be >= 1, got 0"),
        (["--width", "0"], "--width must be >= 1, got 0"),
        (["--feat-dim", "-2"], "--feat-dim must be >= 1, got -2"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ],
)
def test_train_rejects_bad_sizes_before_loading_data(tmp_path, capsys, argv, needle) -> None:
    # The data directory does not exist: reaching the loader would give another error.
    missing = tmp_path / "no-data"
    base = ["train", "--dataset", "mnist", "--data-dir", str(missing)]
    code = main([*base, "--out", str(tmp_path / "r"), *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(needle, err), err
    assert not missing.exists() and not (tmp_path / "r").exists()


def test_plot_rejects_bad_max_points_before_loading(tmp_path, capsys) -> None:
    # The run directory does not exist: reaching the checkpoint loader would give another error.
    code = main(["plot", "features", str(tmp_path / "no-run"), "--max-points", "-1"])
    assert code == 2
    assert "--max-points must be >= 1, got -1" in capsys.readouterr().err


def test_plot_feature_panels_rejects_bad_max_points(tmp_path) -> None:
    import numpy as np

    from lsoftmax.plots import FeaturePanel, plot_feature_panels

    panel = FeaturePanel(np.zeros((3, 2)), np.array([0, 1, 1]), "t")
    with pytest.raises(ValueError, match="max_points must be an integer >= 1, got 0"):
        plot_feature_panels([panel], tmp_path / "f.png", max_points=0)

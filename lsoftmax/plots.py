"""PNG plots (matplotlib, Agg backend): 2-D feature scatter, lambda schedule, training curves."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_curves", "plot_features", "plot_schedule", "read_metrics"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_schedule(schedule: Any, iters: int, path: str | Path, *, log_scale: bool = True) -> Path:
    """Lambda over training iterations ``0..iters-1`` for a :class:`lsoftmax.schedules.Schedule`."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    plt = _pyplot()
    # Sample at most ~2000 points: the schedule is smooth, and the core call is per step.
    steps = np.unique(np.linspace(0, iters - 1, min(iters, 2000)).astype(np.int64))
    values = np.array([schedule.value(int(s)) for s in steps])
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot(steps, values, lw=1.8)
    positive = values > 0
    if log_scale and positive.any():
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(values[positive].min() * 0.5, 1e-12))
    for target in (1.0, 0.1):
        hit = np.nonzero(values <= target)[0]
        if len(hit):
            ax.axvline(steps[hit[0]], color="gray", ls=":", lw=1)
            ax.annotate(
                f"λ≤{target:g} at {steps[hit[0]]}",
                (steps[hit[0]], target),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    params = ", ".join(
        f"{k}={v:g}"
        for k, v in schedule.to_dict().items()
        if k != "kind" and not (k == "iteration" and v == 0)
    )
    ax.set_title(f"{schedule.kind} lambda schedule\n{params}", fontsize=9)
    ax.set_xlabel("training iteration")
    ax.set_ylabel("lambda")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, plt)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: is {run_dir} a run directory of lsoftmax train?"
        )
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from e
    if not records:
        raise ValueError(f"{path} has no records")
    return records


def plot_curves(run_dir: str | Path, path: str | Path) -> Path:
    """Loss and accuracy (train and test) per epoch, and lambda, from ``metrics.jsonl``."""
    records = read_metrics(run_dir)
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    has_lambda = any(r.get("lambda_last") is not None for r in records)
    ncols = 3 if has_lambda else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4 * ncols, 3.4), dpi=100)
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in records], "o-", label="train (margin logits)")
        ax.plot(epochs, [r[f"test_{key}"] for r in records], "s-", label="test")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if has_lambda:
        ax = axes[2]
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["lambda_last"] for r in records], "o-")
        if all((r.get("lambda_last") or 0) > 0 for r in records):
            ax.set_yscale("log")
        ax.set_xlabel("iteration (end of epoch)")
        ax.set_ylabel("lambda")
        ax.grid(alpha=0.3)
    fig.suptitle(f"training curves: {Path(run_dir).name}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_features(
    features: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    *,
    classes: Sequence[str] | None = None,
    title: str = "",
    means: np.ndarray | None = None,
    variances: np.ndarray | None = None,
    max_points: int = 5000,
) -> Path:
    """Scatter 2-D features by class (the paper's Figure 2); optional L-GM means and 1σ ellipses.

    ``variances`` is (C, 2) or (C, 1) (isotropic): the ellipse of class k has semi-axes
    ``sqrt(variances[k])`` around ``means[k]``.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or features.shape[1] != 2:
        raise ValueError(
            f"features must be (N, 2) to scatter (train a model with --feat-dim 2, e.g. "
            f"--model feat2d_net), got shape {features.shape}"
        )
    if len(labels) != len(features):
        raise ValueError(f"labels has {len(labels)} entries, features {len(features)}")
    plt = _pyplot()
    from matplotlib.patches import Ellipse

    if len(labels) > max_points:
        idx = np.random.default_rng(0).choice(len(labels), max_points, replace=False)
        features, labels = features[idx], labels[idx]
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    if means is not None:
        num_classes = max(num_classes, len(means))
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=100)
    for k in range(num_classes):
        sel = labels == k
        name = classes[k] if classes is not None and k < len(classes) else str(k)
        ax.scatter(
            features[sel, 0], features[sel, 1], s=4, alpha=0.6, color=cmap(k % 20), label=name
        )
    if means is not None:
        means = np.asarray(means, dtype=np.float64)
        ax.scatter(means[:, 0], means[:, 1], marker="x", s=60, c="black", label="class means")
        if variances is not None:
            variances = np.asarray(variances, dtype=np.float64)
            for k, mu in enumerate(means):
                v = variances[k] if variances.shape[1] == 2 else np.repeat(variances[k], 2)
                ax.add_patch(
                    Ellipse(
                        (float(mu[0]), float(mu[1])),
                        2 * math.sqrt(float(v[0])),
                        2 * math.sqrt(float(v[1])),
                        fill=False,
                        color=cmap(k % 20),
                        lw=1.5,
                    )
                )
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=7, loc="best")
    for handle in legend.legend_handles:  # the scatter's tiny dots are unreadable in a legend
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([25])
    ax.set_title(title or "2-D features", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig: Any, path: str | Path, plt: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path

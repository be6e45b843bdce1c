"""PNG plots (matplotlib, Agg backend): 2-D feature scatter, lambda schedule, training curves."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FeaturePanel",
    "loss_name",
    "plot_curves",
    "plot_feature_panels",
    "plot_features",
    "plot_schedule",
    "read_metrics",
]


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


def _run_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's config.json, or ``{}`` when it has none (or an unreadable one)."""
    path = Path(run_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _run_label(run_dir: str | Path) -> str:
    """A legend label: the run's directory name and its loss, from config.json if it has one."""
    cfg = _run_config(run_dir)
    name = Path(run_dir).name
    return f"{name}: {loss_name(cfg)}" if cfg else name


def loss_name(cfg: dict[str, Any]) -> str:
    """``softmax``, ``L-Softmax m=4`` or ``L-GM (alpha=0.1)`` for a run's configuration."""
    if cfg.get("loss") == "lgm":
        return f"L-GM (alpha={cfg.get('lgm', {}).get('alpha')})"
    margin = cfg.get("margin")
    return "softmax" if margin == 1 else f"L-Softmax m={margin}"


def plot_curves(run_dirs: str | Path | Sequence[str | Path], path: str | Path) -> Path:
    """Overlay runs' training curves from their ``metrics.jsonl``: test and train (margin-logit)
    accuracy and loss per epoch, lambda, and the learning rate, one colour per run."""
    dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    if not dirs:
        raise ValueError("plot_curves needs at least one run directory")
    runs = [(d, read_metrics(d)) for d in dirs]
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=100)
    (ax_acc, ax_loss), (ax_lam, ax_lr) = axes
    cmap = plt.get_cmap("tab10")
    any_lambda, all_positive = False, True
    for i, (d, records) in enumerate(runs):
        color, label = cmap(i % 10), _run_label(d)
        epochs = [r["epoch"] for r in records]
        ax_acc.plot(epochs, [r["test_acc"] for r in records], "o-", color=color, label=label)
        ax_acc.plot(epochs, [r["train_acc"] for r in records], "--", color=color, alpha=0.6)
        ax_loss.plot(epochs, [r["test_loss"] for r in records], "o-", color=color)
        ax_loss.plot(epochs, [r["train_loss"] for r in records], "--", color=color, alpha=0.6)
        # One point per epoch boundary; the LR holds for a whole epoch (drops between epochs).
        ax_lr.step(epochs, [r["lr"] for r in records], where="mid", color=color, label=label)
        # Softmax runs (margin 1) log their head's lambda too, but it has no effect there.
        lams = [] if _run_config(d).get("margin") == 1 else [r.get("lambda_last") for r in records]
        if any(v is not None for v in lams):
            any_lambda = True
            pts = [(r["step"], v) for r, v in zip(records, lams, strict=True) if v is not None]
            all_positive &= all(v > 0 for _, v in pts)
            ax_lam.plot(*zip(*pts, strict=True), "o-", color=color, label=label)
    ax_acc.set_ylabel("accuracy (solid: test, dashed: train)")
    ax_loss.set_ylabel("loss (solid: test, dashed: train)")
    for ax in (ax_acc, ax_loss, ax_lr):
        ax.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_yscale("log")
    ax_lam.set_xlabel("iteration (end of epoch)")
    ax_lam.set_ylabel("lambda (end of epoch)")
    if any_lambda and all_positive:
        ax_lam.set_yscale("log")
    if not any_lambda:
        ax_lam.text(
            0.5, 0.5, "no lambda (softmax / L-GM runs)", ha="center", transform=ax_lam.transAxes
        )
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7, loc="lower right")
    title = Path(dirs[0]).name if len(dirs) == 1 else f"{len(dirs)} runs"
    fig.suptitle(f"training curves: {title}", fontsize=10)
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
    panel = FeaturePanel(features, labels, title, means, variances)
    return plot_feature_panels([panel], path, classes=classes, max_points=max_points)


class FeaturePanel:
    """One run's 2-D features for :func:`plot_feature_panels` (checked on construction)."""

    def __init__(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        title: str = "",
        means: np.ndarray | None = None,
        variances: np.ndarray | None = None,
    ) -> None:
        self.features = np.asarray(features, dtype=np.float64)
        self.labels = np.asarray(labels)
        if self.features.ndim != 2 or self.features.shape[1] != 2:
            raise ValueError(
                f"features must be (N, 2) to scatter (train a model with --feat-dim 2, e.g. "
                f"--model feat2d_net), got shape {self.features.shape}"
            )
        if len(self.labels) != len(self.features):
            raise ValueError(
                f"labels has {len(self.labels)} entries, features {len(self.features)}"
            )
        self.title = title
        self.means = None if means is None else np.asarray(means, dtype=np.float64)
        self.variances = None if variances is None else np.asarray(variances, dtype=np.float64)


def plot_feature_panels(
    panels: Sequence[FeaturePanel],
    path: str | Path,
    *,
    classes: Sequence[str] | None = None,
    max_points: int = 5000,
) -> Path:
    """Several runs' 2-D features side by side, one panel each, like the paper's Figure 2."""
    if not panels:
        raise ValueError("plot_feature_panels needs at least one panel")
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
        raise ValueError(f"max_points must be an integer >= 1, got {max_points!r}")
    plt = _pyplot()
    from matplotlib.patches import Ellipse

    ncols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.6 * ncols, 4.6 * nrows + 0.4), dpi=100, squeeze=False
    )
    num_classes = max(
        max(int(p.labels.max()) + 1 if len(p.labels) else 0, 0 if p.means is None else len(p.means))
        for p in panels
    )
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    for ax, p in zip(axes.flat, panels, strict=False):
        features, labels = p.features, p.labels
        if len(labels) > max_points:
            idx = np.random.default_rng(0).choice(len(labels), max_points, replace=False)
            features, labels = features[idx], labels[idx]
        for k in range(num_classes):
            sel = labels == k
            name = classes[k] if classes is not None and k < len(classes) else str(k)
            ax.scatter(
                features[sel, 0], features[sel, 1], s=4, alpha=0.6, color=cmap(k % 20), label=name
            )
        if p.means is not None:
            ax.scatter(
                p.means[:, 0], p.means[:, 1], marker="x", s=60, c="black", label="class means"
            )
            if p.variances is not None:
                for k, mu in enumerate(p.means):
                    v = (
                        p.variances[k]
                        if p.variances.shape[1] == 2
                        else np.repeat(p.variances[k], 2)
                    )
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
        ax.set_xlabel("feature 1")
        ax.set_ylabel("feature 2")
        ax.set_title(p.title or "2-D features", fontsize=10)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    handles, names = axes.flat[0].get_legend_handles_labels()
    legend = fig.legend(
        handles, names, fontsize=8, loc="lower center", ncol=min(len(names), 11), frameon=False
    )
    for handle in legend.legend_handles:  # the scatter's tiny dots are unreadable in a legend
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([25])
    fig.tight_layout(rect=(0, 0.06 if nrows == 1 else 0.03, 1, 1))
    return _save(fig, path, plt)


def _save(fig: Any, path: str | Path, plt: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path

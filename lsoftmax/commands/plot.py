"""``lsoftmax plot features|schedule|curves``: PNG plots of runs and lambda schedules."""

from __future__ import annotations

import argparse
from pathlib import Path

from lsoftmax.commands.train import add_schedule_args, schedule_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plot",
        help="plot 2-D features, a lambda schedule or training curves (PNG)",
        description="Write PNG plots: the 2-D features of a run (the paper's Figure 2), a "
        "lambda schedule (look at it before training), or a run's training curves.",
    )
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")

    f = sub.add_parser(
        "features",
        help="scatter 2-D-feature runs' test features by class, one panel per run",
        description="Scatter the 2-D features of one or more runs side by side (the paper's "
        "Figure 2), each panel titled with its loss and its accuracy on the plotted split.",
    )
    f.add_argument(
        "run_dirs", nargs="+", metavar="RUN", help="run directories (or checkpoint.pt files)"
    )
    f.add_argument("--split", choices=("test", "train"), default="test")
    f.add_argument("--max-points", type=int, default=5000)
    f.add_argument("--data-dir", default=None, help="data directory if not the run's")
    f.add_argument(
        "-o", "--output", default=None, help="PNG path (default: the first RUN's features.png)"
    )
    f.set_defaults(func=run_features)

    s = sub.add_parser("schedule", help="lambda over training iterations")
    add_schedule_args(s)
    s.add_argument("--iters", type=int, default=30000, help="iterations to plot (30000)")
    s.add_argument("--linear", action="store_true", help="linear y axis (default: log)")
    s.add_argument("-o", "--output", default="schedule.png", help="PNG path (schedule.png)")
    s.set_defaults(func=run_schedule)

    c = sub.add_parser(
        "curves", help="overlay runs' accuracy, loss, lambda and LR per epoch (metrics.jsonl)"
    )
    c.add_argument("run_dirs", nargs="+", metavar="RUN", help="run directories")
    c.add_argument(
        "-o", "--output", default=None, help="PNG path (default: the first RUN's curves.png)"
    )
    c.set_defaults(func=run_curves)


def run_schedule(args: argparse.Namespace) -> int:
    from lsoftmax.plots import plot_schedule

    # An onset schedule is relative to the run: plot it over a run of --iters steps (at least
    # one, so that a bad --iters is reported by plot_schedule, naming the option).
    schedule = schedule_from_args(args, total_steps=max(args.iters, 1))
    path = plot_schedule(schedule, args.iters, args.output, log_scale=not args.linear)
    print(f"wrote {path}")
    return 0


def run_curves(args: argparse.Namespace) -> int:
    from lsoftmax.plots import plot_curves

    out = args.output or str(Path(args.run_dirs[0]) / "curves.png")
    print(f"wrote {plot_curves(args.run_dirs, out)}")
    return 0


def _feature_panel(run: str, split: str, data_dir: str | None) -> tuple[object, tuple[str, ...]]:
    import torch

    from lsoftmax.checkpoint import load_model
    from lsoftmax.cli import CLIError
    from lsoftmax.data import load_dataset, subset
    from lsoftmax.plots import FeaturePanel, loss_name

    given = Path(run)
    ckpt = given if given.is_file() else given / "checkpoint.pt"
    if not ckpt.is_file():
        raise CLIError(f"no checkpoint at {ckpt}: pass a run directory of lsoftmax train")
    model, meta = load_model(ckpt)
    extra = meta.get("extra", meta)
    cfg = extra.get("config")
    if not cfg:
        raise CLIError(f"{ckpt} has no training config; cannot tell which data set to plot")
    if getattr(model, "feat_dim", None) != 2:
        raise CLIError(
            f"{run}: the run's feature layer has {getattr(model, 'feat_dim', '?')} units, not 2: "
            "train with --model feat2d_net (or --feat-dim 2) to plot features"
        )
    ds = load_dataset(cfg["dataset"], data_dir or cfg.get("data_dir"))
    if split == "test":
        ds = subset(ds, None, cfg.get("seed", 0), cfg.get("test_limit"))
        x, y = ds.x_test, ds.y_test
    else:
        ds = subset(ds, cfg.get("limit"), cfg.get("seed", 0))
        x, y = ds.x_train, ds.y_train
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.features(x[i : i + 1000]) for i in range(0, len(y), 1000)])
        pred = torch.cat([model(x[i : i + 1000]) for i in range(0, len(y), 1000)])
    acc = float((pred.argmax(1) == y).double().mean())
    means = variances = None
    if getattr(model, "head_kind", "") == "lgm":
        means = model.head.means.detach().numpy()
        variances = model.head.variances.numpy()
    title = f"{loss_name(cfg)}\n{cfg['dataset']} {split} accuracy {acc:.4f}"
    return FeaturePanel(feats.numpy(), y.numpy(), title, means, variances), ds.classes


def run_features(args: argparse.Namespace) -> int:
    from lsoftmax.cli import CLIError
    from lsoftmax.plots import plot_feature_panels

    # Checked before any checkpoint or data set is loaded.
    if args.max_points < 1:
        raise CLIError(f"--max-points must be >= 1, got {args.max_points}")
    made = [_feature_panel(run, args.split, args.data_dir) for run in args.run_dirs]
    given = Path(args.run_dirs[0])
    out = args.output or str((given.parent if given.is_file() else given) / "features.png")
    path = plot_feature_panels(
        [panel for panel, _ in made],  # type: ignore[misc]
        out,
        classes=made[0][1],
        max_points=args.max_points,
    )
    print(f"wrote {path}")
    return 0

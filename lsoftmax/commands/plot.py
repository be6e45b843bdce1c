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

    f = sub.add_parser("features", help="scatter a 2-D-feature run's test features by class")
    f.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or a checkpoint.pt)")
    f.add_argument("--split", choices=("test", "train"), default="test")
    f.add_argument("--max-points", type=int, default=5000)
    f.add_argument("--data-dir", default=None, help="data directory if not the run's")
    f.add_argument("-o", "--output", default=None, help="PNG path (default RUN_DIR/features.png)")
    f.set_defaults(func=run_features)

    s = sub.add_parser("schedule", help="lambda over training iterations")
    add_schedule_args(s)
    s.add_argument("--iters", type=int, default=30000, help="iterations to plot (30000)")
    s.add_argument("--linear", action="store_true", help="linear y axis (default: log)")
    s.add_argument("-o", "--output", default="schedule.png", help="PNG path (schedule.png)")
    s.set_defaults(func=run_schedule)

    c = sub.add_parser("curves", help="loss/accuracy/lambda per epoch from metrics.jsonl")
    c.add_argument("run_dir", metavar="RUN_DIR")
    c.add_argument("-o", "--output", default=None, help="PNG path (default RUN_DIR/curves.png)")
    c.set_defaults(func=run_curves)


def run_schedule(args: argparse.Namespace) -> int:
    from lsoftmax.plots import plot_schedule

    path = plot_schedule(
        schedule_from_args(args), args.iters, args.output, log_scale=not args.linear
    )
    print(f"wrote {path}")
    return 0


def run_curves(args: argparse.Namespace) -> int:
    from lsoftmax.plots import plot_curves

    out = args.output or str(Path(args.run_dir) / "curves.png")
    print(f"wrote {plot_curves(args.run_dir, out)}")
    return 0


def run_features(args: argparse.Namespace) -> int:
    import torch

    from lsoftmax.checkpoint import load_model
    from lsoftmax.cli import CLIError
    from lsoftmax.data import load_dataset, subset
    from lsoftmax.plots import plot_features

    given = Path(args.run_dir)
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
            f"the run's feature layer has {getattr(model, 'feat_dim', '?')} units, not 2: train "
            "with --model feat2d_net (or --feat-dim 2) to plot features"
        )
    ds = load_dataset(cfg["dataset"], args.data_dir or cfg.get("data_dir"))
    if args.split == "test":
        ds = subset(ds, None, cfg.get("seed", 0), cfg.get("test_limit"))
        x, y = ds.x_test, ds.y_test
    else:
        ds = subset(ds, cfg.get("limit"), cfg.get("seed", 0))
        x, y = ds.x_train, ds.y_train
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.features(x[i : i + 1000]) for i in range(0, len(y), 1000)])
    means = variances = None
    head = model.head
    title = f"{cfg['dataset']} {args.split} features, "
    if getattr(model, "head_kind", "") == "lgm":
        means = head.means.detach().numpy()
        variances = head.variances.numpy()
        title += f"L-GM (alpha={cfg.get('lgm', {}).get('alpha')})"
    else:
        margin = cfg.get("margin")
        title += "softmax" if margin == 1 else f"L-Softmax m={margin}"
    out = args.output or str(ckpt.parent / "features.png")
    path = plot_features(
        feats.numpy(),
        y.numpy(),
        out,
        classes=ds.classes,
        title=title,
        means=means,
        variances=variances,
        max_points=args.max_points,
    )
    print(f"wrote {path}")
    return 0

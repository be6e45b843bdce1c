"""``lsoftmax train``: train a model with an L-Softmax (or L-GM) head on a data set."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from lsoftmax.commands._device import add_device_argument, check_torch_device

if TYPE_CHECKING:
    from lsoftmax.schedules import Schedule
    from lsoftmax.train import TrainConfig

DATASET_CHOICES = ("digits", "fashion-mnist", "mnist", "cifar10")


def add_schedule_args(p: argparse.ArgumentParser) -> None:
    """The lambda-schedule options (shared with ``lsoftmax plot schedule``)."""
    g = p.add_argument_group(
        "lambda schedule (default: onset, relative to the run's length; docs/accuracy.md)"
    )
    g.add_argument(
        "--schedule",
        default="onset",
        help="onset: lambda = base until --warmup of the run, then falls to --reach at --at of "
        "the run (fractions of the total steps), floored at --lambda-min; "
        "exponential: max(lambda_min, base*(1+gamma*iter)^-power); "
        "scaled: max(beta_min, beta*scale^step); constant: --lambda",
    )
    g.add_argument("--base", type=float, default=None, help="exponential, onset: base (1000)")
    g.add_argument("--reach", type=float, default=None, help="onset: lambda reached at --at")
    g.add_argument("--at", type=float, default=None, help="onset: fraction of the run")
    g.add_argument("--warmup", type=float, default=None, help="onset: softmax fraction of the run")
    g.add_argument("--gamma", type=float, default=None, help="exponential: gamma (2.5e-5)")
    g.add_argument("--power", type=float, default=None, help="exponential: power (35)")
    g.add_argument("--lambda-min", type=float, default=None, help="exponential, onset: floor (0)")
    g.add_argument("--beta", type=float, default=None, help="scaled: start (100)")
    g.add_argument("--scale", type=float, default=None, help="scaled: factor per step (0.99)")
    g.add_argument("--beta-min", type=float, default=None, help="scaled: floor (0)")
    g.add_argument("--lambda", dest="lambda_", type=float, default=None, help="constant: value")


def schedule_from_args(args: argparse.Namespace, total_steps: int = 1) -> Schedule:
    """The schedule the options describe; ``total_steps`` is an onset schedule's run length."""
    from lsoftmax.train import make_schedule

    return make_schedule(
        args.schedule,
        total_steps=total_steps,
        reach=args.reach,
        at=args.at,
        warmup=args.warmup,
        base=args.base,
        gamma=args.gamma,
        power=args.power,
        lambda_min=args.lambda_min,
        beta=args.beta,
        scale=args.scale,
        beta_min=args.beta_min,
        value=args.lambda_,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a classifier with an L-Softmax or L-GM head",
        description="Train a classifier with an L-Softmax head (--margin 1 is the plain softmax "
        "baseline) or an L-GM head (--loss lgm). Writes config.json, metrics.jsonl, "
        "checkpoint.pt and final.json into --out.",
    )
    p.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASET_CHOICES)}")
    p.add_argument(
        "--data-dir",
        default=None,
        help="directory with the data files (default: where the Debian package installs them)",
    )
    p.add_argument("--model", default=None, help="mnist_net, feat2d_net or mlp (default: by data)")
    p.add_argument("--loss", default="lsoftmax", help="lsoftmax (default) or lgm")
    p.add_argument("--margin", type=int, default=4, help="integer margin m >= 1 (1 = softmax)")
    add_schedule_args(p)
    g = p.add_argument_group("model size")
    g.add_argument("--width", type=int, default=None, help="conv channels of the first stage")
    g.add_argument("--convs-per-stage", type=int, default=None, help="mnist_net: convs per stage")
    g.add_argument("--feat-dim", type=int, default=None, help="feature (head input) size")
    g.add_argument("--hidden", type=int, nargs="+", default=None, help="mlp: hidden layer sizes")
    g.add_argument(
        "--activation", default=None, help="mnist_net: relu (the prototxt's, default) or prelu"
    )
    g = p.add_argument_group("L-GM head (--loss lgm)")
    g.add_argument("--alpha", type=float, default=0.1, help="margin alpha")
    g.add_argument("--lambda-lkd", type=float, default=0.01, help="likelihood weight")
    g.add_argument("--isotropic", action="store_true", help="one variance per class")
    g = p.add_argument_group("optimization (SGD with momentum, multistep LR like the paper)")
    g.add_argument(
        "--epochs", type=int, default=None, help="total epochs (10; on --resume: the saved one)"
    )
    g.add_argument("--batch-size", type=int, default=128, help="mini-batch size")
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="base learning rate (default: 0.1; 0.01 for feat2d_net, which diverges at 0.1)",
    )
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="L2 on weights (not biases)")
    g.add_argument(
        "--milestones",
        type=int,
        nargs="*",
        default=[],
        help="epochs after which the LR is multiplied by --lr-gamma",
    )
    g.add_argument("--lr-gamma", type=float, default=0.1, help="LR factor at each milestone")
    g.add_argument("--seed", type=int, default=0, help="seed of the init, data order, subsets")
    g.add_argument("--limit", type=int, default=None, help="use at most N training samples")
    g.add_argument("--test-limit", type=int, default=None, help="use at most N test samples")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_device_argument(p, "training")
    p.add_argument(
        "--out",
        default=None,
        help="run directory (default: runs/latest; with --resume, the checkpoint's directory)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (without it a new run there is refused)",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="CHECKPOINT",
        help="continue RUN_DIR/checkpoint.pt (its config wins; --epochs may extend it)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("distributed (lsoftmax.train_distributed; docs/huge.md)")
    g.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="train on N local gloo processes: DDP backbone, class-sharded L-Softmax head",
    )
    g.add_argument(
        "--sample-rate", type=float, default=1.0, help="--nproc: partial-FC share of negatives"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lsoftmax import _core
    from lsoftmax.cli import CLIError

    if args.dataset not in DATASET_CHOICES:
        raise CLIError(
            f"unknown --dataset {args.dataset!r}; expected one of {', '.join(DATASET_CHOICES)}"
        )
    try:
        _core.check_margin(args.margin)  # the core's rule and message, worded for the flag
    except (TypeError, ValueError) as e:
        raise CLIError(f"--{e}") from None
    # Sizes are checked here, before any data is loaded (a zero width otherwise ends in an
    # IndexError deep in the model).
    for flag, value in (
        ("--width", args.width),
        ("--convs-per-stage", args.convs_per_stage),
        ("--feat-dim", args.feat_dim),
        ("--batch-size", args.batch_size),
        *(("--hidden", h) for h in args.hidden or ()),
    ):
        if value is not None and value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    if args.loss not in ("lsoftmax", "lgm"):
        raise CLIError(f"--loss must be 'lsoftmax' or 'lgm', got {args.loss!r}")
    if args.loss == "lgm":
        from lsoftmax.models import lgm_available

        if not lgm_available():
            raise CLIError(
                "--loss lgm needs lsoftmax.torch.LGMLoss, which this installation does not have"
            )
    if args.resume is not None and not Path(args.resume).is_file():
        raise CLIError(f"--resume: no such checkpoint file: {args.resume}")
    check_torch_device(args.device)

    from lsoftmax.train import TrainConfig, train

    schedule = schedule_from_args(args).to_dict()
    if schedule["kind"] == "onset":
        schedule["total_steps"] = None  # the run's length: train() fills it in
    overrides = {
        "width": args.width,
        "convs_per_stage": args.convs_per_stage,
        "feat_dim": args.feat_dim,
        "hidden": args.hidden,
        "activation": args.activation,
    }
    cfg = TrainConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        model=args.model,
        loss=args.loss,
        margin=args.margin,
        schedule=schedule,
        model_overrides={k: v for k, v in overrides.items() if v is not None},
        lgm={"alpha": args.alpha, "lambda_lkd": args.lambda_lkd, "isotropic": args.isotropic}
        if args.loss == "lgm"
        else {},
        epochs=args.epochs if args.epochs is not None else (0 if args.resume else 10),
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        milestones=sorted(args.milestones),
        lr_gamma=args.lr_gamma,
        seed=args.seed,
        limit=args.limit,
        test_limit=args.test_limit,
        threads=args.threads,
    )
    out = args.out if args.out is not None else (None if args.resume else "runs/latest")
    progress = False if args.no_progress else None
    if args.nproc != 1:
        return _run_distributed(args, cfg, out or "runs/latest", progress)
    train(
        cfg,
        out,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        progress=progress,
    )
    return 0


def _run_distributed(
    args: argparse.Namespace, cfg: TrainConfig, out: str, progress: bool | None
) -> int:
    from lsoftmax.cli import CLIError
    from lsoftmax.train_distributed import train_distributed

    if args.nproc < 1:
        raise CLIError(f"--nproc must be >= 1, got {args.nproc}")
    if args.resume is not None or args.loss != "lsoftmax":
        raise CLIError("--nproc supports fresh L-Softmax runs (no --resume, no --loss lgm)")
    if getattr(args, "device", None) not in (None, "cpu"):
        raise CLIError("--nproc runs gloo processes on the CPU (no --device cuda yet)")
    try:
        train_distributed(
            cfg, out, nproc=args.nproc, progress=progress, sample_rate=args.sample_rate
        )
    except ValueError as e:
        raise CLIError(str(e)) from e
    return 0

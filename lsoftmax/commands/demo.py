"""``lsoftmax demo``: train on 8×8 digits, export to ONNX, run it in ONNX Runtime, compare.

The whole path a user takes, in well under a minute on 2 CPU cores and with no download: train a
small MLP with an L-Softmax head on scikit-learn's bundled digits, export it with the
``ai.lsoftmax`` custom op (plus its function body), run the ONNX model in ONNX Runtime with the
custom-op library registered, and print PyTorch and ONNX Runtime test accuracy side by side with
the largest logit difference.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lsoftmax.commands._device import add_device_argument, check_torch_device

# Lambda falls below 1 after ~220 of the demo's ~640 iterations (the paper's gamma = 2.5e-5 would
# leave it near 1000, i.e. plain softmax, for the whole demo).
DEMO_SCHEDULE = {"base": 1000.0, "gamma": 1e-3, "power": 35.0, "lambda_min": 1.0}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train on 8x8 digits, export to ONNX, compare PyTorch and ONNX Runtime",
        description="Train a small L-Softmax model on scikit-learn's 8x8 digits (no download), "
        "export it to ONNX, run it in ONNX Runtime with the lsoftmax custom-op library and print "
        "both test accuracies and the largest logit difference.",
    )
    p.add_argument("--margin", type=int, default=4, help="L-Softmax margin m (4; 1 = softmax)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: the model is tiny)"
    )
    add_device_argument(p, "training and ONNX Runtime", "--providers")
    p.add_argument(
        "--out",
        default=None,
        help="keep the run (checkpoint, metrics, model.onnx) in this directory "
        "(default: a temporary directory, removed at the end)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lsoftmax.cli import CLIError

    if args.margin < 1:
        raise CLIError(f"--margin must be an integer >= 1, got {args.margin}")
    if args.epochs < 1:
        raise CLIError(f"--epochs must be a positive integer, got {args.epochs}")
    check_torch_device(args.device)
    if args.out is not None:
        return _demo(args, Path(args.out))
    with tempfile.TemporaryDirectory(prefix="lsoftmax-demo-") as tmp:
        return _demo(args, Path(tmp))


def _demo(args: argparse.Namespace, out: Path) -> int:
    import logging

    import numpy as np
    import torch

    from lsoftmax.cli import CLIError
    from lsoftmax.data import load_digits
    from lsoftmax.models import example_input
    from lsoftmax.schedules import Exponential
    from lsoftmax.train import TrainConfig, train

    try:
        from lsoftmax.exporters import export_onnx
    except ImportError as e:
        raise CLIError(f"the ONNX exporter is not available in this install ({e})") from e
    from lsoftmax import ort

    ds = load_digits()
    cfg = TrainConfig(
        dataset="digits",
        model="mlp",
        margin=args.margin,
        schedule=Exponential(**DEMO_SCHEDULE).to_dict(),
        model_overrides={"hidden": [128], "feat_dim": 32},
        epochs=args.epochs,
        batch_size=64,
        lr=0.1,
        milestones=[int(args.epochs * 0.6), int(args.epochs * 0.85)],
        seed=args.seed,
        threads=args.threads,
    )
    cfg.milestones = sorted({m for m in cfg.milestones if m >= 1})
    name = "softmax" if args.margin == 1 else f"L-Softmax (m={args.margin})"
    print(
        f"training an MLP with {name} on 8x8 digits: {len(ds.y_train)} train / "
        f"{len(ds.y_test)} test images, {cfg.epochs} epochs",
        flush=True,
    )
    result = train(
        cfg,
        out / "run",
        progress=False if args.no_progress else None,
        log=None,
        dataset=ds,
        device=args.device,
    )
    model = result["model"].cpu().eval()

    onnx_path = out / "model.onnx"
    # torch.onnx warns about every torchvision op it cannot register; irrelevant here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    export_onnx(model, (example_input(ds.input_shape),), str(onnx_path), mode="function")
    sess = ort.session(onnx_path, providers=args.device)
    input_name = sess.get_inputs()[0].name
    x_test = ds.x_test.numpy()
    ort_logits = np.concatenate(
        [sess.run(None, {input_name: x_test[i : i + 256]})[0] for i in range(0, len(x_test), 256)]
    )
    with torch.no_grad():
        torch_logits = model(ds.x_test).numpy()
    y = ds.y_test.numpy()
    acc_torch = float((torch_logits.argmax(1) == y).mean())
    acc_ort = float((ort_logits.argmax(1) == y).mean())
    max_diff = float(np.abs(torch_logits.astype(np.float64) - ort_logits).max())
    scale = float(np.abs(torch_logits).max())

    print()
    print(f"exported to ONNX ({onnx_path.name}) and ran it in ONNX Runtime with the lsoftmax ops")
    print(f"{'':<22}{'PyTorch':>10}{'ONNX Runtime':>15}")
    print(f"{'test accuracy':<22}{acc_torch:>10.4f}{acc_ort:>15.4f}")
    print(f"max |logit difference|: {max_diff:.3g} (logits up to {scale:.3g})")
    if args.out is not None:
        print(f"run: {out / 'run'}  model: {onnx_path}")
    if not np.isfinite(max_diff) or max_diff > 1e-3 * max(scale, 1.0):
        raise CLIError(f"PyTorch and ONNX Runtime disagree: max logit difference {max_diff:.3g}")
    return 0

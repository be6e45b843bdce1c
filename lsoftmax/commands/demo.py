"""``lsoftmax demo``: softmax and L-Softmax side by side on 8×8 digits, in PyTorch and ONNX Runtime.

The whole path a user takes, in well under a minute on 2 CPU cores and with no download: train a
small MLP twice on scikit-learn's bundled digits, once with a softmax head and once with an
L-Softmax head (same initialization seed, same batches, same LR schedule), export both with the
``ai.lsoftmax`` custom op (plus its function body), run them in ONNX Runtime with the custom-op
library registered, and print each model's test accuracy in both runtimes, the lambda the
L-Softmax head ended with, and the largest logit difference between the runtimes.

The printed numbers do not depend on ``--threads``: training always runs on one torch thread,
because torch's CPU batch norm sums its batch statistics in an order that depends on the thread
count (the first difference, ~1e-6, grows over the run into different test accuracies). The
model is tiny, so one thread is also the fastest; ``--threads`` sets the threads of the export
and of the PyTorch evaluation.

Nor do they depend on the machine: on the CPU the demo runs in a child process with torch's
portable kernels (``ATEN_CPU_CAPABILITY=default``) and MKL's conditional numerical
reproducibility (``MKL_CBWR=COMPATIBLE``). With the per-CPU kernels, an AVX-512 Intel and an
AVX-512 AMD machine rounded the same run differently, and 660 steps later the test accuracies
differed by nine images. Both settings are read once when torch and MKL load, so they need a
fresh process; the demo's model is small enough that the portable kernels cost nothing visible.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lsoftmax.commands._device import add_device_argument, check_torch_device
from lsoftmax.schedules import Onset

# Machine-independent numerics for the CPU run (see the module docstring); the child process
# is marked so that it runs the demo itself.
PORTABLE_NUMERICS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
_CHILD = "LSOFTMAX_DEMO_PORTABLE_CHILD"
# The demo's learning rate: of 0.1, 0.05 and 0.02 (five seeds each, docs/accuracy.md), the one
# at which the margin head trained best against softmax.
DEMO_LR = 0.05

# The default onset schedule (lsoftmax.schedules.Onset): softmax for the first 20 % of the run,
# then lambda falls to its floor of 5 (reached at ~43 % of the run) and stays there.
DEMO_SCHEDULE = Onset().to_dict()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train on 8x8 digits, export to ONNX, compare PyTorch and ONNX Runtime",
        description="Train a small L-Softmax model on scikit-learn's 8x8 digits (no download), "
        "export it to ONNX, run it in ONNX Runtime with the lsoftmax custom-op library and print "
        "both test accuracies and the largest logit difference.",
    )
    p.add_argument("--margin", type=int, default=4, help="the L-Softmax head's margin m >= 2 (4)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for export and evaluation (training always uses 1, so the "
        "numbers do not depend on it)",
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

    if args.margin < 2:
        raise CLIError(
            "--margin must be an integer >= 2 (the demo compares it with softmax), "
            f"got {args.margin}"
        )
    if args.threads < 1:
        raise CLIError(f"--threads must be a positive integer, got {args.threads}")
    if args.epochs < 1:
        raise CLIError(f"--epochs must be a positive integer, got {args.epochs}")
    check_torch_device(args.device)
    if args.device == "cpu" and os.environ.get(_CHILD) != "1":
        return _run_portable(args)
    if args.out is not None:
        return _demo(args, Path(args.out))
    with tempfile.TemporaryDirectory(prefix="lsoftmax-demo-") as tmp:
        return _demo(args, Path(tmp))


def _run_portable(args: argparse.Namespace) -> int:
    """The same demo in a child process with ``PORTABLE_NUMERICS``; its output passes through
    (stdout line by line through ``print``, so that a caller capturing it sees it)."""
    argv = [
        sys.executable, "-m", "lsoftmax", "demo", "--margin", str(args.margin),
        "--epochs", str(args.epochs), "--seed", str(args.seed), "--threads", str(args.threads),
    ]
    if args.out is not None:
        argv += ["--out", str(args.out)]
    if args.no_progress:
        argv.append("--no-progress")
    env = {**os.environ, **PORTABLE_NUMERICS, _CHILD: "1"}
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        for line in child.stdout:
            print(line, end="", flush=True)
    return child.returncode


def _train_and_compare(
    args: argparse.Namespace, margin: int, out: Path, ds: object
) -> tuple[float, float, float | None, float, float]:
    """Train one head, export it, run it in ORT: (acc torch, acc ORT, lambda, max diff, scale)."""
    import logging

    import numpy as np
    import torch

    from lsoftmax import ort
    from lsoftmax.exporters import export_onnx
    from lsoftmax.models import example_input
    from lsoftmax.train import TrainConfig, train

    cfg = TrainConfig(
        dataset="digits",
        model="mlp",
        margin=margin,
        schedule={**DEMO_SCHEDULE, "total_steps": None},
        model_overrides={"hidden": [128], "feat_dim": 32},
        epochs=args.epochs,
        batch_size=64,
        lr=DEMO_LR,
        milestones=sorted({m for m in (int(args.epochs * 0.6), int(args.epochs * 0.85)) if m}),
        seed=args.seed,
        threads=1,  # see the module docstring: thread-count-independent numbers
    )
    result = train(
        cfg,
        out / "run",
        progress=False if args.no_progress else None,
        log=None,
        dataset=ds,  # type: ignore[arg-type]
        device=args.device,
    )
    torch.set_num_threads(args.threads)
    model = result["model"].cpu().eval()
    onnx_path = out / "model.onnx"
    # torch.onnx warns about every torchvision op it cannot register; irrelevant here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    export_onnx(model, (example_input(ds.input_shape),), str(onnx_path), mode="function")
    sess = ort.session(onnx_path, providers=args.device)
    input_name = sess.get_inputs()[0].name
    x_test = ds.x_test.numpy()  # type: ignore[attr-defined]
    ort_logits = np.concatenate(
        [sess.run(None, {input_name: x_test[i : i + 256]})[0] for i in range(0, len(x_test), 256)]
    )
    with torch.no_grad():
        torch_logits = model(ds.x_test).numpy()  # type: ignore[attr-defined]
    y = ds.y_test.numpy()  # type: ignore[attr-defined]
    return (
        float((torch_logits.argmax(1) == y).mean()),
        float((ort_logits.argmax(1) == y).mean()),
        None if margin == 1 else result["lambda"],
        float(np.abs(torch_logits.astype(np.float64) - ort_logits).max()),
        float(np.abs(torch_logits).max()),
    )


def _demo(args: argparse.Namespace, out: Path) -> int:
    from lsoftmax.cli import CLIError
    from lsoftmax.data import load_digits

    try:
        import lsoftmax.exporters  # noqa: F401
    except ImportError as e:
        raise CLIError(f"the ONNX exporter is not available in this install ({e})") from e

    ds = load_digits()
    heads = [("softmax", 1), (f"L-Softmax (m={args.margin})", args.margin)]
    print(
        f"training an MLP on 8x8 digits ({len(ds.y_train)} train / {len(ds.y_test)} test images, "
        f"{args.epochs} epochs), once per head: same seed, batches and LR schedule",
        flush=True,
    )
    rows = [(name, *_train_and_compare(args, m, out / f"m{m}", ds)) for name, m in heads]

    print()
    print("exported both to ONNX and ran them in ONNX Runtime with the lsoftmax ops")
    print(f"{'test accuracy':<22}{'PyTorch':>10}{'ONNX Runtime':>15}{'lambda at the end':>20}")
    for name, acc_torch, acc_ort, lam, _, _ in rows:
        lam_s = "-" if lam is None else f"{lam:.3g}"
        print(f"{name:<22}{acc_torch:>10.4f}{acc_ort:>15.4f}{lam_s:>20}")
    max_diff = max(r[4] for r in rows)
    scale = max(r[5] for r in rows)
    # A power of ten, not the value: ONNX Runtime's GEMMs pick their kernels by CPU, so the
    # digits of the largest difference change from machine to machine.
    bound = 10.0 ** math.ceil(math.log10(max_diff)) if max_diff > 0 else 0.0
    print(f"max |logit difference| <= {bound:.0e} (logits up to {scale:.3g})")
    if args.out is not None:
        print(f"runs and models: {out}/m*/run, {out}/m*/model.onnx")
    if not max_diff <= 1e-3 * max(scale, 1.0):
        raise CLIError(f"PyTorch and ONNX Runtime disagree: max logit difference {max_diff:.3g}")
    return 0

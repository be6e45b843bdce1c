"""Accuracy: softmax (margin 1) against L-Softmax margins, same seeds, data order and LR schedule.

Run from the repository root, one command per recipe (docs/accuracy.md has the results)::

    python benchmarks/accuracy.py --recipe fmnist --out runs/acc-fmnist    # the main table
    python benchmarks/accuracy.py --recipe openset --out runs/acc-openset  # 8 classes -> 2 unseen
    python benchmarks/accuracy.py --recipe paper --device cuda --data-dir DIR --out runs/acc-paper
    python benchmarks/accuracy.py --recipe smoke --out runs/acc-smoke      # seconds: a check

A recipe fixes the data, network, epochs, LR drops and lambda schedule; every margin of it
trains from the same seeds with the same data order. Any option given on the command line
overrides the recipe's value. For every run the table reports test error, the lambda at the end
(so that a margin that was never applied cannot pass for one that paid off) and the feature
quality of the test embeddings (intra-class angular spread, angle between class centres); with
``--held-out`` the listed classes are left out of training and the embeddings of their test
images are scored by leave-one-out 1-NN accuracy and TAR at FAR 1e-3 (the open-set check).
Results go to ``OUT/results.json`` (every run) and markdown tables on stdout; ``--score RUN ...``
prints the tables for finished runs (say, one invocation per seed run side by side).
``--diagnose RUN ...`` asks why a margin run fits worse: on training images (eval mode) it
compares the median feature norm, class-weight norm and target angle, the margin's cut of the
target logit (the core's margin logits at the run's final lambda) against the gap to the best
other logit, and the training accuracy with plain and with margin logits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# The narrow mnist_net (docs/accuracy.md says why): a quarter of the channels, one conv per
# stage, PReLU so the features are not confined to the positive orthant.
NARROW = {"width": 16, "convs_per_stage": 1, "feat_dim": 256, "activation": "prelu"}
DEFAULT_WEIGHT_DECAY = 5e-4

RECIPES: dict[str, dict[str, Any]] = {
    # The main Fashion-MNIST table: 8 epochs (3752 iterations), one softmax epoch, lambda 1 at
    # 30 % of the run, then held at the floor lambda_min = 1; LR x0.1 after epochs 5 and 7.
    "fmnist": {
        "dataset": "fashion-mnist",
        "model": "mnist_net",
        "overrides": NARROW,
        "margins": [1, 2],
        "seeds": [0, 1, 2],
        "epochs": 8,
        "milestones": [5, 7],
        "schedule": {
            "kind": "onset",
            "reach": 1.0,
            "at": 0.3,
            "warmup": 0.125,
            "base": 1000.0,
            "lambda_min": 1.0,
        },
        "held_out": [],
    },
    # The open-set check, a shorter fmnist recipe on 8 classes (24,000 of their training images,
    # 4 epochs, LR x0.1 after epochs 2 and 3): T-shirt/top (0) and Shirt (6), two look-alike
    # classes (so that the check is not at its ceiling), are never seen in training.
    "openset": {
        "dataset": "fashion-mnist",
        "model": "mnist_net",
        "overrides": NARROW,
        "margins": [1, 2],
        "seeds": [0],
        "epochs": 4,
        "milestones": [2, 3],
        "limit": 24000,
        "schedule": {
            "kind": "onset",
            "reach": 1.0,
            "at": 0.3,
            "warmup": 0.125,
            "base": 1000.0,
            "lambda_min": 0.0,
        },
        "held_out": [0, 6],
    },
    # The original Caffe MNIST recipe: full-width mnist_net (ReLU, as the prototxt), batch 128,
    # lr 0.1 x0.1 at iterations 5k / 7.5k / 10k (here the nearest epoch boundaries: 5159, 7504,
    # 9849), 64 epochs = 30,016 iterations, the paper's lambda schedule. Needs a GPU: about
    # 34 hours per margin on 2 CPU cores.
    "paper": {
        "dataset": "mnist",
        "model": "mnist_net",
        "overrides": {"width": 64, "convs_per_stage": 3, "feat_dim": 512, "activation": "relu"},
        "margins": [1, 4],
        "seeds": [0],
        "epochs": 64,
        "milestones": [11, 16, 21],
        "schedule": {
            "kind": "exponential",
            "base": 1000.0,
            "gamma": 2.5e-5,
            "power": 35.0,
            "lambda_min": 0.0,
            "iteration": 0,
        },
        "held_out": [],
    },
    # The first recorded table (ReLU net, 3 epochs, lambda ~0 after ~600 of 1407 iterations).
    "short": {
        "dataset": "fashion-mnist",
        "model": "mnist_net",
        "overrides": {**NARROW, "activation": "relu"},
        "margins": [1, 2, 3, 4],
        "seeds": [0],
        "epochs": 3,
        "milestones": [2],
        "schedule": {
            "kind": "exponential",
            "base": 1000.0,
            "gamma": 1e-3,
            "power": 35.0,
            "lambda_min": 0.0,
            "iteration": 0,
        },
        "held_out": [],
    },
    # A check that the whole path runs (seconds): digits, tiny MLP.
    "smoke": {
        "dataset": "digits",
        "model": "mlp",
        "overrides": {"hidden": [64], "feat_dim": 16},
        "margins": [1, 2],
        "seeds": [0],
        "epochs": 2,
        "milestones": [1],
        "schedule": {
            "kind": "onset",
            "reach": 1.0,
            "at": 0.5,
            "warmup": 0.25,
            "base": 1000.0,
            "lambda_min": 0.0,
        },
        "held_out": [8, 9],
    },
}


# The fmnist recipe run twice as long (16 epochs, LR x0.1 after epochs 10 and 14) with a tenth of
# its weight decay: a margin beat softmax at one seed of three, not on average (docs/accuracy.md).
RECIPES["fmnist-long"] = {
    **RECIPES["fmnist"], "epochs": 16, "milestones": [10, 14], "weight_decay": 5e-5
}

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default="fmnist")
    p.add_argument("--dataset", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--margins", type=int, nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--milestones", type=int, nargs="*", default=None)
    p.add_argument("--activation", default=None, help="relu or prelu (overrides the recipe's)")
    p.add_argument("--held-out", type=int, nargs="*", default=None, help="classes left out")
    g = p.add_argument_group("lambda schedule (overrides the recipe's parameters)")
    for name in ("reach", "at", "warmup", "base", "lambda_min", "gamma", "power"):
        g.add_argument(f"--{name.replace('_', '-')}", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=None,
                   help=f"SGD weight decay (default: the recipe's, else {DEFAULT_WEIGHT_DECAY})")
    p.add_argument("--limit", type=int, default=None, help="at most N training samples")
    p.add_argument("--test-limit", type=int, default=None)
    # One thread per run: on this shared 2-core machine two runs side by side are faster than
    # one run on two threads, and one thread makes a run bit-reproducible.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where to train: cpu (default), cuda, ...")
    p.add_argument("--out", default="runs/accuracy")
    p.add_argument(
        "--score",
        nargs="+",
        metavar="RUN",
        default=None,
        help="train nothing: print the tables for these finished run directories of the recipe "
        "(e.g. runs of several invocations), recomputing the feature quality from checkpoints",
    )
    p.add_argument(
        "--diagnose",
        nargs="+",
        metavar="RUN",
        default=None,
        help="train nothing: norms, angles and the margin's cut of the target logit for these "
        "finished runs, on the first --diag-samples training images",
    )
    p.add_argument("--diag-samples", type=int, default=10000)
    p.add_argument(
        "--cut",
        nargs=2,
        type=float,
        metavar=("M", "LAMBDA"),
        default=None,
        help="with --diagnose: the margin and lambda whose cut is shown for softmax runs",
    )
    args = p.parse_args(argv)
    if args.diag_samples < 1:
        p.error(f"--diag-samples must be a positive integer, got {args.diag_samples}")
    if args.cut is not None and (args.cut[0] < 1 or args.cut[0] != int(args.cut[0])):
        p.error(f"--cut M must be a positive integer, got {args.cut[0]}")
    if args.cut is not None and not args.cut[1] >= 0:
        p.error(f"--cut LAMBDA must be >= 0, got {args.cut[1]}")
    if args.threads < 1:
        p.error(f"--threads must be a positive integer, got {args.threads}")
    return args


def recipe_of(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe with the command line's overrides applied."""
    r = json.loads(json.dumps(RECIPES[args.recipe]))  # a deep copy
    r.setdefault("limit", None)
    r.setdefault("weight_decay", DEFAULT_WEIGHT_DECAY)
    for key in ("dataset", "margins", "seeds", "epochs", "milestones", "held_out", "limit",
                "weight_decay"):
        if getattr(args, key) is not None:
            r[key] = getattr(args, key)
    if args.activation is not None:
        r["overrides"]["activation"] = args.activation
    for key in ("reach", "at", "warmup", "base", "lambda_min", "gamma", "power"):
        if getattr(args, key) is not None:
            if key not in r["schedule"]:
                raise SystemExit(
                    f"--{key.replace('_', '-')} does not apply to the recipe's "
                    f"{r['schedule']['kind']} schedule"
                )
            r["schedule"][key] = getattr(args, key)
    return r


def hold_out(ds: Any, held: list[int]) -> tuple[Any, Any]:
    """``(seen, unseen)``: ``seen`` has the other classes, relabelled 0..K-1 in order, in both
    splits; ``unseen`` has the test images of the ``held`` classes (original labels)."""
    import torch

    from lsoftmax.data import Dataset

    if len(set(held)) != len(held) or any(not 0 <= k < ds.num_classes for k in held):
        raise SystemExit(f"--held-out must be distinct classes in 0..{ds.num_classes - 1}")
    if ds.num_classes - len(held) < 2:
        raise SystemExit("--held-out must leave at least two classes to train on")
    keep = [k for k in range(ds.num_classes) if k not in held]
    relabel = torch.full((ds.num_classes,), -1, dtype=torch.int64)
    relabel[keep] = torch.arange(len(keep))
    tr = relabel[ds.y_train] >= 0
    te = relabel[ds.y_test] >= 0
    seen = Dataset(
        ds.name,
        ds.x_train[tr],
        relabel[ds.y_train[tr]],
        ds.x_test[te],
        relabel[ds.y_test[te]],
        len(keep),
        tuple(ds.classes[k] for k in keep),
    )
    unseen = Dataset(
        ds.name,
        ds.x_train[:0],
        ds.y_train[:0],
        ds.x_test[~te],
        ds.y_test[~te],
        ds.num_classes,
        ds.classes,
    )
    return seen, unseen


def _embeddings(model: Any, x: Any) -> Any:
    import torch

    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        parts = [model.features(x[i : i + 1000].to(device)) for i in range(0, len(x), 1000)]
    return torch.cat(parts).cpu()


def score(model: Any, test: Any, unseen: Any | None) -> dict[str, Any]:
    """Feature quality of ``model``'s test embeddings (and of the unseen classes', if any)."""
    from lsoftmax import feature_quality as fq

    feats = _embeddings(model, test.x_test).numpy()
    row = {f"angle_{k}": v for k, v in fq.angular_stats(feats, test.y_test.numpy()).items()}
    if unseen is not None:
        u_feats = _embeddings(model, unseen.x_test).numpy()
        u_labels = unseen.y_test.numpy()
        row["openset_1nn"] = fq.nearest_neighbour_accuracy(u_feats, u_labels)
        row["openset_tar"] = fq.tar_at_far(u_feats, u_labels, 1e-3)
    return row


def rescore(args: argparse.Namespace) -> int:
    """``--score RUN ...``: the tables for finished runs of this recipe, from their checkpoints."""
    import torch

    from lsoftmax.checkpoint import load_model
    from lsoftmax.data import load_dataset, subset

    torch.set_num_threads(args.threads)
    recipe = recipe_of(args)
    full = load_dataset(recipe["dataset"], args.data_dir)
    held = list(recipe["held_out"])
    seen, unseen = hold_out(full, held) if held else (full, None)
    results = []
    for run in args.score:
        model, meta = load_model(Path(run) / "checkpoint.pt")
        cfg = meta.get("extra", meta)["config"]
        final = json.loads((Path(run) / "final.json").read_text())
        row = score(model, subset(seen, None, cfg["seed"], cfg.get("test_limit")), unseen)
        results.append(
            {
                "margin": cfg["margin"],
                "seed": cfg["seed"],
                "run": str(run),
                "test_error": final["test_error"],
                "steps": final["step"],
                "final_lambda": final["lambda"],
                "seconds": final["seconds"],
                **row,
            }
        )
        print(json.dumps(results[-1]), flush=True)
    print_tables(results, unseen is not None)
    return 0


def margin_cut(model: Any, x: Any, y: Any, margin: int, lam: float) -> dict[str, float]:
    """Medians over ``x`` of what the margin asks of ``model``'s target logits, and the training
    accuracy (eval mode) with plain logits and with the margin logits at ``margin``, ``lam``."""
    import math

    import numpy as np

    from lsoftmax import core

    feats = _embeddings(model, x).double().numpy()
    weight = model.head.weight.detach().double().numpy()
    labels = y.numpy()
    plain = feats @ weight.T
    rows = np.arange(len(labels))
    target = plain[rows, labels]
    cut = target - core.forward(feats, weight, labels, margin=margin, lam=lam)[rows, labels]
    others = plain.copy()
    others[rows, labels] = -np.inf
    gap = target - others.max(axis=1)
    x_norm = np.linalg.norm(feats, axis=1)
    w_norm = np.linalg.norm(weight, axis=1)[labels]
    cos = np.clip(target / (x_norm * w_norm), -1.0, 1.0)
    return {
        "feat_norm": float(np.median(x_norm)),
        "weight_norm": float(np.median(w_norm)),
        "target_angle": math.degrees(float(np.median(np.arccos(cos)))),
        "target_logit": float(np.median(target)),
        "cut": float(np.median(cut)),
        "gap": float(np.median(gap)),
        "train_acc_plain": float(np.mean(gap > 0)),
        "train_acc_margin": float(np.mean(gap - cut > 0)),
    }


def diagnose(args: argparse.Namespace) -> int:
    """``--diagnose RUN ...``: the ``margin_cut`` table for finished runs of the recipe (its
    ``held_out`` classes are left out and the others relabelled, as in training)."""
    import torch

    from lsoftmax.checkpoint import load_model
    from lsoftmax.data import load_dataset

    torch.set_num_threads(args.threads)
    held = list(recipe_of(args)["held_out"])
    print(
        "\n| run | margin | lambda at the end | feature norm | weight norm | target angle (deg) "
        "| target logit | margin cut (m, lambda) | gap to best other | train acc plain (%) "
        "| train acc margin (%) |"
    )
    print("|" + " --- |" * 11)
    data: dict[tuple[str, str | None], Any] = {}
    for run in args.diagnose:
        model, meta = load_model(Path(run) / "checkpoint.pt")
        cfg = meta.get("extra", meta)["config"]
        final = json.loads((Path(run) / "final.json").read_text())
        key = (cfg["dataset"], cfg.get("data_dir"))
        if key not in data:
            full = load_dataset(cfg["dataset"], cfg.get("data_dir"))
            data[key] = hold_out(full, held)[0] if held else full
        ds = data[key]
        n = min(args.diag_samples, len(ds.y_train))
        if cfg["margin"] == 1 and args.cut is None:
            m, lam = 1, 0.0
        elif cfg["margin"] == 1:
            m, lam = int(args.cut[0]), float(args.cut[1])
        else:
            m, lam = int(cfg["margin"]), float(final["lambda"])
        r = margin_cut(model, ds.x_train[:n], ds.y_train[:n], m, lam)
        final_lam = "- (softmax)" if cfg["margin"] == 1 else f"{final['lambda']:.3g}"
        print(
            f"| {run} | {cfg['margin']} | {final_lam} | {r['feat_norm']:.2f} | "
            f"{r['weight_norm']:.2f} | {r['target_angle']:.1f} | {r['target_logit']:.2f} | "
            f"{r['cut']:.2f} ({m}, {lam:.3g}) | {r['gap']:.2f} | "
            f"{100 * r['train_acc_plain']:.2f} | {100 * r['train_acc_margin']:.2f} |",
            flush=True,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.score:
        return rescore(args)
    if args.diagnose:
        return diagnose(args)
    import torch

    from lsoftmax.data import load_dataset, subset
    from lsoftmax.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    recipe = recipe_of(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    full = load_dataset(recipe["dataset"], args.data_dir)
    held = list(recipe["held_out"])
    seen, unseen = hold_out(full, held) if held else (full, None)
    results = []
    t_all = time.perf_counter()
    for seed in recipe["seeds"]:
        for margin in recipe["margins"]:
            cfg = TrainConfig(
                dataset=recipe["dataset"],
                data_dir=args.data_dir,
                model=recipe["model"],
                margin=margin,
                schedule=dict(recipe["schedule"], total_steps=None)
                if recipe["schedule"]["kind"] == "onset"
                else dict(recipe["schedule"]),
                model_overrides=dict(recipe["overrides"]),
                epochs=recipe["epochs"],
                batch_size=args.batch_size,
                lr=args.lr,
                weight_decay=recipe["weight_decay"],
                milestones=list(recipe["milestones"]),
                seed=seed,
                limit=recipe["limit"],
                test_limit=args.test_limit,
                threads=args.threads,
            )
            run_dir = out / f"m{margin}_s{seed}"
            r = train(
                cfg,
                run_dir,
                overwrite=True,  # a rerun replaces its cells
                progress=False,
                dataset=seen,
                device=args.device,
            )
            row = score(r["model"], subset(seen, None, seed, args.test_limit), unseen)
            row = {
                "margin": margin,
                "seed": seed,
                "test_error": r["test_error"],
                "steps": r["step"],
                "final_lambda": r["lambda"],
                "seconds": r["seconds"],
                **row,
            }
            results.append(row)
            (run_dir / "quality.json").write_text(json.dumps(row, indent=2) + "\n")
            print(json.dumps(row), flush=True)
    total = time.perf_counter() - t_all
    info = {
        "recipe": args.recipe,
        "resolved": recipe,
        "args": vars(args),
        "results": results,
        "total_seconds": total,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} thread(s) per run, device {args.device}"
        + (
            f" ({torch.cuda.get_device_name(args.device)})"
            if args.device.startswith("cuda")
            else ""
        ),
        "command": "python benchmarks/accuracy.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    (out / "results.json").write_text(json.dumps(info, indent=2) + "\n")
    print_tables(results, unseen is not None)
    print(f"\ntotal {total:.0f} s on {info['machine']}")
    return 0


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def print_tables(results: list[dict[str, Any]], openset: bool) -> None:
    """Per-run rows, then per-margin means ± sample standard deviations over the seeds."""
    cols = ["margin", "seed", "test error (%)", "lambda at the end", "intra (deg)", "inter (deg)"]
    if openset:
        cols += ["unseen 1-NN (%)", "unseen TAR@FAR=1e-3 (%)"]
    print("\n| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for row in results:
        lam = "- (softmax)" if row["margin"] == 1 else f"{row['final_lambda']:.3g}"
        cells = [
            str(row["margin"]),
            str(row["seed"]),
            f"{100 * row['test_error']:.2f}",
            lam,
            f"{row['angle_intra']:.1f}",
            f"{row['angle_inter']:.1f}",
        ]
        if openset:
            cells += [f"{100 * row['openset_1nn']:.2f}", f"{100 * row['openset_tar']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    margins = sorted({row["margin"] for row in results})
    print(
        "\n| margin | seeds | test error (%), mean ± std | intra (deg) | inter (deg) |"
        + (" unseen 1-NN (%) |" if openset else "")
    )
    print("| --- | --- | --- | --- | --- |" + (" --- |" if openset else ""))
    for m in margins:
        rows = [r for r in results if r["margin"] == m]
        line = (
            f"| {m} | {len(rows)} | {_mean_std([100 * r['test_error'] for r in rows])} | "
            f"{_mean_std([r['angle_intra'] for r in rows])} | "
            f"{_mean_std([r['angle_inter'] for r in rows])} |"
        )
        if openset:
            line += f" {_mean_std([100 * r['openset_1nn'] for r in rows])} |"
        print(line)


if __name__ == "__main__":
    sys.exit(main())

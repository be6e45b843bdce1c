"""Accuracy table: softmax (margin 1) vs L-Softmax margins on Fashion-MNIST, same seeds/schedule.

Run from the repository root::

    python benchmarks/accuracy.py --out runs/accuracy            # the recorded configuration
    python benchmarks/accuracy.py --limit 2000 --epochs 1        # a quick smoke run

Each margin trains the same network (by default a narrow version of the paper's MNIST network,
see docs/accuracy.md for why) from the same seed with the same data order, learning-rate drops
and lambda schedule, then reports its test error. Results go to ``OUT/results.json`` and a
markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--margins", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--model", default="mnist_net")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage (paper: 64)")
    p.add_argument("--convs-per-stage", type=int, default=1, help="paper: 3")
    p.add_argument("--feat-dim", type=int, default=256, help="paper: 512")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--milestones", type=int, nargs="*", default=[2])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--limit", type=int, default=0, help="train samples (0, the default: all)")
    p.add_argument("--test-limit", type=int, default=None)
    # The paper's gamma (2.5e-5) keeps lambda ~ 1000 (plain softmax) for thousands of iterations;
    # gamma 1e-3 brings lambda below 1 after ~220 of the 1407 iterations (3 epochs of 60000).
    p.add_argument("--base", type=float, default=1000.0)
    p.add_argument("--gamma", type=float, default=1e-3)
    p.add_argument("--power", type=float, default=35.0)
    p.add_argument("--lambda-min", type=float, default=0.0)
    # One thread: on a shared, oversubscribed machine two OpenMP threads ran 9x slower per step.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/accuracy")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from lsoftmax.data import load_dataset
    from lsoftmax.schedules import Exponential
    from lsoftmax.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    schedule = Exponential(
        base=args.base, gamma=args.gamma, power=args.power, lambda_min=args.lambda_min
    )
    ds = load_dataset(args.dataset, args.data_dir)
    results = []
    t_all = time.perf_counter()
    for seed in args.seeds:
        for margin in args.margins:
            cfg = TrainConfig(
                dataset=args.dataset,
                data_dir=args.data_dir,
                model=args.model,
                margin=margin,
                schedule=schedule.to_dict(),
                model_overrides={
                    "width": args.width,
                    "convs_per_stage": args.convs_per_stage,
                    "feat_dim": args.feat_dim,
                },
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                weight_decay=args.weight_decay,
                milestones=list(args.milestones),
                seed=seed,
                limit=args.limit or None,
                test_limit=args.test_limit,
                threads=args.threads,
            )
            r = train(
                cfg,
                out / f"m{margin}_s{seed}",
                overwrite=True,  # a rerun replaces its cells
                progress=False,
                dataset=ds,
                save_checkpoints=False,
            )
            row = {
                "margin": margin,
                "seed": seed,
                "test_error": r["test_error"],
                "steps": r["step"],
                "final_lambda": r["lambda"],
                "seconds": r["seconds"],
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    total = time.perf_counter() - t_all
    info = {
        "args": vars(args),
        "schedule": schedule.to_dict(),
        "results": results,
        "total_seconds": total,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads",
        "command": "python benchmarks/accuracy.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    (out / "results.json").write_text(json.dumps(info, indent=2) + "\n")
    print("\n| margin | loss | seed | test error (%) | final lambda | time (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in results:
        name = "softmax" if row["margin"] == 1 else f"L-Softmax m={row['margin']}"
        lam = "-" if row["margin"] == 1 else f"{row['final_lambda']:.3g}"
        print(
            f"| {row['margin']} | {name} | {row['seed']} | {100 * row['test_error']:.2f} | "
            f"{lam} | {row['seconds']:.0f} |"
        )
    print(f"\ntotal {total:.0f} s on {info['machine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The logits GEMM in both orientations, x W^T and (W x^T)^T, side by side in one run, for the
class counts where torch's CPU GEMM changes paths (the orientation rule of
lsoftmax_core/torch/torch_ops.cc's plain_logits)."""

from __future__ import annotations

import argparse

import torch
from bench_layer import interleaved_times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--classes", default="8,10,12,16,32,64")
    ap.add_argument("--threads", default="1,0", help="comma-separated; 0: torch's default")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    print(f"N={args.n} D={args.d}, torch {torch.__version__}; microseconds per product, min of "
          f"{args.rounds} rounds taking turns (bench_layer.interleaved_times)")
    print("| C | threads | x W^T | (W x^T)^T contiguous | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads or default_threads)
        for c in (int(v) for v in args.classes.split(",")):
            x, w = torch.randn(args.n, args.d), torch.randn(c, args.d)
            cases = {
                "x W^T": lambda x=x, w=w: torch.mm(x, w.t()),
                "(W x^T)^T": lambda x=x, w=w: torch.mm(w, x.t()).t().contiguous(),
            }
            times = interleaved_times(
                cases, args.rounds, 1, torch.device("cpu"), block=max(3, 3000 // c)
            )
            a, b = 1e6 * min(times["x W^T"]), 1e6 * min(times["(W x^T)^T"])
            print(f"| {c} | {threads or default_threads} | {a:.1f} | {b:.1f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()

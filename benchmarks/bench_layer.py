"""Side-by-side cost of one training step (forward + backward, cross-entropy included).

Candidates, measured interleaved in one run:
  (a) ``nn.Linear(D, C, bias=False)`` + cross-entropy (the baseline every ratio refers to)
  (b) ``lsoftmax.torch.LSoftmaxLinear(D, C, margin=4)`` in training mode with a target
      + cross-entropy
  (c) ``pytorch_metric_learning.losses.LargeMarginSoftmaxLoss(C, D, margin=4)`` (optional:
      skipped with a note if the package is missing;
      ``pip install pytorch-metric-learning torch==2.13.0``)

The input x requires grad (as features coming out of a network do), so every candidate
computes grad_x and grad_W. Each timed sample is one step; candidates take turns in a rotating
order, so slow drifts in machine load hit all of them alike. The table gives medians and
ratios to (a).

Memory: "saved" is the memory an autograd graph keeps alive between forward and backward,
beyond the input x and the weight: the bytes of the distinct tensors the step's graph saves
for backward (through ``torch.autograd.graph.saved_tensors_hooks``) that are not x or the
weight. With ``--device cuda`` the table also gives the peak of ``torch.cuda.max_memory_allocated``
during a step, above the memory held before it.

A second table times a full training step (forward, cross-entropy, backward, SGD update) of the
narrow ``mnist_net`` (``--width 16 --convs-per-stage 1 --feat-dim 256``, 28x28 inputs) with
its L-Softmax head (margin 4) against the same network with a plain ``nn.Linear`` head.

The candidates take turns in one process, and with glibc's default settings malloc then hands
the top of its heap back to the kernel (and faults it back in) between them, in a pattern that
depends on the interleaving: at C = 10 it moved a ratio by up to 0.25 from run to run. A training
loop repeats one model and reaches a steady state without that churn, so by default the
benchmark fixes glibc's trim and mmap thresholds (``mallopt``) before the candidates allocate,
which gives every candidate that steady state; ``--default-malloc`` keeps glibc's defaults.

Both tables are printed for each thread setting of ``--threads`` (default ``1,0``: one thread,
then torch's default), in the same run.

    python benchmarks/bench_layer.py --device cpu --sizes 10,1000,10000 --repeats 100
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lsoftmax
from lsoftmax import core
from lsoftmax.torch import LSoftmaxLinear

Step = Callable[[], Tensor]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def train_step(module: nn.Module, x: Tensor, loss_fn: Step) -> None:
    for p in module.parameters():
        p.grad = None
    x.grad = None
    loss_fn().backward()


def saved_bytes(module: nn.Module, x: Tensor, loss_fn: Step) -> int:
    """Bytes of distinct tensors saved for backward, other than x and the module's parameters."""
    exclude = {t.untyped_storage().data_ptr() for t in (x, *module.parameters())}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(seen.values())


def cuda_peak_bytes(module: nn.Module, x: Tensor, loss_fn: Step) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_step(module, x, loss_fn)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# --clock: "wall" (time.perf_counter) is what users see; "cpu" (time.process_time, the CPU time
# of all of this process's threads) is far less disturbed by other jobs on a shared machine, and
# still counts threads that spin or compete.
CLOCK: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCK["wall"]


def interleaved_times(
    steps: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int,
    device: torch.device,
    block: int = 1,
) -> dict[str, list[float]]:
    """Seconds per call of each step, the candidates taking turns in a shuffled order; each
    sample times ``block`` calls in a row (for steps too short to time one at a time)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in steps.values():
            for _ in range(block):
                fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(names)
        for name in names:
            sync()
            t0 = _clock()
            for _ in range(block):
                steps[name]()
            sync()
            times[name].append((_clock() - t0) / block)
    return times


def auto_block(c: int) -> int:
    """Steps per timed sample: at small C a step is a fraction of a millisecond, and one step
    timed alone, right after another candidate's, measures that candidate's leftovers (its cache
    contents, the intra-op threads it left asleep) more than the step. Blocks of about 5 ms of
    (a) at N = 256, D = 512 time the steps back to back, as training runs them."""
    return max(1, 500 // max(c, 1))


def bench_size(
    n: int,
    d: int,
    c: int,
    margin: int,
    repeats: int,
    warmup: int,
    device: torch.device,
    block: int = 1,
) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    x = torch.randn(n, d, device=device, requires_grad=True)
    y = torch.randint(0, c, (n,), device=device)
    cands = build(n, d, c, margin, device, x, y)
    times = interleaved_times(
        {k: (lambda m=m, f=f: train_step(m, x, f)) for k, (m, f) in cands.items()},
        repeats,
        warmup,
        device,
        block=block,
    )
    out: dict[str, dict[str, float]] = {}
    for name, (module, fn) in cands.items():
        res = {
            "median_ms": 1e3 * statistics.median(times[name]),
            "q1_ms": 1e3 * float(np.percentile(times[name], 25)),
            "q3_ms": 1e3 * float(np.percentile(times[name], 75)),
            "saved_mib": saved_bytes(module, x, fn) / 2**20,
        }
        if device.type == "cuda":
            res["peak_mib"] = cuda_peak_bytes(module, x, fn) / 2**20
        out[name] = res
    return out


def build(
    n: int, d: int, c: int, margin: int, device: torch.device, x: Tensor, y: Tensor
) -> dict[str, tuple[nn.Module, Step]]:
    del n
    linear = nn.Linear(d, c, bias=False).to(device)
    lsm = LSoftmaxLinear(d, c, margin=margin).to(device).train()
    cands: dict[str, tuple[nn.Module, Step]] = {
        "(a) linear": (linear, lambda: F.cross_entropy(linear(x), y)),
        "(b) lsoftmax": (lsm, lambda: F.cross_entropy(lsm(x, y), y)),
    }
    try:
        from pytorch_metric_learning.losses import LargeMarginSoftmaxLoss
    except ImportError:
        print("note: pytorch_metric_learning not installed; (c) skipped", file=sys.stderr)
    else:
        pml = LargeMarginSoftmaxLoss(num_classes=c, embedding_size=d, margin=margin).to(device)
        cands["(c) pml"] = (pml, lambda: pml(x, y))
    return cands


class PlainHead(nn.Linear):
    """``nn.Linear`` (no bias) with the L-Softmax head's call signature (the target is unused)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        del target
        return super().forward(x)


def bench_mnist(
    batch: int, margin: int, repeats: int, warmup: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """A full SGD step of the narrow mnist_net with the L-Softmax head and with a linear head."""
    from lsoftmax.models import MNISTNet

    torch.manual_seed(0)
    narrow = {"width": 16, "convs_per_stage": 1, "feat_dim": 256}
    nets = {
        "linear head": MNISTNet(margin=margin, **narrow),
        "lsoftmax head": MNISTNet(margin=margin, **narrow),
    }
    nets["linear head"].head = PlainHead(narrow["feat_dim"], 10)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    steps: dict[str, Callable[[], None]] = {}
    for name, net in nets.items():
        net.to(device).train()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

        def step(net: Any = net, opt: Any = opt) -> None:
            opt.zero_grad(set_to_none=True)
            net.loss(x, y)[0].backward()
            opt.step()

        steps[name] = step
    times = interleaved_times(steps, repeats, warmup, device)
    return {
        k: {
            "median_ms": 1e3 * statistics.median(v),
            "q1_ms": 1e3 * float(np.percentile(v, 25)),
            "q3_ms": 1e3 * float(np.percentile(v, 75)),
        }
        for k, v in times.items()
    }


def profile_lsoftmax(n: int, d: int, c: int, margin: int, device: torch.device) -> str:
    x = torch.randn(n, d, device=device, requires_grad=True)
    y = torch.randint(0, c, (n,), device=device)
    module, fn = build(n, d, c, margin, device, x, y)["(b) lsoftmax"]
    for _ in range(3):
        train_step(module, x, fn)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(10):
            train_step(module, x, fn)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


NAMES = ("(a) linear", "(b) lsoftmax", "(c) pml")


def split_parts(
    n: int, d: int, c: int, margin: int, repeats: int, warmup: int
) -> list[tuple[str, float]]:
    """Microseconds per step of (a), (b) and of (b) with its layers peeled off one at a time
    (CPU, eager): the C++ op that (b)'s forward calls, without the module's Python; then without
    the schedule and step counter; then at margin 1 (the autograd node, its GEMMs and the
    forward's row stats, no margin terms). Blocks of steps, the parts taking turns in a shuffled
    order; the median of the blocks."""
    from lsoftmax.torch import ops

    if ops.SCHEDULED_MARGIN_LINEAR is None:
        raise SystemExit("--split needs the libtorch extension (lsoftmax/_torch_ops.so)")
    torch.manual_seed(0)
    x = torch.randn(n, d, requires_grad=True)
    y = torch.randint(0, c, (n,))
    linear = nn.Linear(d, c, bias=False)
    lsm = LSoftmaxLinear(d, c, margin=margin).train()
    w, step = lsm.weight, lsm.step
    kind, params = lsm.schedule.kind, lsm.schedule.params()
    scheduled, plain = ops.SCHEDULED_MARGIN_LINEAR, torch.ops.lsoftmax_cpu.margin_linear.default
    lam = lsm.schedule.value(0)
    parts: dict[str, Callable[[], Tensor]] = {
        "(a) nn.Linear + CE": lambda: F.cross_entropy(linear(x), y),
        "(b) LSoftmaxLinear + CE": lambda: F.cross_entropy(lsm(x, y), y),
        "(b)'s C++ op, called directly": lambda: F.cross_entropy(
            scheduled(x, w, y, margin, step, kind, params, True), y
        ),
        "... without schedule and counter": lambda: F.cross_entropy(plain(x, w, y, margin, lam), y),
        "... at margin 1 (no margin terms)": lambda: F.cross_entropy(plain(x, w, y, 1, lam), y),
    }
    times = interleaved_times(
        {k: (lambda f=f: train_step(lsm, x, f)) for k, f in parts.items()},
        repeats,
        warmup,
        torch.device("cpu"),
        block=max(4, 2000 // max(c, 1)),
    )
    return [(k, 1e6 * statistics.median(times[k])) for k in parts]


def print_split(parts: list[tuple[str, float]], c: int, threads: int) -> None:
    """The parts as a table; "adds" is what a row costs over the row below it (the last row:
    over (a)), i.e. what each peeled-off layer costs."""
    base = parts[0][1]
    print(f"\nwhere (b)'s time goes, C={c}, threads {threads} (microseconds per step)")
    print("| part | us | vs (a) | adds |")
    print("|---|---:|---:|---:|")
    for i, (name, us) in enumerate(parts):
        below = None if i == 0 else (parts[i + 1][1] if i + 1 < len(parts) else base)
        adds = "" if below is None else f"{us - below:+.1f}"
        print(f"| {name} | {us:.1f} | {us / base:.3f} | {adds} |")


def table_row(c: int, r: dict[str, dict[str, float]], device: torch.device) -> str:
    base = r[NAMES[0]]["median_ms"]

    def cell(name: str, key: str, fmt: str = "{:.3f}") -> str:
        return fmt.format(r[name][key]) if name in r else "n/a"

    def ratio(name: str) -> str:
        return f"{r[name]['median_ms'] / base:.2f}" if name in r else "n/a"

    times = " | ".join(
        f"{cell(k, 'median_ms')} [{cell(k, 'q1_ms', '{:.2f}')}-{cell(k, 'q3_ms', '{:.2f}')}]"
        for k in NAMES
    )
    mem = " / ".join(cell(k, "saved_mib", "{:.2f}") for k in NAMES)
    if device.type == "cuda":
        mem += " | " + " / ".join(cell(k, "peak_mib", "{:.2f}") for k in NAMES)
    return f"| {c} | {times} | {ratio(NAMES[1])} | {ratio(NAMES[2])} | {mem} |"


def kernel_route() -> str:
    from lsoftmax.torch import _kernels

    if _kernels.TORCH_OPS:
        return "libtorch extension (torch.ops.lsoftmax_cpu), loops on torch's intra-op pool"
    return "numpy module (lsoftmax._core), loops on the core's own pool"


def versions() -> dict[str, Any]:
    v: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "lsoftmax": getattr(lsoftmax, "__version__", "dev"),
    }
    try:
        import pytorch_metric_learning

        v["pytorch-metric-learning"] = pytorch_metric_learning.__version__
    except ImportError:
        v["pytorch-metric-learning"] = "not installed"
    return v


# glibc's mallopt parameters (malloc.h) and the values the benchmark fixes: the largest mmap
# threshold glibc accepts on 64-bit (32 MiB), and a trim threshold no step's frees reach.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_STEADY_TRIM, _STEADY_MMAP = 1 << 30, 32 << 20


def steady_malloc() -> str:
    """Fixes glibc's trim and mmap thresholds (see the module docs); says what it did."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default (no glibc mallopt)"
    ok = mallopt(_M_TRIM_THRESHOLD, _STEADY_TRIM) == 1 and mallopt(
        _M_MMAP_THRESHOLD, _STEADY_MMAP
    ) == 1
    if not ok:
        return "default (mallopt refused the thresholds)"
    return (
        f"steady (trim threshold {_STEADY_TRIM >> 20} MiB, "
        f"mmap threshold {_STEADY_MMAP >> 20} MiB)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", default="10,1000,10000", help="comma-separated class counts C")
    p.add_argument("--batch", type=int, default=256, help="N")
    p.add_argument("--features", type=int, default=512, help="D")
    p.add_argument("--margin", type=int, default=4)
    p.add_argument("--repeats", type=int, default=100, help="timed samples per candidate and size")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--block",
        type=int,
        default=0,
        help="steps per timed sample of the C table (0: max(1, 500 // C), see auto_block)",
    )
    p.add_argument(
        "--threads",
        default="1,0",
        help="comma-separated thread counts, each a full pass (0: torch's default)",
    )
    p.add_argument("--clock", choices=list(CLOCK), default="wall", help="see CLOCK (wall)")
    p.add_argument("--mnist-batch", type=int, default=128, help="batch of the mnist_net row")
    p.add_argument("--mnist-repeats", type=int, default=30, help="0 skips the mnist_net row")
    p.add_argument(
        "--split",
        action="store_true",
        help="after each size, time (b) with its layers peeled off one at a time (CPU)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after each size, print a torch.profiler table of (b)'s steps (where the time goes)",
    )
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's malloc thresholds (default: fixed, see the module docs)",
    )
    args = p.parse_args(argv)
    malloc_mode = "default (--default-malloc)" if args.default_malloc else steady_malloc()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available to torch")
    global _clock
    _clock = CLOCK[args.clock]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    default_threads = torch.get_num_threads()
    settings = [int(t) if int(t) > 0 else default_threads for t in args.threads.split(",") if t]

    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()}")
    if device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name()}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"lsoftmax CPU kernels: {kernel_route()}")
    print(f"malloc: {malloc_mode}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        f"N={args.batch} D={args.features} margin={args.margin} device={device} "
        f"repeats={args.repeats} warmup={args.warmup} clock={args.clock}; "
        "step = forward + cross-entropy + backward"
    )
    profiles: list[tuple[int, int, str]] = []
    splits: list[tuple[int, int, list[tuple[str, float]]]] = []
    for threads in settings:
        torch.set_num_threads(threads)
        core.set_num_threads(threads)
        print(f"\nthreads: {threads} (torch {torch.get_num_threads()}, default {default_threads})")
        mem_cols = "saved MiB (a/b/c)" + (
            " | CUDA peak MiB (a/b/c)" if device.type == "cuda" else ""
        )
        print(f"| C | (a) ms | (b) ms | (c) ms | (b)/(a) | (c)/(a) | {mem_cols} |")
        print("|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if device.type == "cuda" else ""))
        for c in sizes:
            block = args.block or auto_block(c)
            r = bench_size(
                args.batch, args.features, c, args.margin, args.repeats, args.warmup, device,
                block,
            )
            print(table_row(c, r, device), flush=True)
            if args.split and device.type == "cpu":
                splits.append((threads, c, split_parts(
                    args.batch, args.features, c, args.margin, args.repeats, args.warmup
                )))
            if args.profile:
                table = profile_lsoftmax(args.batch, args.features, c, args.margin, device)
                profiles.append((threads, c, table))
        if args.mnist_repeats > 0:
            r = bench_mnist(args.mnist_batch, args.margin, args.mnist_repeats, args.warmup, device)
            lin, lsm = r["linear head"], r["lsoftmax head"]
            print(
                f"\nmnist_net (narrow) SGD step, batch {args.mnist_batch}, threads {threads}: "
                f"linear head {lin['median_ms']:.2f} ms [{lin['q1_ms']:.2f}-{lin['q3_ms']:.2f}], "
                f"lsoftmax head {lsm['median_ms']:.2f} ms [{lsm['q1_ms']:.2f}-{lsm['q3_ms']:.2f}], "
                f"ratio {lsm['median_ms'] / lin['median_ms']:.3f}",
                flush=True,
            )
    torch.set_num_threads(default_threads)
    for threads, c, parts in splits:
        print_split(parts, c, threads)
    for threads, c, table in profiles:
        print(f"\ntorch.profiler, (b) at C={c}, {threads} threads, 10 steps:\n{table}")
    print()
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        "times: median [quartiles] of the samples, per step; a sample of the C table times "
        + (f"{args.block} steps" if args.block else "max(1, 500 // C) steps")
        + " back to back (--block)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

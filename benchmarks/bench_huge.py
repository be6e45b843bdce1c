"""Peak memory and time of one forward + backward of a classification loss with many classes.

    python benchmarks/bench_huge.py                       # C in 1e4 1e5 1e6, 1 thread and default
    python benchmarks/bench_huge.py --classes 10000 --threads 1
    python benchmarks/bench_huge.py --sharded 4 --classes 100000   # class-sharded over 4 gloo ranks
    python benchmarks/bench_huge.py --split --classes 100000 --threads 1   # where the time goes

Methods (N=256, D=512, float32, CPU): ``linear`` nn.Linear + F.cross_entropy (the baseline),
``layer`` our unfused LSoftmaxLinear + F.cross_entropy, ``fused`` margin_cross_entropy
(L-Softmax, margin 4, lambda 1), ``fused-arcface`` margin_cross_entropy with ArcFace(0.5, 64)
(normalized features and weights), and pytorch-metric-learning's ``pml-lsoftmax``
(LargeMarginSoftmaxLoss, margin 4) and ``pml-arcface`` (ArcFaceLoss) when it is installed
(``pip install .[bench]``).

Each (method, C, threads) runs in a fresh subprocess, so its peak is its own: peak memory is
``ru_maxrss`` after the first step minus ``ru_maxrss`` after the inputs and the weight exist, the
process having run one warm-up step at 512 classes (so that loading code pages is not counted)
(tracemalloc does not see torch's allocations; RSS does, and torch's CPU allocator returns large
blocks to the OS, so the first step's peak is the step's working set). ``beyond grad W``
subtracts the C x D weight gradient that every method must produce (what Cut Cross-Entropy
calls the memory of the loss). Time: median of the steps after a warm-up step. Ratios are
against ``linear`` measured in the same run and thread setting.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

N, D, MARGIN, LAM = 256, 512, 4, 1.0
METHODS = ("linear", "layer", "fused", "fused-arcface", "pml-lsoftmax", "pml-arcface")
MiB = 1024 * 1024
_PML_TENSORS = 10
_WARM_CLASSES = 512


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _step_fn(method: str, classes: int):
    import torch
    import torch.nn.functional as F

    from lsoftmax.schedules import Constant
    from lsoftmax.torch import LSoftmaxLinear
    from lsoftmax.torch.functional import margin_cross_entropy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, classes, (N,), generator=g)
    if method == "linear":
        mod: Any = torch.nn.Linear(D, classes, bias=False)
        return mod.weight, lambda: F.cross_entropy(mod(x), y)
    if method == "layer":
        mod = LSoftmaxLinear(D, classes, MARGIN, Constant(LAM))
        return mod.weight, lambda: F.cross_entropy(mod(x, y), y)
    if method in ("fused", "fused-arcface"):
        # Filled in place: a temporary C x D tensor here would raise ru_maxrss before the step
        # and hide the step's own peak.
        w = torch.nn.Parameter(torch.empty(classes, D))
        torch.nn.init.normal_(w, 0.0, 0.05, generator=g)
        if method == "fused-arcface":
            from lsoftmax.margins import ArcFace

            spec = ArcFace(0.5, 64.0)
            return w, lambda: margin_cross_entropy(x, w, y, spec)
        return w, lambda: margin_cross_entropy(x, w, y, MARGIN, lam=LAM)
    from pytorch_metric_learning import losses

    if method == "pml-lsoftmax":
        mod = losses.LargeMarginSoftmaxLoss(num_classes=classes, embedding_size=D, margin=MARGIN)
    else:
        mod = losses.ArcFaceLoss(num_classes=classes, embedding_size=D)
    return mod.W, lambda: mod(x, y)


def run_case(method: str, classes: int, threads: int | None, reps: int) -> dict[str, Any]:
    """One case in this process (the parent runs each in its own subprocess)."""
    import torch

    from lsoftmax import core

    if threads is not None:
        torch.set_num_threads(threads)
        core.set_num_threads(threads)
    # A warm-up step at a small class count first: the first call of a code path faults in the
    # library pages it runs (tens of MiB of libtorch for autograd, linalg and dtype kernels),
    # which ru_maxrss counts but which are no working set of the step at this C.
    w_small, warm = _step_fn(method, _WARM_CLASSES)
    warm().backward()
    del w_small, warm
    weight, loss_fn = _step_fn(method, classes)
    before = _maxrss()
    times = []
    for i in range(reps + 1):
        weight.grad = None
        t0 = time.perf_counter()
        loss_fn().backward()
        dt = time.perf_counter() - t0
        if i == 0:
            peak = _maxrss() - before
        else:
            times.append(dt)
    grad_bytes = weight.numel() * weight.element_size()
    return {
        "method": method,
        "classes": classes,
        "threads": threads or torch.get_num_threads(),
        "peak_mib": peak / MiB,
        "beyond_grad_mib": max(peak - grad_bytes, 0) / MiB,
        "seconds": statistics.median(times),
    }


def _subprocess(args: list[str]) -> dict[str, Any] | None:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        print(f"  case {args} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pml_available() -> bool:
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        return False
    return True


def _pml_fits(classes: int, budget_gib: float) -> bool:
    # Its losses build several N x C float32 tensors (cosines, angles, margins, softmax, grads):
    # about 10 of them at peak (measured at C = 1e5: 800 - 1000 MiB beyond grad W).
    return _PML_TENSORS * N * classes * 4 / 2**30 <= budget_gib


def main_single(a: argparse.Namespace) -> None:
    import torch

    thread_settings: list[int | None] = (
        [a.threads] if a.threads is not None else [1, None]  # None: the default
    )
    methods = list(a.methods)
    if not _pml_available():
        methods = [m for m in methods if not m.startswith("pml")]
        print("pytorch-metric-learning not installed: its losses are skipped")
    print(f"N={N}, D={D}, float32, margin {MARGIN}, lambda {LAM}; "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, default threads "
          f"{torch.get_num_threads()}; {_load()}")
    header = (f"{'C':>9} {'threads':>7} {'method':>13} {'peak MiB':>9} {'beyond gW':>10} "
              f"{'mem ratio':>9} {'seconds':>8} {'time ratio':>10}")
    print(header)
    for classes in a.classes:
        for threads in thread_settings:
            rows = []
            for m in methods:
                if m.startswith("pml") and not _pml_fits(classes, a.pml_budget_gib):
                    print(f"{classes:>9} {'':>7} {m:>13}  not run: needs about "
                          f"{_PML_TENSORS * N * classes * 4 / 2**30:.1f} GiB (> --pml-budget-gib)")
                    continue
                reps = a.reps if classes < 1_000_000 else max(1, a.reps // 2)
                args = ["--case", m, "--classes", str(classes), "--reps", str(reps)]
                if threads is not None:
                    args += ["--threads", str(threads)]
                res = _subprocess(args)
                if res is not None:
                    rows.append(res)
            base = next((r for r in rows if r["method"] == "linear"), None)
            for r in rows:
                # RSS moves in pages and the allocator's arenas: below ~1 MiB a working set is
                # noise, so the ratio is against at least 1 MiB (printed as ">=").
                floor = r["beyond_grad_mib"] < 1.0
                mem_ratio = base["beyond_grad_mib"] / max(r["beyond_grad_mib"], 1.0) if base \
                    else float("nan")
                time_ratio = r["seconds"] / base["seconds"] if base else float("nan")
                ratio = f"{'>=' if floor else ''}{mem_ratio:.1f}x"
                print(f"{classes:>9} {r['threads']:>7} {r['method']:>13} {r['peak_mib']:>9.1f} "
                      f"{r['beyond_grad_mib']:>10.1f} {ratio:>9} {r['seconds']:>8.3f} "
                      f"{time_ratio:>9.2f}x", flush=True)
    print(f"done; {_load()}")


# --- where the fused loss's time goes ---------------------------------------------------------


def main_split(a: argparse.Namespace) -> None:
    """Times the parts of one fused step against nn.Linear + CE, in one process and thread."""
    import torch
    import torch.nn.functional as F

    from lsoftmax import _core, core
    from lsoftmax.torch import _kernels
    from lsoftmax.torch.functional import margin_cross_entropy
    from lsoftmax.torch.fused import default_chunk_size

    threads = a.threads or 1
    torch.set_num_threads(threads)
    core.set_num_threads(threads)
    classes = a.classes[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, classes, (N,), generator=g)
    w = torch.nn.Parameter(torch.randn(classes, D, generator=g) * 0.05)
    wd = w.detach()
    chunk = default_chunk_size(N, classes)
    starts = range(0, classes, chunk)
    buf = torch.empty(N * chunk)
    block = torch.randn(N, chunk, generator=g)
    stats = [torch.zeros(N, dtype=torch.float64) for _ in range(3)]
    target, scale = torch.zeros(N), torch.ones(N)

    def linear() -> None:
        w.grad = None
        F.cross_entropy(x @ w.t(), y).backward()

    def fused() -> None:
        w.grad = None
        margin_cross_entropy(x, w, y, MARGIN, lam=LAM).backward()

    def one_gemm() -> None:
        torch.mm(x, wd.t())

    def four_gemms() -> None:
        # The fused step's GEMMs alone: the forward's block logits, then the backward's
        # recomputed block and its two gradient GEMMs.
        gx, gw = torch.zeros(N, D), torch.empty(classes, D)
        for c0 in starts:
            wb = wd[c0 : c0 + chunk]
            torch.mm(x, wb.t(), out=buf[: N * wb.shape[0]].view(N, -1))
        for c0 in starts:
            wb = wd[c0 : c0 + chunk]
            b = torch.mm(x, wb.t(), out=buf[: N * wb.shape[0]].view(N, -1))
            gx.addmm_(b, wb)
            torch.mm(b.t(), x, out=gw[c0 : c0 + chunk])

    def lse_kernel() -> None:
        for c0 in starts:
            _core.fused_lse_block_(block.numpy(), y.numpy(), c0, target.numpy(),
                                   stats[0].numpy(), stats[1].numpy(),
                                   torch_pool=_kernels.TORCH_OPS)

    def grad_kernel() -> None:
        for c0 in starts:
            _core.fused_grad_block_(block.numpy(), y.numpy(), c0, target.numpy(),
                                    stats[2].numpy(), scale.numpy(), torch_pool=_kernels.TORCH_OPS)

    parts = {"nn.Linear + CE (3 GEMMs + CE)": linear, "fused step": fused,
             "one N x C GEMM (x @ W.T)": one_gemm, "the fused step's 4 blocked GEMMs": four_gemms,
             "log-sum-exp kernel, all blocks": lse_kernel,
             "softmax-gradient kernel, all blocks": grad_kernel}
    times: dict[str, list[float]] = {k: [] for k in parts}
    for fn in parts.values():
        fn()  # warm-up
    for _ in range(a.reps):  # interleaved, so that load drifts hit every part alike
        for k, fn in parts.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["nn.Linear + CE (3 GEMMs + CE)"])
    print(f"N={N}, D={D}, C={classes}, float32, {threads} thread(s), blocks of {chunk} classes; "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}; {_load()}")
    print(f"{'part':>36} {'seconds':>8} {'vs linear':>9}")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"{k:>36} {m:>8.3f} {m / base:>8.2f}x")
    print(f"done; {_load()}")


# --- class-sharded over gloo ranks ------------------------------------------------------------


def _sharded_worker(rank: int, world: int, port: int, classes: int, reps: int, q: Any) -> None:
    import torch
    import torch.distributed as dist

    from lsoftmax import core
    from lsoftmax.schedules import Constant
    from lsoftmax.torch.distributed import ShardedMarginHead

    torch.set_num_threads(1)
    core.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    head = ShardedMarginHead(D, classes, MARGIN, Constant(LAM))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(N // world, D, generator=g)
    y = torch.randint(0, classes, (N // world,), generator=g)
    times = []
    for i in range(reps + 1):
        head.weight.grad = None
        dist.barrier()
        t0 = time.perf_counter()
        head(x, y).backward()
        dist.barrier()
        if i:
            times.append(time.perf_counter() - t0)
    w_bytes = head.weight.numel() * head.weight.element_size()
    q.put({"rank": rank, "weight_mib": w_bytes / MiB, "seconds": statistics.median(times),
           "maxrss_mib": _maxrss() / MiB})
    dist.destroy_process_group()


def main_sharded(a: argparse.Namespace) -> None:
    import torch.multiprocessing as mp

    world = a.sharded
    print(f"class-sharded head over {world} gloo ranks (1 thread each), global N={N}, D={D}, "
          f"float32; {os.cpu_count()} CPUs; {_load()}")
    print(f"{'C':>9} {'W MiB/rank':>11} {'W MiB total':>11} {'step s':>8} {'samples/s':>10} "
          f"{'1-process fused s':>17} {'samples/s':>10}")
    ctx = mp.get_context("spawn")
    for classes in a.classes:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        q = ctx.Queue()
        procs = [ctx.Process(target=_sharded_worker, args=(r, world, port, classes, a.reps, q))
                 for r in range(world)]
        for p in procs:
            p.start()
        res = [q.get() for _ in procs]
        for p in procs:
            p.join()
        step = max(r["seconds"] for r in res)
        per_rank = max(r["weight_mib"] for r in res)
        total = classes * D * 4 / MiB
        # The same step in one process holding the whole weight (fused loss, 1 thread), in the
        # same run: what the sharded throughput compares with.
        single = _subprocess(["--case", "fused", "--classes", str(classes), "--reps",
                              str(a.reps), "--threads", "1"])
        one = single["seconds"] if single else float("nan")
        print(f"{classes:>9} {per_rank:>11.1f} {total:>11.1f} {step:>8.3f} {N / step:>10.1f} "
              f"{one:>17.3f} {N / one:>10.1f}", flush=True)
    print(f"done; {_load()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--threads", type=int, default=None, help="one setting (default: 1 and default)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--pml-budget-gib", type=float, default=6.0,
                   help="skip pytorch-metric-learning cases that need more than this")
    p.add_argument("--sharded", type=int, default=None, metavar="WORLD",
                   help="run the class-sharded head over WORLD gloo ranks instead")
    p.add_argument("--split", action="store_true",
                   help="time the parts of the fused step (GEMMs, kernels) at the first --classes")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.split:
        main_split(a)
    elif a.case is not None:
        print(json.dumps(run_case(a.case, a.classes[0], a.threads, a.reps)))
    elif a.sharded:
        main_sharded(a)
    else:
        main_single(a)


if __name__ == "__main__":
    main()

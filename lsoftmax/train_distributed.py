"""``lsoftmax train --nproc N``: DDP backbone + class-sharded L-Softmax head on N gloo processes.

The N ranks run on this machine (``torch.multiprocessing``, ``tcp://127.0.0.1``). Every global
batch of ``--batch-size`` samples (the same order as a single-process run: ``_batches``) is split
into N parts; the backbone is ``DistributedDataParallel`` and the head is
``lsoftmax.torch.distributed.ShardedMarginHead`` (about C / N classes per rank), so the
gradients are those of the mean loss over the global batch, as in a single-process run. Rank 0
shows the progress bar and writes ``config.json``, ``metrics.jsonl``, ``final.json``, the
backbone (``body.pt``) and the whole head weight (``head.pt``, ``save_sharded``'s format).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lsoftmax.train import METRICS, TrainConfig, _batches

__all__ = ["train_distributed"]

BODY, HEAD = "body.pt", "head.pt"


class _Body(nn.Module):
    """The model's feature extractor as the module DDP wraps (the head is not part of it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.features(x)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_distributed(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    nproc: int,
    progress: bool | None = None,
    sample_rate: float = 1.0,
    log: Any = print,
) -> dict[str, Any]:
    """Train ``cfg`` on ``nproc`` local gloo ranks into ``out_dir``; returns ``final.json``."""
    import torch.multiprocessing as mp

    cfg.validate()
    if cfg.loss != "lsoftmax":
        raise ValueError("distributed training supports the L-Softmax head (--loss lsoftmax)")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive int, got {nproc!r}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if cfg.batch_size < nproc:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be >= nproc ({nproc})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(
        _worker,
        args=(nproc, _free_port(), asdict(cfg), str(out), progress, sample_rate),
        nprocs=nproc,
        join=True,
    )
    summary = json.loads((out / "final.json").read_text())
    if log:
        log(
            f"test accuracy {summary['test_acc']:.4f} (error {summary['test_error']:.4f}) on "
            f"{nproc} ranks; run directory {out}"
        )
    return summary


def _evaluate(body: nn.Module, head: Any, x: Tensor, y: Tensor, rank: int, world: int) -> float:
    """Accuracy on (x, y): each rank classifies its slice; the head's arg-max is collective."""
    body.eval()
    head.eval()
    correct = torch.zeros((), dtype=torch.int64)
    with torch.no_grad():
        for idx in torch.arange(len(y)).split(500):
            part = idx.tensor_split(world)[rank]
            pred = head.predict(body(x[part]))
            correct += (pred == y[part]).sum()
    dist.all_reduce(correct)
    body.train()
    head.train()
    return int(correct) / max(len(y), 1)


def _worker(
    rank: int,
    world: int,
    port: int,
    cfg_dict: dict[str, Any],
    out_dir: str,
    progress: bool | None,
    sample_rate: float,
) -> None:
    from tqdm.auto import tqdm

    from lsoftmax import core
    from lsoftmax.data import load_dataset, subset
    from lsoftmax.models import build_model
    from lsoftmax.schedules import schedule_from_dict
    from lsoftmax.torch.distributed import ShardedMarginHead, save_sharded

    cfg = TrainConfig(**cfg_dict)
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    core.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.manual_seed(cfg.seed)  # the same initial model on every rank
        ds = subset(load_dataset(cfg.dataset, cfg.data_dir), cfg.limit, cfg.seed, cfg.test_limit)
        model = build_model(cfg.model_name(), **cfg.model_kwargs(ds))
        head = ShardedMarginHead(
            model.feat_dim, ds.num_classes, cfg.margin, schedule_from_dict(cfg.schedule),
            sample_rate=sample_rate, seed=cfg.seed,
        )
        with torch.no_grad():  # the single-process model's initial head, split
            head.weight.copy_(model.head.weight[head.class_begin : head.class_end])
        model.head = nn.Identity()
        body = nn.parallel.DistributedDataParallel(_Body(model))
        groups = model.param_groups(cfg.lr, cfg.weight_decay)
        groups.append({"params": [head.weight], "lr": cfg.lr, "weight_decay": cfg.weight_decay})
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=cfg.milestones, gamma=cfg.lr_gamma
        )
        out = Path(out_dir)
        if rank == 0:
            (out / "config.json").write_text(
                json.dumps({**asdict(cfg), "nproc": world, "sample_rate": sample_rate}, indent=2)
                + "\n"
            )
            (out / METRICS).unlink(missing_ok=True)
        n = len(ds.y_train)
        t_start = time.perf_counter()
        for epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            # Global batches smaller than the world would leave a rank without rows.
            batches = [b for b in _batches(n, cfg.batch_size, cfg.seed, epoch) if len(b) >= world]
            bar = tqdm(
                batches,
                desc=f"epoch {epoch + 1}/{cfg.epochs} ({world} ranks)",
                disable=rank != 0 or ((not progress) if progress is not None else None),
                leave=False,
                dynamic_ncols=True,
            )
            loss_sum, seen = torch.zeros((), dtype=torch.float64), 0
            for idx in bar:
                part = idx.tensor_split(world)[rank]
                loss = head(body(ds.x_train[part]), ds.y_train[part])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(part)
                seen += len(idx)
                bar.set_postfix(lam=f"{head.current_lambda:.4g}")
            bar.close()
            dist.all_reduce(loss_sum)
            lr = opt.param_groups[0]["lr"]
            sched.step()
            test_acc = _evaluate(body, head, ds.x_test, ds.y_test, rank, world)
            record = {
                "epoch": epoch + 1,
                "step": int(head.step),
                "lr": lr,
                "lambda_last": head.current_lambda,
                "train_loss": float(loss_sum) / max(seen, 1),
                "test_acc": test_acc,
                "seconds": time.perf_counter() - t0,
            }
            if rank == 0:
                with open(out / METRICS, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(
                    f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f}, "
                    f"test acc {test_acc:.4f}, lambda {record['lambda_last']:.4g}",
                    flush=True,
                )
        test_acc = _evaluate(body, head, ds.x_test, ds.y_test, rank, world)
        save_sharded(head, str(out / HEAD))
        if rank == 0:
            torch.save(model.state_dict(), out / BODY)
            summary = {
                "test_acc": test_acc,
                "test_error": 1.0 - test_acc,
                "epochs": cfg.epochs,
                "nproc": world,
                "step": int(head.step),
                "seconds": time.perf_counter() - t_start,
                "body": str(out / BODY),
                "head": str(out / HEAD),
            }
            (out / "final.json").write_text(json.dumps(summary, indent=2) + "\n")
        dist.barrier()
    finally:
        dist.destroy_process_group()

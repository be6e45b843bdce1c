"""The training loop behind ``lsoftmax train``: SGD + momentum, multistep LR, checkpoints, metrics.

A run directory holds ``config.json`` (the full configuration), ``metrics.jsonl`` (one JSON
object per epoch), ``checkpoint.pt`` (the latest epoch: model, optimizer, LR scheduler, epoch,
config) and ``final.json`` (test accuracy at the end). Resuming from a checkpoint continues the
same lambda sequence because the schedule's step counter is the ``step`` buffer of the
L-Softmax head, saved in the model's ``state_dict``; the data order of each epoch depends only on
``(seed, epoch)``, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lsoftmax.data import Dataset, load_dataset, subset
from lsoftmax.models import MarginClassifier, build_model, model_kwargs_for
from lsoftmax.schedules import Constant, Exponential, Scaled, Schedule

__all__ = [
    "TrainConfig",
    "default_model",
    "evaluate",
    "make_schedule",
    "train",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def default_model(dataset: str) -> str:
    """The model ``lsoftmax train`` picks when ``--model`` is not given."""
    return "mlp" if dataset == "digits" else "mnist_net"


def make_schedule(kind: str, **params: float | None) -> Schedule:
    """A schedule from CLI-style parameters; ``None`` means the schedule's default."""
    given = {k: v for k, v in params.items() if v is not None}
    if kind == "exponential":
        keys = ("base", "gamma", "power", "lambda_min")
        return Exponential(**{k: float(given[k]) for k in keys if k in given})
    if kind == "scaled":
        keys = ("beta", "scale", "beta_min")
        return Scaled(**{k: float(given[k]) for k in keys if k in given})
    if kind == "constant":
        return Constant(float(given.get("value", 0.0)))
    raise ValueError(f"schedule must be exponential, scaled or constant, got {kind!r}")


@dataclass
class TrainConfig:
    """Everything that defines a run (saved as ``config.json`` and in every checkpoint)."""

    dataset: str = "digits"
    data_dir: str | None = None
    model: str | None = None
    loss: str = "lsoftmax"
    margin: int = 4
    schedule: dict[str, Any] = field(default_factory=lambda: Exponential().to_dict())
    model_overrides: dict[str, Any] = field(default_factory=dict)
    lgm: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    seed: int = 0
    limit: int | None = None
    test_limit: int | None = None
    threads: int | None = None

    def validate(self) -> None:
        if self.loss not in ("lsoftmax", "lgm"):
            raise ValueError(f"loss must be 'lsoftmax' or 'lgm', got {self.loss!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 1:
            raise ValueError(f"margin must be an integer >= 1, got {self.margin!r}")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("limit", "test_limit", "threads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "momentum", "weight_decay", "lr_gamma"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if any(m < 1 for m in self.milestones) or sorted(self.milestones) != self.milestones:
            raise ValueError(
                f"milestones must be increasing positive epochs, got {self.milestones}"
            )

    def model_name(self) -> str:
        return self.model or default_model(self.dataset)

    def model_kwargs(self, ds: Dataset) -> dict[str, Any]:
        head: dict[str, Any]
        if self.loss == "lgm":
            head = {"head": "lgm", **self.lgm}
        else:
            head = {"head": "lsoftmax", "margin": self.margin, "schedule": dict(self.schedule)}
        return model_kwargs_for(
            self.model_name(), ds.input_shape, ds.num_classes, **head, **self.model_overrides
        )


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    # The order depends only on (seed, epoch): a resumed run replays the same batches.
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return list(perm.split(batch_size))


@torch.no_grad()
def evaluate(
    model: MarginClassifier, x: Tensor, y: Tensor, batch_size: int = 500
) -> tuple[float, float]:
    """Plain-logit (inference) cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        logits = model(x[i : i + batch_size])
        yb = y[i : i + batch_size]
        total_loss += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    n = max(len(y), 1)
    return total_loss / n, correct / n


def _make_optimizer(
    model: MarginClassifier, cfg: TrainConfig
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR]:
    groups = model.param_groups(cfg.lr, cfg.weight_decay)
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.milestones, gamma=cfg.lr_gamma)
    return opt, sched


def _save(
    path: Path,
    model: MarginClassifier,
    cfg: TrainConfig,
    model_kwargs: dict[str, Any],
    input_shape: Sequence[int],
    epoch: int,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    from lsoftmax.checkpoint import save_checkpoint

    extra = {
        "epoch": epoch,
        "config": asdict(cfg),
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "input_shape": [int(v) for v in input_shape],
        "dtype": "float32",
        "schedule_step": model.step,
    }
    tmp = path.with_name(path.name + ".tmp")
    save_checkpoint(tmp, cfg.model_name(), model_kwargs, model, extra)
    tmp.replace(path)


def _load_resume(path: Path) -> tuple[MarginClassifier, dict[str, Any]]:
    from lsoftmax.checkpoint import load_model

    model, meta = load_model(path)
    extra = meta.get("extra", meta)
    for key in ("config", "epoch", "optimizer"):
        if key not in extra:
            raise ValueError(f"{path}: not a training checkpoint (no {key!r}); cannot resume")
    return model, extra


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: str | Path | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = print,
    dataset: Dataset | None = None,
    save_checkpoints: bool = True,
) -> dict[str, Any]:
    """Train (or resume) a run into ``out_dir``; returns the final summary (also ``final.json``).

    With ``resume``, the configuration comes from the checkpoint except ``cfg.epochs`` (the total
    number of epochs; 0 keeps the saved one); training continues after the saved epoch.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    start_epoch = 0
    resumed: dict[str, Any] | None = None
    model: MarginClassifier | None = None
    if resume is not None:
        model, resumed = _load_resume(Path(resume))
        epochs = cfg.epochs
        cfg = TrainConfig(**resumed["config"])
        if epochs:  # 0 keeps the saved number of epochs
            cfg.epochs = epochs
        start_epoch = int(resumed["epoch"])
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    ds = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_dir)
    ds = subset(ds, cfg.limit, cfg.seed, cfg.test_limit)
    model_kwargs = cfg.model_kwargs(ds)
    if model is None:
        model = build_model(cfg.model_name(), **model_kwargs)
    model.train()
    opt, sched = _make_optimizer(model, cfg)
    if resumed is not None:
        opt.load_state_dict(resumed["optimizer"])
        sched.load_state_dict(resumed["lr_scheduler"])

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    metrics_path = out / METRICS
    if resumed is None and metrics_path.exists():
        metrics_path.unlink()
    n = len(ds.y_train)
    if log:
        log(
            f"training {cfg.model_name()} ({cfg.loss}, margin {cfg.margin}) on {ds.name}: "
            f"{n} train / {len(ds.y_test)} test samples, epochs {start_epoch + 1}..{cfg.epochs}"
        )
    t_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        batches = _batches(n, cfg.batch_size, cfg.seed, epoch)
        bar = tqdm(
            batches,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=(not progress) if progress is not None else None,
            leave=False,
            dynamic_ncols=True,
        )
        loss_sum, correct, seen = 0.0, 0, 0
        lambdas: list[float] = []
        for idx in bar:
            xb, yb = ds.x_train[idx], ds.y_train[idx]
            loss, logits = model.loss(xb, yb)
            if not torch.isfinite(loss.detach()):
                raise RuntimeError(
                    f"loss became {float(loss.detach())} at epoch {epoch + 1}; lower --lr or "
                    "raise the schedule's lambda_min"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
            lam = model.current_lambda
            if lam is not None:
                lambdas.append(lam)
            bar.set_postfix(
                loss=f"{loss_sum / seen:.4f}",
                acc=f"{correct / seen:.3f}",
                lam="-" if lam is None else f"{lam:.4g}",
            )
        bar.close()
        lr = opt.param_groups[0]["lr"]
        sched.step()
        test_loss, test_acc = evaluate(model, ds.x_test, ds.y_test)
        model.train()
        record = {
            "epoch": epoch + 1,
            "step": model.step,
            "lr": lr,
            "lambda_first": lambdas[0] if lambdas else None,
            "lambda_last": lambdas[-1] if lambdas else None,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "test_loss": test_loss,
            "test_acc": test_acc,
            "seconds": time.perf_counter() - t0,
        }
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if save_checkpoints:
            _save(out / CHECKPOINT, model, cfg, model_kwargs, ds.input_shape, epoch + 1, opt, sched)
        if log:
            lam_s = "" if record["lambda_last"] is None else f", lambda {record['lambda_last']:.4g}"
            log(
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f}, "
                f"train acc {record['train_acc']:.4f}, test acc {test_acc:.4f}{lam_s}"
            )
    _, test_acc = evaluate(model, ds.x_test, ds.y_test)
    summary = {
        "test_acc": test_acc,
        "test_error": 1.0 - test_acc,
        "epochs": cfg.epochs,
        "step": model.step,
        "lambda": model.current_lambda,
        "seconds": time.perf_counter() - t_start,
        "checkpoint": str(out / CHECKPOINT),
    }
    (out / "final.json").write_text(json.dumps(summary, indent=2) + "\n")
    if log:
        log(f"test accuracy {test_acc:.4f} (error {1 - test_acc:.4f}); run directory {out}")
    return {**summary, "model": model}

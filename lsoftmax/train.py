"""The training loop behind ``lsoftmax train``: SGD + momentum, multistep LR, checkpoints, metrics.

A run directory holds ``config.json`` (the full configuration), ``metrics.jsonl`` (one JSON
object per epoch), ``checkpoint.pt`` (the latest epoch: model, optimizer, LR scheduler, epoch,
config) and ``final.json`` (test accuracy at the end). Resuming from a checkpoint continues the
same lambda sequence because the schedule's step counter is the ``step`` buffer of the
L-Softmax head, saved in the model's ``state_dict``, and it counts optimizer steps (the head is
``attach``ed to the optimizer, as Caffe counts solver iterations); the data order of each epoch
depends only on ``(seed, epoch)``, so a resumed run sees the same batches as an uninterrupted one.

A new run refuses a directory that already holds a run (``overwrite=True`` clears it first), and
an epoch's metrics line and checkpoint are written together with SIGINT held back, so Ctrl-C
never leaves a half-written ``checkpoint.pt.tmp`` or a metrics line the checkpoint lacks.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lsoftmax import _core
from lsoftmax.data import Dataset, load_dataset, subset
from lsoftmax.models import MarginClassifier, build_model, model_kwargs_for
from lsoftmax.schedules import Constant, Exponential, Onset, Scaled, Schedule
from lsoftmax.torch.scheduled import ScheduledStep

__all__ = [
    "TrainConfig",
    "default_lr",
    "default_model",
    "evaluate",
    "make_schedule",
    "torch_device",
    "train",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
# What a run writes into its directory (and what overwrite=True removes).
RUN_FILES = ("config.json", METRICS, CHECKPOINT, CHECKPOINT + ".tmp", "final.json")


def torch_device(name: str) -> torch.device:
    """``"cpu"`` or ``"cuda"`` as a torch device; ``ValueError`` if it cannot be used here."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no GPU found"
            raise ValueError(f"CUDA is not available to torch ({build}); use --device cpu")
        return torch.device("cuda")
    raise ValueError(f"device must be 'cpu' or 'cuda', got {name!r}")


def default_model(dataset: str) -> str:
    """The model ``lsoftmax train`` picks when ``--model`` is not given."""
    return "mlp" if dataset == "digits" else "mnist_net"


# The base LR when none is given. feat2d_net's 2-unit feature layer has no normalization after
# it, and at 0.1 both heads blow up in the first epoch on digits (L-GM: non-finite log-variance;
# softmax: NaN loss); 0.01 trains both.
DEFAULT_LR = 0.1
MODEL_DEFAULT_LR = {"feat2d_net": 0.01}


def default_lr(model: str) -> float:
    """The learning rate a run of ``model`` gets when ``lr`` is not given."""
    return MODEL_DEFAULT_LR.get(model, DEFAULT_LR)


_SCHEDULE_PARAMS = {
    "onset": ("reach", "at", "warmup", "base", "lambda_min"),
    "exponential": ("base", "gamma", "power", "lambda_min"),
    "scaled": ("beta", "scale", "beta_min"),
    "constant": ("value",),
}


def _option(param: str) -> str:
    return "--lambda" if param == "value" else "--" + param.replace("_", "-")


def make_schedule(kind: str, total_steps: int = 1, **params: float | None) -> Schedule:
    """A schedule from CLI-style parameters; ``None`` means the schedule's default.

    ``total_steps`` is the run length of an onset schedule (ignored by the others). A parameter
    given for a schedule that does not take it is an error, not silently ignored.
    """
    if kind not in _SCHEDULE_PARAMS:
        raise ValueError(f"schedule must be onset, exponential, scaled or constant, got {kind!r}")
    keys = _SCHEDULE_PARAMS[kind]
    given = {k: float(v) for k, v in params.items() if v is not None}
    stray = [k for k in given if k not in keys]
    if stray:
        raise ValueError(
            f"{', '.join(_option(k) for k in stray)} does not apply to the {kind} schedule "
            f"(it takes {', '.join(_option(k) for k in keys)})"
        )
    if kind == "onset":
        return Onset(int(total_steps), **given)
    if kind == "exponential":
        return Exponential(**given)
    if kind == "scaled":
        return Scaled(**given)
    return Constant(given.get("value", 0.0))


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Training steps in one epoch (the last batch may be short)."""
    return -(-num_samples // batch_size)


def resolve_schedule(schedule: dict[str, Any], total_steps: int) -> dict[str, Any]:
    """``schedule`` with an onset schedule's ``total_steps`` of ``None`` (\"the length of the
    run\") replaced by ``total_steps``; any other schedule unchanged."""
    if schedule.get("kind") == "onset" and schedule.get("total_steps") is None:
        return {**schedule, "total_steps": int(total_steps)}
    return schedule


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
    lr: float | None = None  # None: default_lr(model)
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
        _core.check_margin(self.margin)  # the core's rule (int, in [1, 2^20])
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("limit", "test_limit", "threads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.lr is None:
            self.lr = default_lr(self.model_name())
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
    try:
        save_checkpoint(tmp, cfg.model_name(), model_kwargs, model, extra)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Defer SIGINT to the end of the block, so Ctrl-C cannot split an epoch's metrics line and
    checkpoint. A Python-level handler (always run in the main thread), not a signal mask: the
    mask is per thread, and the kernel hands a process-wide SIGINT to any thread not masking it
    (torch's workers), which would interrupt the main thread mid-save anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if caught:
        if callable(old):
            old(signal.SIGINT, None)
        elif old != signal.SIG_IGN:
            raise KeyboardInterrupt


def _read_metrics(path: Path, last_epoch: int) -> list[str]:
    """The metrics lines of epochs 1..last_epoch (a line the checkpoint lacks, or one cut off by
    a kill, is dropped: the resumed run writes it again)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            epoch = json.loads(line)["epoch"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(epoch, int) and epoch <= last_epoch:
            kept.append(line)
    return kept


def _is_run_dir(out: Path) -> bool:
    return any((out / name).exists() for name in RUN_FILES)


def _prepare_run_dir(
    out: Path, resume: Path | None, resumed_epoch: int, overwrite: bool
) -> None:
    """Refuse to mix two runs in one directory; carry a resumed run's metrics over."""
    same_dir = resume is not None and out.resolve() == resume.resolve().parent
    history = _read_metrics(resume.parent / METRICS, resumed_epoch) if resume is not None else []
    if same_dir:
        (out / (CHECKPOINT + ".tmp")).unlink(missing_ok=True)
        (out / "final.json").unlink(missing_ok=True)  # rewritten when the resumed run ends
    elif _is_run_dir(out):
        if not overwrite:
            found = ", ".join(n for n in RUN_FILES if (out / n).exists())
            raise FileExistsError(
                f"{out} already holds a run ({found}); pass --overwrite to replace it, "
                "--resume to continue it, or choose another --out"
            )
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if resume is not None:
        (out / METRICS).write_text("".join(line + "\n" for line in history))


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
    out_dir: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool | None = None,
    log: Callable[[str], None] | None = print,
    dataset: Dataset | None = None,
    save_checkpoints: bool = True,
) -> dict[str, Any]:
    """Train (or resume) a run into ``out_dir``; returns the final summary (also ``final.json``).

    With ``resume``, the configuration comes from the checkpoint except ``cfg.epochs`` (the total
    number of epochs; 0 keeps the saved one); training continues after the saved epoch, by
    default in the checkpoint's directory. A new run refuses a directory that holds a run unless
    ``overwrite``. ``device`` is ``"cpu"`` or ``"cuda"`` (checked before anything is loaded).
    """
    from tqdm.auto import tqdm

    dev = torch_device(device)
    if out_dir is None:
        if resume is None:
            raise ValueError("out_dir is needed for a new run (only a resumed run has a default)")
        out_dir = Path(resume).parent
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

    _prepare_run_dir(out, Path(resume) if resume is not None else None, start_epoch, overwrite)
    ds = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_dir)
    ds = subset(ds, cfg.limit, cfg.seed, cfg.test_limit)
    steps = cfg.epochs * steps_per_epoch(len(ds.y_train), cfg.batch_size)
    cfg.schedule = resolve_schedule(cfg.schedule, steps)
    model_kwargs = cfg.model_kwargs(ds)
    if model is None:
        model = build_model(cfg.model_name(), **model_kwargs)
    model.to(dev).train()
    opt, sched = _make_optimizer(model, cfg)
    if resumed is not None:
        opt.load_state_dict(resumed["optimizer"])
        sched.load_state_dict(resumed["lr_scheduler"])
    x_train, y_train = ds.x_train.to(dev), ds.y_train.to(dev)
    x_test, y_test = ds.x_test.to(dev), ds.y_test.to(dev)
    if isinstance(model.head, ScheduledStep):
        model.head.attach(opt)  # one step per optimizer step, whatever else runs forwards

    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    metrics_path = out / METRICS
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
            idx = idx.to(dev)
            xb, yb = x_train[idx], y_train[idx]
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
        test_loss, test_acc = evaluate(model, x_test, y_test)
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
        with _sigint_held():
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if save_checkpoints:
                _save(
                    out / CHECKPOINT, model, cfg, model_kwargs, ds.input_shape, epoch + 1, opt,
                    sched,
                )
        if log:
            lam_s = "" if record["lambda_last"] is None else f", lambda {record['lambda_last']:.4g}"
            log(
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f}, "
                f"train acc {record['train_acc']:.4f}, test acc {test_acc:.4f}{lam_s}"
            )
    _, test_acc = evaluate(model, x_test, y_test)
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

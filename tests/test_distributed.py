"""The class-sharded head on 2 and 4 gloo processes against a single-process float64 reference.

Each test spawns the ranks (torch.multiprocessing, tcp://127.0.0.1 on a free port); the ranks
write what they computed to files and the test compares them with the independent L-Softmax
reference (tests/reference.py) run on the whole batch and the whole weight in this process.
"""

from __future__ import annotations

import itertools
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from reference import lsoftmax_reference, max_rel_err

from lsoftmax import core
from lsoftmax.schedules import Constant

D_IN, D, C, MARGIN, LAM, LR = 5, 6, 23, 3, 0.4, 0.5
UNEVEN = {2: [5, 7], 4: [2, 3, 3, 4]}  # per-rank batch sizes of the loss/gradient check
EQUAL = 3  # per-rank batch size of the DDP step (DDP's average is the global mean then)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rows(sizes: list[int], rank: int) -> slice:
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def _spawn(fn, world: int, out: Path) -> None:
    mp.spawn(fn, args=(world, _free_port(), str(out)), nprocs=world, join=True)


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    core.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 16
    return {
        "x": torch.randn(n, D, generator=g, dtype=torch.float64) * 2,
        "inputs": torch.randn(n, D_IN, generator=g, dtype=torch.float64),
        "y": torch.randint(0, C, (n,), generator=g),
        "w": torch.randn(C, D, generator=g, dtype=torch.float64),
        "backbone": torch.randn(D, D_IN, generator=g, dtype=torch.float64) * 0.5,
    }


def _head(**kw):
    from lsoftmax.torch.distributed import ShardedMarginHead

    return ShardedMarginHead(D, C, MARGIN, Constant(LAM), chunk_size=4, dtype=torch.float64, **kw)


def _train_worker(rank: int, world: int, port: int, out: str) -> None:
    from lsoftmax.torch.distributed import save_sharded

    _init(rank, world, port)
    try:
        data = _data()
        res: dict[str, object] = {}
        # A. loss and gradients, uneven batch sizes
        rows = _rows(UNEVEN[world], rank)
        head = _head()
        with torch.no_grad():
            head.weight.copy_(data["w"][head.class_begin : head.class_end])
        x = data["x"][rows].clone().requires_grad_()
        loss = head(x, data["y"][rows])
        loss.backward()
        res.update(loss=loss.detach(), grad_x=x.grad, grad_w=head.weight.grad,
                   shard=(head.class_begin, head.class_end), step=int(head.step))
        # B. one SGD step of DDP(backbone) + head, equal batch sizes
        backbone = torch.nn.Linear(D_IN, D, bias=False).double()
        with torch.no_grad():
            backbone.weight.copy_(data["backbone"])
        ddp = torch.nn.parallel.DistributedDataParallel(backbone)
        head_b = _head()
        with torch.no_grad():
            head_b.weight.copy_(data["w"][head_b.class_begin : head_b.class_end])
        opt = torch.optim.SGD([*ddp.parameters(), *head_b.parameters()], lr=LR)
        rows_b = slice(rank * EQUAL, (rank + 1) * EQUAL)
        head_b(ddp(data["inputs"][rows_b]), data["y"][rows_b]).backward()
        opt.step()
        res.update(step_w=head_b.weight.detach().clone(), step_backbone=backbone.weight.detach())
        save_sharded(head_b, str(Path(out) / "ckpt.pt"))
        # C. partial FC
        head_c = _head(sample_rate=0.5, seed=7)
        with torch.no_grad():
            head_c.weight.copy_(data["w"][head_c.class_begin : head_c.class_end])
        loss_c = head_c(x.detach(), data["y"][rows])
        y_all = torch.cat([data["y"][_rows(UNEVEN[world], r)] for r in range(world)])
        res.update(pfc_loss=loss_c.detach(),
                   pfc_classes=head_c.sampled_classes(y_all - head_c.class_begin, 0)
                   + head_c.class_begin)
        if world == 2:
            res.update(_schedule_part(data, rows))
            res.update(_arcface_part(data, rows))
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _schedule_part(data: dict[str, torch.Tensor], rows: slice) -> dict[str, object]:
    """E (2 ranks): the schedule, margin and step are in the state_dict; after attach() the
    optimizer's steps, not the forwards, advance lambda."""
    from lsoftmax.schedules import Exponential
    from lsoftmax.torch.distributed import ShardedMarginHead

    sched = Exponential(base=100.0, gamma=0.5, power=1.0)
    head = ShardedMarginHead(D, C, 2, sched, chunk_size=4, dtype=torch.float64)
    opt = torch.optim.SGD(head.parameters(), lr=0.0)
    head.attach(opt)
    x = data["x"][rows]
    lams = []
    for _ in range(2):  # two forwards per optimizer step (gradient accumulation)
        head(x, data["y"][rows]).backward()
        head(x, data["y"][rows]).backward()
        opt.step()
        lams.append(head.current_lambda)
    fresh = ShardedMarginHead(D, C, 3, Exponential(), chunk_size=4, dtype=torch.float64)
    fresh.load_state_dict(head.state_dict())
    return {"sched_steps": int(head.step), "sched_lams": lams,
            "sched_restored": (fresh.margin.m, fresh.schedule.to_dict(), int(fresh.step))}


ARCFACE = {"m": 0.5, "s": 8.0, "easy_margin": False}
SHORT_ROW = 4  # a weight row scaled to 1e-3: the normalization must not care


def _arcface_w(w: torch.Tensor) -> torch.Tensor:
    w = w.clone()
    w[SHORT_ROW] *= 1e-3
    return w


def _arcface_part(data: dict[str, torch.Tensor], rows: slice) -> dict[str, object]:
    """D (2 ranks): an ArcFace head's loss and gradients; its state_dict (schedule, margin,
    step) loads into a fresh head."""
    from lsoftmax.margins import ArcFace
    from lsoftmax.schedules import Exponential
    from lsoftmax.torch.distributed import ShardedMarginHead

    spec = ArcFace(ARCFACE["m"], ARCFACE["s"])
    head = ShardedMarginHead(D, C, spec, chunk_size=4, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(_arcface_w(data["w"])[head.class_begin : head.class_end])
    x = data["x"][rows].clone().requires_grad_()
    loss = head(x, data["y"][rows])
    loss.backward()
    fresh = ShardedMarginHead(D, C, 2, Exponential(), chunk_size=4, dtype=torch.float64)
    fresh.load_state_dict(head.state_dict())
    return {"arc_loss": loss.detach(), "arc_grad_x": x.grad, "arc_grad_w": head.weight.grad,
            "arc_restored": (fresh.margin == spec, fresh.schedule.to_dict(), int(fresh.step))}


def _reference_losses(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lsoftmax_reference(x, w, y, MARGIN, LAM), y, reduction="none")


@pytest.mark.parametrize("world", (2, 4))
def test_sharded_head_matches_single_process(world: int, tmp_path: Path) -> None:
    _spawn(_train_worker, world, tmp_path)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    data = _data()
    sizes = UNEVEN[world]

    # A: rank r's loss is the mean over its rows; grad_w is that of the rank average.
    n = sum(sizes)
    x = data["x"][:n].clone().requires_grad_()
    w = data["w"].clone().requires_grad_()
    per_row = _reference_losses(x, w, data["y"][:n])
    rank_losses = torch.stack([per_row[_rows(sizes, r)].mean() for r in range(world)])
    rank_losses.mean().backward()
    shards = [r["shard"] for r in res]
    assert shards[0][0] == 0 and shards[-1][1] == C
    assert all(a[1] == b[0] for a, b in itertools.pairwise(shards))
    for r, got in enumerate(res):
        b, e = got["shard"]
        assert max_rel_err(got["loss"], rank_losses[r].detach()) < 1e-12
        # d loss_r / d x_r = world * d mean_r(loss_r) / d x_r
        assert max_rel_err(got["grad_x"], world * x.grad[_rows(sizes, r)]) < 1e-12
        assert max_rel_err(got["grad_w"], w.grad[b:e]) < 1e-12
        assert got["step"] == 1

    # B: DDP(backbone) + head, one SGD step == single process on the global batch.
    m = world * EQUAL
    bb = data["backbone"].clone().requires_grad_()
    w = data["w"].clone().requires_grad_()
    feats = data["inputs"][:m] @ bb.t()
    loss = F.cross_entropy(lsoftmax_reference(feats, w, data["y"][:m], MARGIN, LAM), data["y"][:m])
    loss.backward()
    w_after = (w - LR * w.grad).detach()
    bb_after = (bb - LR * bb.grad).detach()
    for got in res:
        b, e = got["shard"]
        assert max_rel_err(got["step_w"], w_after[b:e]) < 1e-12
        assert max_rel_err(got["step_backbone"], bb_after) < 1e-12
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert max_rel_err(ckpt["weight"], w_after) < 1e-12
    assert int(ckpt["step"]) == 1

    # C: partial FC == cross-entropy over the union of the kept classes.
    kept = torch.cat([got["pfc_classes"] for got in res])
    assert torch.equal(kept, torch.sort(kept).values) and kept.unique().numel() == kept.numel()
    y = data["y"][:n]
    assert torch.isin(y, kept).all()  # every positive is kept
    for got in res:
        b, e = got["shard"]
        assert got["pfc_classes"].numel() >= math.ceil(0.5 * (e - b))
    remap = torch.full((C,), -1, dtype=torch.int64)
    remap[kept] = torch.arange(kept.numel())
    per_row = _reference_losses(data["x"][:n], data["w"][kept], remap[y])
    for r, got in enumerate(res):
        assert max_rel_err(got["pfc_loss"], per_row[_rows(sizes, r)].mean()) < 1e-12

    if world == 2:  # E: ScheduledStep
        from lsoftmax.schedules import Exponential

        sched = Exponential(base=100.0, gamma=0.5, power=1.0)
        for got in res:
            assert got["sched_steps"] == 2  # two optimizer steps, four forwards
            assert got["sched_lams"] == [sched.value(0), sched.value(1)]
            assert got["sched_restored"] == (2, sched.to_dict(), 2)

    if world != 2:
        return
    # D: ArcFace, against the float64 reference from the published formula.
    from reference import family_reference

    from lsoftmax.margins import ArcFace as Arc
    from lsoftmax.margins import default_schedule

    x = data["x"][:n].clone().requires_grad_()
    w = _arcface_w(data["w"]).requires_grad_()
    per_row = F.cross_entropy(
        family_reference(x, w, data["y"][:n], "arcface", ARCFACE), data["y"][:n], reduction="none"
    )
    rank_losses = torch.stack([per_row[_rows(sizes, r)].mean() for r in range(world)])
    rank_losses.mean().backward()
    for r, got in enumerate(res):
        b, e = got["shard"]
        assert max_rel_err(got["arc_loss"], rank_losses[r].detach()) < 1e-12
        assert max_rel_err(got["arc_grad_x"], world * x.grad[_rows(sizes, r)]) < 1e-12
        assert max_rel_err(got["arc_grad_w"], w.grad[b:e]) < 1e-12
        spec_ok, schedule, step = got["arc_restored"]
        assert spec_ok and step == 1
        assert schedule == default_schedule(Arc(ARCFACE["m"], ARCFACE["s"])).to_dict()


def _load_worker(rank: int, world: int, port: int, out: str) -> None:
    from lsoftmax.torch.distributed import load_sharded, save_sharded

    _init(rank, world, port)
    try:
        head = _head()
        load_sharded(head, str(Path(out) / "ckpt.pt"))
        torch.save({"w": head.weight.detach(), "shard": (head.class_begin, head.class_end),
                    "step": int(head.step)}, Path(out) / f"load{rank}.pt")
        save_sharded(head, str(Path(out) / f"resaved{world}.pt"))
    finally:
        dist.destroy_process_group()


def test_checkpoint_loads_into_another_world_size(tmp_path: Path) -> None:
    w = _data()["w"]
    torch.save({"weight": w, "step": torch.tensor(5), "num_classes": C, "in_features": D,
                "margin": MARGIN, "schedule": Constant(LAM).to_dict()}, tmp_path / "ckpt.pt")
    for world in (3, 2):  # 23 classes: uneven shards on 3 ranks
        _spawn(_load_worker, world, tmp_path)
        for r in range(world):
            got = torch.load(tmp_path / f"load{r}.pt", weights_only=False)
            b, e = got["shard"]
            assert torch.equal(got["w"], w[b:e]) and got["step"] == 5
        resaved = torch.load(tmp_path / f"resaved{world}.pt", weights_only=True)
        assert torch.equal(resaved["weight"], w)


def test_head_needs_an_initialized_process_group() -> None:
    from lsoftmax.torch.distributed import ShardedMarginHead, shard_range

    with pytest.raises(RuntimeError, match=r"torch\.distributed to be initialized"):
        ShardedMarginHead(4, 10)
    assert [shard_range(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]

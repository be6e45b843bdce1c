"""DDP of the ordinary layer: with ``head.attach(optimizer)`` the step counter, and so lambda,
stays identical across ranks whatever ``broadcast_buffers`` is, even when one rank runs an extra
forward. Two gloo processes on 127.0.0.1 (torch.multiprocessing.spawn)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from lsoftmax.schedules import Exponential
from lsoftmax.torch import LSoftmaxLinear

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

SCHED = Exponential(base=1000.0, gamma=0.1, power=1.0)
STEPS = 4
# (counting, broadcast_buffers, extra forward on rank 0 at iteration 1)
CASES = [
    ("attach", True, "grad"),
    ("attach", False, "grad"),
    ("forward", True, "no_grad"),
    ("forward", False, "no_grad"),
    # The limitation attach removes: a counted extra forward on one rank, no buffer broadcast.
    ("forward", False, "grad"),
]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.head = LSoftmaxLinear(6, 5, margin=4, schedule=SCHED)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.head(torch.relu(self.body(x)), y)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    results: dict[str, Any] = {}
    try:
        for counting, broadcast, extra in CASES:
            torch.manual_seed(0)
            net = Net()
            ddp = DDP(net, broadcast_buffers=broadcast)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            if counting == "attach":
                net.head.attach(opt)
            g = torch.Generator().manual_seed(100 + rank)
            lambdas = []
            for it in range(STEPS):
                x, y = torch.randn(8, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
                if rank == 0 and it == 1:
                    # A logging forward on one rank, never backpropagated. (Through the DDP
                    # wrapper it would run DDP's buffer broadcast on one rank only: a collective
                    # mismatch, so it goes to the wrapped module, as such code does.)
                    if extra == "no_grad":
                        with torch.no_grad():
                            net(x, y)
                    else:
                        net(x, y)
                opt.zero_grad()
                F.cross_entropy(ddp(x, y), y).backward()
                opt.step()
                lambdas.append(net.head.current_lambda)
            steps = [torch.zeros((), dtype=torch.int64) for _ in range(world)]
            dist.all_gather(steps, net.head.step.clone())
            weights = [torch.zeros_like(net.head.weight) for _ in range(world)]
            dist.all_gather(weights, net.head.weight.detach().clone())
            results[f"{counting}-{broadcast}-{extra}"] = {
                "lambdas": lambdas,
                "steps": [int(s) for s in steps],
                "weights": weights,
            }
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize(("counting", "broadcast", "extra"), CASES[:4])
def test_step_and_lambda_agree_across_ranks(
    ranks: list[dict[str, Any]], counting: str, broadcast: bool, extra: str
) -> None:
    r0, r1 = (r[f"{counting}-{broadcast}-{extra}"] for r in ranks)
    expected = [SCHED.value(i) for i in range(STEPS)]
    assert r0["lambdas"] == r1["lambdas"] == expected
    assert r0["steps"] == [STEPS, STEPS]
    torch.testing.assert_close(r0["weights"][0], r0["weights"][1], rtol=0, atol=0)


def test_counted_extra_forward_without_broadcast_desynchronizes(
    ranks: list[dict[str, Any]],
) -> None:
    # What attach() is for: the comparison above does detect a desynchronized counter.
    r0, r1 = (r["forward-False-grad"] for r in ranks)
    assert r0["steps"] == [STEPS + 1, STEPS]
    assert r0["lambdas"] != r1["lambdas"]

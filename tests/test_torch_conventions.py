"""``LSoftmaxLinear`` follows PyTorch's conventions: autocast, ``(*, D)`` inputs, the schedule in
the ``state_dict``, and a step counter that counts solver iterations (grad-enabled forwards, or
optimizer steps after ``attach``)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from reference import lsoftmax_reference, max_rel_err
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lsoftmax.schedules import Constant, Exponential, Scaled
from lsoftmax.torch import LSoftmaxLinear
from lsoftmax.torch.lgm import LGMLoss

SCHED = Exponential(base=1000.0, gamma=0.1, power=1.0)  # lambda changes a lot per step


def _head(margin: int = 4, schedule=SCHED, seed: int = 0, dtype=torch.float32) -> LSoftmaxLinear:
    torch.manual_seed(seed)
    return LSoftmaxLinear(6, 5, margin=margin, schedule=schedule, dtype=dtype)


def _data(n: int = 12, seed: int = 1, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 5, (n,), generator=g)


def _ref(head: LSoftmaxLinear, x: Tensor, y: Tensor | None, step: int) -> Tensor:
    """The float64 reference: margin logits at ``step``'s lambda, plain logits for ``y=None``."""
    w = head.weight.detach().double()
    if y is None:
        return x.double() @ w.T
    return lsoftmax_reference(x.double(), w, y, head.margin, head.schedule.value(step))


# -- autocast ------------------------------------------------------------------------------


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cpu_autocast_works_like_nn_linear(amp: torch.dtype, train: bool) -> None:
    head, (x, y) = _head(), _data()
    head.train(train)
    reference = _head()
    reference.train(train)
    with torch.autocast("cpu", dtype=amp):
        out = head(x, y)
        linear_out = F.linear(x, head.weight)
        # An input that is already 16-bit (from an earlier autocast layer) works too.
        out16 = head(x.to(amp), y)
    assert out.dtype == linear_out.dtype == out16.dtype == amp
    expected = reference(x, y)  # float32 throughout, then rounded: the documented choice
    assert torch.equal(out, expected.to(amp))
    ref16 = _ref(head, x.to(amp).float(), y if train else None, 1)
    assert max_rel_err(out16, ref16) <= 1e-2
    assert int(head.step) == (2 if train else 0)
    if not train:  # plain logits: nn.Linear's to its precision
        assert max_rel_err(out, linear_out.float()) <= 1e-2


def test_cpu_autocast_backward() -> None:
    head, (x, y) = _head(), _data()
    reference = _head()
    xa = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(head(xa, y), y)
    loss.backward()
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(reference(xr, y), y).backward()
    assert head.weight.grad is not None and head.weight.grad.dtype == torch.float32
    assert xa.grad is not None and xa.grad.dtype == torch.float32
    assert max_rel_err(head.weight.grad, reference.weight.grad) <= 2e-2
    assert max_rel_err(xa.grad, xr.grad) <= 2e-2


def test_autocast_leaves_float64_alone() -> None:
    head, (x, y) = _head(dtype=torch.float64), _data(dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x, y)
    assert out.dtype == torch.float64
    assert max_rel_err(out, _ref(head, x, y, 0)) <= 1e-10


# -- (*, in_features) inputs ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2), (1, 12)], ids=str)
def test_leading_dims_like_nn_linear(shape: tuple[int, ...]) -> None:
    x2, y2 = _data(12, dtype=torch.float64)
    head, flat = _head(dtype=torch.float64), _head(dtype=torch.float64)
    x = x2.reshape(*shape, 6).clone().requires_grad_(True)
    xf = x2.clone().requires_grad_(True)
    out = head(x, y2.reshape(shape))
    ref = flat(xf, y2)
    assert out.shape == (*shape, 5)
    assert max_rel_err(out.reshape(12, 5), _ref(head, x2, y2, 0)) <= 1e-10
    g = torch.randn(out.shape, dtype=torch.float64)
    out.backward(g)
    ref.backward(g.reshape(12, 5))
    assert x.grad is not None and xf.grad is not None
    torch.testing.assert_close(x.grad.reshape(12, 6), xf.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, flat.weight.grad, rtol=1e-12, atol=1e-12)
    head.eval()
    assert head(x).shape == (*shape, 5)


def test_one_sample_and_gradcheck_in_3d() -> None:
    head = _head(margin=3, schedule=Constant(0.5), dtype=torch.float64)
    x, y = _data(6, dtype=torch.float64)
    one = head(x[0], y[0])  # (D,) with a 0-d target -> (C,)
    assert one.shape == (5,)
    assert max_rel_err(one, _ref(head, x[:1], y[:1], 0)[0]) <= 1e-10
    x3 = x.reshape(2, 3, 6).clone().requires_grad_(True)
    w = head.weight.detach().clone().requires_grad_(True)

    def f(a: Tensor, weight: Tensor) -> Tensor:
        return torch.func.functional_call(head, {"weight": weight}, (a, y.reshape(2, 3)))

    assert torch.autograd.gradcheck(f, (x3, w))


@pytest.mark.parametrize(
    ("x", "target", "match"),
    [
        (torch.randn(2, 3, 6), torch.zeros(6, dtype=torch.long), r"must have shape \(2, 3\)"),
        (torch.randn(2, 3, 6), torch.zeros(2, 4, dtype=torch.long), r"target must have shape"),
        (torch.tensor(1.0), None, "x must have shape"),
        (torch.randn(2, 3, 7), None, "in_features|features"),
    ],
)
def test_bad_shapes_name_the_argument(x: Tensor, target: Tensor | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _head()(x, target)


# -- the schedule in the state_dict --------------------------------------------------------


def test_default_constructed_head_restores_schedule_and_margin() -> None:
    trained = _head(margin=2, schedule=Exponential(base=1000, gamma=1e-3, power=35))
    x, y = _data()
    for _ in range(10):
        trained(x, y)
    buf = io.BytesIO()
    torch.save(trained.state_dict(), buf)
    buf.seek(0)
    fresh = LSoftmaxLinear(6, 5)  # default margin and schedule
    assert fresh.current_lambda != trained.current_lambda
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.schedule == trained.schedule and fresh.margin == 2
    assert fresh.current_lambda == trained.current_lambda  # exactly
    torch.testing.assert_close(fresh(x, y), trained(x, y), rtol=0, atol=0)
    assert all(isinstance(v, Tensor) for v in trained.state_dict().values())


def test_old_state_dict_without_schedule_still_loads() -> None:
    own = Scaled(beta=10.0, scale=0.5)
    old = {k: v for k, v in _head().state_dict().items() if not k.endswith("_extra_state")}
    old["step"] = torch.tensor(3)
    head = _head(schedule=own, seed=1)
    head.load_state_dict(old)  # strict, as before the schedule was saved
    assert head.schedule == own and int(head.step) == 3
    net = nn.Sequential(nn.Linear(6, 6), _head(schedule=own))
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("_extra_state")}
    net.load_state_dict(sd)  # under a prefix too


def test_schedule_assignment_reaches_the_tensor_op() -> None:
    head = _head()
    head.schedule = Scaled(beta=8.0, scale=0.5)
    head.step.fill_(2)
    lam = torch.ops.lsoftmax.schedule_lambda(head.step, head.schedule.kind, head._schedule_params)
    assert float(lam) == head.schedule.value(2) == 2.0
    with pytest.raises(TypeError, match="schedule must be"):
        head.schedule = 0.5  # type: ignore[assignment]


def test_bad_extra_state_is_a_clear_error() -> None:
    head = _head()
    sd = head.state_dict()
    sd["_extra_state"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    with pytest.raises(ValueError, match="not valid JSON"):
        head.load_state_dict(sd)
    sd["_extra_state"] = {"schedule": {}}
    with pytest.raises(ValueError, match="uint8 tensor"):
        head.load_state_dict(sd)


# -- what counts as a step -----------------------------------------------------------------


def test_no_grad_training_forward_uses_but_does_not_advance_the_step() -> None:
    head, (x, y) = _head(), _data()
    head(x, y)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            out = head(x, y)
        assert int(head.step) == 1
        assert max_rel_err(out, _ref(head, x, y, 1)) <= 1e-5  # the step the next one uses
    head(x, y)
    assert int(head.step) == 2


@pytest.mark.parametrize("micro", [1, 3])
def test_attach_counts_optimizer_steps(micro: int) -> None:
    head, (x, y) = _head(), _data()
    opt = torch.optim.SGD(head.parameters(), lr=0.01)
    handle = head.attach(opt)
    assert head.counts_optimizer_steps
    for it in range(3):
        opt.zero_grad()
        for xb, yb in zip(x.chunk(micro), y.chunk(micro), strict=True):
            out = head(xb, yb)
            assert max_rel_err(out, _ref(head, xb, yb, it)) <= 1e-5, it
            (F.cross_entropy(out, yb) / micro).backward()
        assert int(head.step) == it
        opt.step()
        assert int(head.step) == it + 1
        assert head.current_lambda == head.schedule.value(it)
    handle.remove()
    handle.remove()  # idempotent
    assert not head.counts_optimizer_steps
    head(x, y)
    opt.step()
    assert int(head.step) == 4  # counting forwards again; the detached hook is gone
    with head.attach(opt):
        opt.step()
    assert int(head.step) == 5 and not head.counts_optimizer_steps
    with pytest.raises(TypeError, match="optimizer must be"):
        head.attach("sgd")  # type: ignore[arg-type]


def test_attached_accumulation_equals_one_big_batch() -> None:
    x, y = _data(12)
    runs = []
    for micro in (1, 4):
        head = _head()
        opt = torch.optim.SGD(head.parameters(), lr=0.1)
        head.attach(opt)
        for _ in range(3):
            opt.zero_grad()
            for xb, yb in zip(x.chunk(micro), y.chunk(micro), strict=True):
                (F.cross_entropy(head(xb, yb), yb, reduction="sum") / len(y)).backward()
            opt.step()
        runs.append(head)
    assert int(runs[0].step) == int(runs[1].step) == 3
    torch.testing.assert_close(runs[0].weight, runs[1].weight, rtol=1e-5, atol=1e-6)


def test_attached_head_under_activation_checkpointing() -> None:
    x, y = _data()
    grads = []
    for use_checkpoint in (False, True):
        head = _head()
        opt = torch.optim.SGD(head.parameters(), lr=0.1)
        head.attach(opt)
        xr = x.clone().requires_grad_(True)
        out = checkpoint(head, xr, y, use_reentrant=False) if use_checkpoint else head(xr, y)
        F.cross_entropy(out, y).backward()
        opt.step()
        assert int(head.step) == 1
        grads.append(xr.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_lgm_head_shares_the_conventions() -> None:
    lgm = LGMLoss(5, 6, alpha_schedule=Scaled(beta=1.0, scale=0.5))
    x, y = _data()
    with torch.no_grad():
        lgm(x, y)
    assert int(lgm.step) == 0
    opt = torch.optim.SGD(lgm.parameters(), lr=0.01)
    with lgm.attach(opt):
        lgm(x, y)[0].backward()
        lgm(x, y)
        assert int(lgm.step) == 0
        opt.step()
    assert int(lgm.step) == 1
    lgm.step.fill_(3)
    fresh = LGMLoss(5, 6)  # Constant(1.0)
    fresh.load_state_dict(lgm.state_dict())
    assert fresh.alpha_schedule == Scaled(beta=1.0, scale=0.5)
    assert fresh.current_alpha == lgm.current_alpha == 0.25


def test_copies_count_forwards_and_old_pickles_load() -> None:
    head, (x, y) = _head(), _data()
    opt = torch.optim.SGD(head.parameters(), lr=0.01)
    head.attach(opt)
    twin = copy.deepcopy(head)  # no hook on the copy: it counts its own forwards
    assert not twin.counts_optimizer_steps
    twin(x, y)
    assert int(twin.step) == 1 and int(head.step) == 0
    # A module pickled before the schedule became a property kept it in __dict__.
    state = dict(head.__dict__)
    state["schedule"] = state.pop("_schedule")
    for key in ("_attached_optimizers", "_warned_distributed"):
        del state[key]
    old = LSoftmaxLinear.__new__(LSoftmaxLinear)
    old.__setstate__(state)
    assert old.schedule == SCHED and not old.counts_optimizer_steps
    torch.testing.assert_close(old(x, y), _ref(head, x, y, 0).float(), rtol=1e-5, atol=1e-5)
    buf = io.BytesIO()
    torch.save(head, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.schedule == SCHED and loaded.margin == 4

"""The scheduled head's eager CPU training forward: one native call
(``lsoftmax_cpu::scheduled_margin_linear``) that evaluates the schedule at the step counter,
advances the counter when the forward counts, and runs the layer. It must agree exactly with the
general path (the schedule in Python, then ``lsoftmax_logits``) and count steps the same way."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lsoftmax.schedules import Constant, Exponential, Onset, Scaled
from lsoftmax.torch import LSoftmaxLinear, ops
from lsoftmax.torch.functional import lsoftmax_logits

pytestmark = pytest.mark.skipif(
    ops.SCHEDULED_MARGIN_LINEAR is None,
    reason="the build has no libtorch extension (lsoftmax/_torch_ops.so)",
)

SCHEDULES = [
    Exponential(base=1000.0, gamma=0.5, power=2.0, lambda_min=0.1, iteration=3),
    Scaled(beta=100.0, scale=0.5, beta_min=0.2),
    Onset(total_steps=6, reach=1.0, at=0.5, warmup=0.2, base=1000.0, lambda_min=0.5),
    Constant(0.75),
]


class _Counting:
    """Wraps the native op and counts its calls."""

    def __init__(self, op: Any) -> None:
        self.op, self.calls = op, 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.op(*args)


ENTRIES = ["cpython", "dispatcher"]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.kind)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_training_forward_is_one_native_call_equal_to_the_general_path(
    schedule: Any, dtype: torch.dtype, entry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through lsoftmax._torch_entry (one CPython call) and, without it, through torch.ops."""
    if entry == "cpython":
        if ops.NATIVE_SCHEDULED_MARGIN_LINEAR is None:
            pytest.fail("the libtorch extension loaded but lsoftmax._torch_entry did not")
        counting = _Counting(ops.NATIVE_SCHEDULED_MARGIN_LINEAR)
        monkeypatch.setattr(ops, "NATIVE_SCHEDULED_MARGIN_LINEAR", counting)
    else:
        monkeypatch.setattr(ops, "NATIVE_SCHEDULED_MARGIN_LINEAR", None)
        counting = _Counting(ops.SCHEDULED_MARGIN_LINEAR)
        monkeypatch.setattr(ops, "SCHEDULED_MARGIN_LINEAR", counting)
    g = torch.Generator().manual_seed(0)
    head = LSoftmaxLinear(16, 7, margin=3, schedule=schedule).to(dtype)
    x = torch.randn(9, 16, generator=g, dtype=dtype)
    y = torch.randint(0, 7, (9,), generator=g)
    for step in range(5):
        assert int(head.step) == step
        xa = x.clone().requires_grad_()
        out = head(xa, y)
        F.cross_entropy(out, y).backward()
        xb = x.clone().requires_grad_()
        wb = head.weight.detach().clone().requires_grad_()
        ref = lsoftmax_logits(xb, wb, y, 3, schedule.value(step))
        F.cross_entropy(ref, y).backward()
        assert torch.equal(out, ref)
        assert torch.equal(xa.grad, xb.grad)
        assert torch.equal(head.weight.grad, wb.grad)
        head.weight.grad = None
    assert counting.calls == 5
    assert int(head.step) == 5
    assert head.current_lambda == schedule.value(4)


def test_counter_is_left_alone_when_the_forward_does_not_count() -> None:
    head = LSoftmaxLinear(8, 5, margin=2, schedule=Scaled(beta=10.0, scale=0.5, beta_min=0.0))
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        out = head(x, y)
    assert int(head.step) == 0
    assert torch.equal(out, lsoftmax_logits(x, head.weight.detach(), y, 2, 10.0))
    opt = torch.optim.SGD(head.parameters(), lr=0.0)
    with head.attach(opt):
        head(x, y).sum().backward()
        head(x, y).sum().backward()
        assert int(head.step) == 0
        opt.step()
        assert int(head.step) == 1
    head(x, y)
    assert int(head.step) == 2


def test_cpython_entry_declines_the_calls_its_op_does_not_take() -> None:
    """None (the head then takes the general path) for anything but 2-D float CPU inputs of one
    dtype, CPU int labels and counter, matching shapes, autocast off, plain tensors."""
    entry = ops.NATIVE_SCHEDULED_MARGIN_LINEAR
    assert entry is not None
    x, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4])
    step = torch.zeros((), dtype=torch.int64)

    class Sub(torch.Tensor):
        pass

    declined = [
        (x.double(), w, y, 2, step),  # dtypes differ
        (x.half(), w.half(), y, 2, step),  # no 16-bit CPU kernels
        (x[None], w, y, 2, step),  # 3-D x
        (x, w, y.float(), 2, step),  # float labels
        (x, w, y[:2], 2, step),  # one label short
        (x, w[:, :3], y, 2, step),  # features differ
        (x, w, y, 2, step.int()),  # int32 counter
        (x.as_subclass(Sub), w, y, 2, step),  # a subclass may redefine the ops
        ("x", w, y, 2, step),
        (x, w, y, 2.0, step),  # margin not an int
    ]
    for args in declined:
        assert entry(*args, "constant", [0.5], True) is None, args
    with torch.autocast("cpu"):
        assert entry(x, w, y, 2, step, "constant", [0.5], True) is None
    assert int(step) == 0
    with pytest.raises(TypeError, match="takes 8 arguments, got 2"):
        entry(x, w)


def test_cpython_entry_raises_its_ops_errors_and_counts_like_it() -> None:
    entry = ops.NATIVE_SCHEDULED_MARGIN_LINEAR
    assert entry is not None
    x, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4])
    step = torch.zeros((), dtype=torch.int64)
    with pytest.raises(ValueError, match=r"labels\[2\] = 4 is out of range \[0, 3\)"):
        entry(x, w[:3], y, 2, step, "constant", [0.5], True)
    with pytest.raises(ValueError, match="schedule"):
        entry(x, w, y, 2, step, "no-such-kind", [0.5], True)
    with pytest.raises(TypeError):
        entry(x, w, y, 2, step, "constant", ["a"], True)
    assert int(step) == 0  # a forward that raised did not count
    out = entry(x, w, y, 2, step, "constant", [0.5], True)
    ref = ops.SCHEDULED_MARGIN_LINEAR(x, w, y, 2, torch.zeros((), dtype=torch.int64), "constant",
                                      [0.5], True)
    assert torch.equal(out, ref)
    entry(x, w, y, 2, step, "constant", [0.5], False)
    assert int(step) == 1


def test_native_op_names_its_bad_arguments() -> None:
    op = ops.SCHEDULED_MARGIN_LINEAR
    x, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4])
    step = torch.zeros((), dtype=torch.int64)
    with pytest.raises(ValueError, match="step must be a 0-d int64 CPU tensor"):
        op(x, w, y, 2, torch.zeros(()), "constant", [0.5], True)
    with pytest.raises(ValueError, match="step must be a 0-d int64 CPU tensor"):
        op(x, w, y, 2, torch.zeros(1, dtype=torch.int64), "constant", [0.5], True)
    with pytest.raises(ValueError, match="schedule"):
        op(x, w, y, 2, step, "no-such-kind", [0.5], True)
    with pytest.raises(ValueError, match="value"):
        op(x, w, y, 2, step, "constant", [-1.0], True)
    with pytest.raises(ValueError, match=r"labels\[2\] = 4 is out of range \[0, 3\)"):
        op(x, w[:3], y, 2, step, "constant", [0.5], True)
    assert int(step) == 0  # a forward that raised did not count
    op(x, w, y, 2, step, "constant", [0.5], True)
    op(x, w, y, 2, step, "constant", [0.5], False)
    assert int(step) == 1


@pytest.mark.parametrize("classes", [3, 40, 400], ids=["fold", "fold-edge", "no-fold"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_native_backward_matches_the_float64_reference(
    classes: int, dtype: torch.dtype, label_dtype: torch.dtype
) -> None:
    """Both backward forms of the C++ node (margin folded into the GEMMs for few classes, added
    after them for many: the switch is at N D / (N + D) = 48 classes here) against the
    independent reference, with a zero row of x (a degenerate row keeps its plain logit)."""
    from reference import max_rel_err, reference_with_grads

    g = torch.Generator().manual_seed(classes)
    x = torch.randn(64, 64, generator=g, dtype=dtype)
    x[5] = 0.0
    w = torch.randn(classes, 64, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (64,), generator=g).to(label_dtype)
    grad = torch.randn(64, classes, generator=g, dtype=dtype)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = ops.SCHEDULED_MARGIN_LINEAR(
        xr, wr, y, 3, torch.zeros((), dtype=torch.int64), "constant", [0.25], True
    )
    gx, gw = torch.autograd.grad(out, (xr, wr), grad)
    ref, ref_gx, ref_gw = reference_with_grads(x, w, y.long(), 3, 0.25, grad)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert max_rel_err(out, ref) <= tol
    assert max_rel_err(gx, ref_gx) <= tol
    assert max_rel_err(gw, ref_gw) <= tol
    # The zero row: the plain gradient G W (no margin term).
    torch.testing.assert_close(gx[5], grad[5] @ w, rtol=tol, atol=tol)

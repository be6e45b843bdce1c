"""The L-GM torch ops and ``LGMLoss`` against the float64 reference of ``test_lgm_core``;
gradcheck, numpy API == torch, the module's modes, schedule and state, bad input, and a training
run that would collapse the variances without the floor.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TOL
from reference import max_rel_err
from test_lgm_core import lgm_reference, lgm_reference_grads, make_case
from torch import Tensor

from lsoftmax import lgm_core
from lsoftmax.schedules import Constant, StepUp
from lsoftmax.torch import LGMClassifier, LGMLoss
from lsoftmax.torch.lgm import LOG_VAR_FLOOR, log_var_from_variances

DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
KINDS = pytest.mark.parametrize("isotropic", [False, True], ids=["diag", "iso"])
LABELS = pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "nolabels"])
LOGDET = pytest.mark.parametrize("logdet", [True, False], ids=["logdet", "nologdet"])


def _case(dtype=torch.float64, isotropic=False, **kw) -> tuple[Tensor, ...]:
    x, means, log_var, labels = (torch.from_numpy(a) for a in make_case(isotropic=isotropic, **kw))
    return x.to(dtype), means.to(dtype), log_var.to(dtype), labels


def _op(x, means, log_var, labels, alpha, logdet, tensor_alpha=False):
    if tensor_alpha:
        return torch.ops.lsoftmax.lgm_margin_logits(
            x, means, log_var, labels, torch.tensor(alpha, dtype=torch.float64), logdet
        )
    return torch.ops.lsoftmax.lgm_logits(x, means, log_var, labels, alpha, logdet)


@KINDS
@LABELS
@LOGDET
def test_gradcheck(isotropic, with_labels, logdet) -> None:
    x, means, log_var, labels = _case(isotropic=isotropic, n=6, c=4, d=3)
    y = labels if with_labels else None
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, means, log_var))
    assert torch.autograd.gradcheck(lambda a, b, c: _op(a, b, c, y, 0.6, logdet), inputs)


@KINDS
def test_gradcheck_tensor_alpha_op(isotropic) -> None:
    x, means, log_var, labels = _case(isotropic=isotropic, n=6, c=4, d=3, seed=2)
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, means, log_var))
    assert torch.autograd.gradcheck(
        lambda a, b, c: _op(a, b, c, labels, 1.5, True, tensor_alpha=True), inputs
    )


@KINDS
def test_loss_gradients_match_the_reference(isotropic) -> None:
    lgm = LGMLoss(4, 3, alpha=1.0, lambda_lkd=0.3, isotropic=isotropic, dtype=torch.float64)
    with torch.no_grad():
        lgm.log_var.normal_(0.0, 0.3)
    x, _, _, labels = _case(n=6, c=4, d=3, seed=4)
    feat = x.clone().requires_grad_(True)
    loss, _ = lgm(feat, labels)
    loss.backward()
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, lgm.means, lgm.log_var)]
    logits, loglik = lgm_reference(*leaves, labels, 1.0, True)
    want = F.cross_entropy(logits, labels) - 0.3 * loglik.mean()
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-12, atol=1e-12)
    for got, ref in zip((feat.grad, lgm.means.grad, lgm.log_var.grad), leaves, strict=True):
        assert max_rel_err(got, ref.grad) <= 1e-10


@DTYPES
@KINDS
@pytest.mark.parametrize(
    ("with_labels", "tensor_alpha"),
    [(True, False), (False, False), (True, True)],  # lgm_margin_logits always takes labels
    ids=["labels", "nolabels", "labels-tensor_alpha"],
)
def test_parity_with_reference(dtype, isotropic, with_labels, tensor_alpha) -> None:
    x, means, log_var, labels = _case(dtype, isotropic, n=20, c=6, d=5, seed=6)
    y = labels if with_labels else None
    leaves = [t.clone().requires_grad_(True) for t in (x, means, log_var)]
    logits, loglik = _op(*leaves, y, 0.8, True, tensor_alpha=tensor_alpha)
    gz = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    gl = torch.randn(loglik.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    grads = torch.autograd.grad((logits, loglik), leaves, (gz, gl))
    ref = lgm_reference_grads(x, means, log_var, y, 0.8, True, gz, gl)
    for name, got, want in zip(
        ("logits", "loglik", "grad_x", "grad_means", "grad_log_var"),
        (logits.detach(), loglik.detach(), *grads),
        ref,
        strict=True,
    ):
        assert got.dtype == dtype
        err = max_rel_err(got, want)
        assert err <= TOL[dtype], f"{name}: {err:.3g}"


@DTYPES
@KINDS
def test_numpy_api_matches_torch(dtype, isotropic) -> None:
    x, means, log_var, labels = _case(dtype, isotropic, n=30, c=7, d=9, seed=8)
    leaves = [t.clone().requires_grad_(True) for t in (x, means, log_var)]
    logits, loglik = _op(*leaves, labels, 1.2, True)
    gz = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    gl = torch.randn(loglik.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    grads = torch.autograd.grad((logits, loglik), leaves, (gz, gl))
    np_logits, np_loglik = lgm_core.lgm_forward(
        x.numpy(), means.numpy(), log_var.numpy(), labels.numpy(), alpha=1.2
    )
    np_grads = lgm_core.lgm_backward(
        gz.numpy(),
        gl.numpy(),
        np_logits,
        x.numpy(),
        means.numpy(),
        log_var.numpy(),
        labels.numpy(),
        alpha=1.2,
    )
    # Same core, GEMMs by different BLAS calls: equal up to the GEMMs' rounding.
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    for a, b in zip((logits, loglik, *grads), (np_logits, np_loglik, *np_grads), strict=True):
        assert max_rel_err(a.detach(), b) <= tol


def test_opcheck() -> None:
    x, means, log_var, labels = _case(n=5, c=3, d=4)
    args = [t.clone().requires_grad_(True) for t in (x, means, log_var)]
    torch.library.opcheck(torch.ops.lsoftmax.lgm_logits, (*args, labels, 0.5, True))
    torch.library.opcheck(torch.ops.lsoftmax.lgm_logits, (*args, None, 0.0, False))
    torch.library.opcheck(
        torch.ops.lsoftmax.lgm_margin_logits,
        (*args, labels, torch.tensor(0.5, dtype=torch.float64), True),
    )


# --- the module --------------------------------------------------------------------------------


def test_parameters_names_and_shapes() -> None:
    diag = LGMLoss(10, 3)
    assert dict(diag.named_parameters()).keys() == {"means", "log_var"}
    assert diag.means.shape == (10, 3) and diag.log_var.shape == (10, 3)
    iso = LGMLoss(10, 3, isotropic=True)
    assert iso.log_var.shape == (10, 1)
    frozen = LGMLoss(10, 3, learn_variance=False)
    assert not frozen.log_var.requires_grad and frozen.means.requires_grad
    assert "step" in diag.state_dict()
    torch.testing.assert_close(diag.variances, torch.ones(10, 3))


def test_param_groups_give_the_variances_a_smaller_lr() -> None:
    lgm = LGMLoss(5, 2)
    groups = lgm.param_groups(0.1, var_lr_mult=0.01)
    assert groups[0]["params"] == [lgm.means] and groups[0]["lr"] == 0.1
    assert groups[1]["params"] == [lgm.log_var] and groups[1]["lr"] == pytest.approx(0.001)
    opt = torch.optim.SGD(groups, lr=0.1)
    assert len(opt.param_groups) == 2
    assert len(LGMLoss(5, 2, learn_variance=False).param_groups(0.1)) == 1


def test_forward_modes() -> None:
    torch.manual_seed(0)
    lgm = LGMLoss(5, 3, alpha=0.7, lambda_lkd=0.2, dtype=torch.float64)
    with torch.no_grad():
        lgm.log_var.normal_(0.0, 0.3)
    x, _, _, labels = _case(n=9, c=5, d=3, seed=12)
    lv = lgm.log_var.detach()
    ref_m, ll_m = lgm_reference(x, lgm.means.detach(), lv, labels, 0.7, True)
    ref_0, ll_0 = lgm_reference(x, lgm.means.detach(), lv, labels, 0.0, True)
    ref_nolab, _ = lgm_reference(x, lgm.means.detach(), lv, None, 0.0, True)

    loss, logits = lgm(x, labels)  # training, with a target: margin
    torch.testing.assert_close(logits.detach(), ref_m, rtol=1e-12, atol=1e-12)
    want = F.cross_entropy(ref_m, labels) - 0.2 * ll_m.mean()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-12, atol=1e-12)
    assert int(lgm.step) == 1

    none, logits = lgm(x)  # no target: no loss, no margin, no step
    assert none is None and int(lgm.step) == 1
    torch.testing.assert_close(logits.detach(), ref_nolab, rtol=1e-12, atol=1e-12)

    lgm.eval()  # eval with a target: the loss without margin, no step
    loss, logits = lgm(x, labels)
    torch.testing.assert_close(logits.detach(), ref_0, rtol=1e-12, atol=1e-12)
    want = F.cross_entropy(ref_0, labels) - 0.2 * ll_0.mean()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-12, atol=1e-12)
    assert int(lgm.step) == 1

    logits, loglik = LGMClassifier(lgm)(x)
    _, ll_pred = lgm_reference(x, lgm.means.detach(), lv, None, 0.0, True)
    torch.testing.assert_close(logits.detach(), ref_nolab, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loglik.detach(), ll_pred, rtol=1e-12, atol=1e-12)


def test_stepup_alpha_schedule_and_state_dict() -> None:
    sched = StepUp(0.1, 2.0, 3, 1.0)
    lgm = LGMLoss(4, 2, alpha_schedule=sched, dtype=torch.float64)
    x, _, _, labels = _case(n=8, c=4, d=2, seed=13)
    seen = []
    for _ in range(12):
        _, logits = lgm(x, labels)
        # Recover alpha from the label's logit: z_y = -(1 + alpha) d_y - h_y.
        plain, _ = lgm_reference(x, lgm.means.detach(), lgm.log_var.detach(), labels, 0.0, True)
        rows = torch.arange(8)
        h = 0.5 * lgm.log_var.detach().sum(1)[labels]
        d = -(plain[rows, labels] + h)
        alpha = (-(logits.detach()[rows, labels] + h) / d - 1.0).mean().item()
        seen.append(alpha)
        assert lgm.current_alpha == pytest.approx(alpha, rel=1e-9)
    assert seen == pytest.approx([sched.value(i) for i in range(12)], rel=1e-9)
    restored = LGMLoss(4, 2, alpha_schedule=sched, dtype=torch.float64)
    restored.load_state_dict(lgm.state_dict())
    assert int(restored.step) == 12


def test_training_forward_compiles_without_graph_breaks() -> None:
    torch._dynamo.reset()
    sched = StepUp(0.5, 2.0, 2, 3.0)
    lgm = LGMLoss(4, 3, alpha_schedule=sched)
    eager = LGMLoss(4, 3, alpha_schedule=sched)
    eager.load_state_dict(lgm.state_dict())
    x, _, _, labels = _case(torch.float32, n=8, c=4, d=3, seed=14)
    compiled = torch.compile(lambda f, t: lgm(f, t), fullgraph=True)
    for _ in range(3):
        loss, logits = compiled(x, labels)
        loss.backward()
        want_loss, want_logits = eager(x, labels)
        want_loss.backward()
        torch.testing.assert_close(logits, want_logits)
        torch.testing.assert_close(lgm.log_var.grad, eager.log_var.grad)
        torch.testing.assert_close(lgm.means.grad, eager.means.grad)
    assert int(lgm.step) == 3 and lgm.current_alpha == sched.value(2)


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input_raises_clearly() -> None:
    x, means, log_var, labels = _case(n=6, c=4, d=3)
    lgm = LGMLoss(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="target"):
        lgm(x, labels.double())
    with pytest.raises(ValueError, match=r"labels\[2\]"):
        bad = labels.clone()
        bad[2] = 4
        lgm(x, bad)
    with pytest.raises(ValueError, match="features"):
        lgm(x[:, :2], labels)
    with pytest.raises(ValueError, match="target"):
        lgm(x, labels[:5])
    with pytest.raises(TypeError, match="means"):
        lgm(x.float(), labels)
    with pytest.raises(ValueError, match="alpha"):
        LGMLoss(4, 3, alpha=-1.0)
    with pytest.raises(ValueError, match="lambda_lkd"):
        LGMLoss(4, 3, lambda_lkd=-0.1)
    with pytest.raises(ValueError, match="alpha"):
        torch.ops.lsoftmax.lgm_logits(x, means, log_var, labels, -0.5, True)
    with pytest.raises(ValueError, match="log_var"):
        torch.ops.lsoftmax.lgm_logits(x, means, log_var[:, :2], labels, 0.5, True)
    with pytest.raises(ValueError, match="variances"):
        log_var_from_variances(torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="variances"):
        log_var_from_variances(torch.tensor([[1.0, -2.0]]))
    torch.testing.assert_close(
        log_var_from_variances(torch.tensor([[1.0, 4.0]], dtype=torch.float64)),
        torch.log(torch.tensor([[1.0, 4.0]], dtype=torch.float64)),
    )


# --- robustness ---------------------------------------------------------------------------------


def _collapse_run(floor: float, steps: int = 300) -> tuple[list[float], LGMLoss]:
    """Free features and a strong likelihood term (lambda_lkd = 10): features and means pull
    together and the log-determinant drives every variance towards zero."""
    torch.manual_seed(0)
    target = torch.arange(4).repeat(8)
    lgm = LGMLoss(4, 2, alpha=0.5, lambda_lkd=10.0, log_var_floor=floor)
    feats = torch.nn.Parameter(lgm.means.detach()[target] + 0.3 * torch.randn(32, 2))
    opt = torch.optim.Adam([{"params": [feats], "lr": 0.1}, *lgm.param_groups(0.1, 1.0)])
    losses = []
    for _ in range(steps):
        loss, _ = lgm(feats, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, lgm


def test_variances_stay_above_the_floor_under_collapse_pressure() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread start-up would dominate
    try:
        losses, lgm = _collapse_run(LOG_VAR_FLOOR)
        free_losses, free = _collapse_run(-math.inf)
    finally:
        torch.set_num_threads(before)
    assert all(math.isfinite(v) for v in losses)
    assert lgm.variances.min().item() >= 1e-4 * (1 - 1e-6)
    # The pressure is real: the raw parameter went below the floor, and without the floor the
    # same run takes the variances below it.
    assert lgm.log_var.min().item() < LOG_VAR_FLOOR
    assert free.variances.min().item() < 1e-4
    assert np.isfinite(free_losses[0])


def test_constant_alpha_is_the_default_schedule() -> None:
    lgm = LGMLoss(3, 2, alpha=0.25)
    assert isinstance(lgm.alpha_schedule, Constant)
    assert lgm.current_alpha == 0.25

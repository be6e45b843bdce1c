"""The margin family on torch: ``margin_logits``, ``MarginLinear`` and the
``lsoftmax::margin_family_*`` custom ops against the float64 reference, gradcheck for every kind,
torch.compile and torch.export."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import TOL, needs_torch_cuda
from reference import family_reference, max_rel_err
from test_margin_family import IDS, SPECS, case

from lsoftmax.margins import ArcFace, CosFace, LSoftmax, SphereFace
from lsoftmax.schedules import Constant
from lsoftmax.torch import LSoftmaxLinear, MarginLinear
from lsoftmax.torch.functional import margin_logits
from lsoftmax.torch.ops import DOUBLE_BACKWARD_ERROR


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("spec", "params"), SPECS, ids=IDS)
def test_margin_logits_match_reference(spec: Any, params: dict[str, Any], dtype: Any) -> None:
    x64, w64, labels = case()
    lam = 0.7 if spec.uses_lambda else 0.0
    grad = torch.randn(x64.shape[0], w64.shape[0], generator=torch.Generator().manual_seed(3))
    x = x64.to(dtype).requires_grad_(True)
    w = w64.to(dtype).requires_grad_(True)
    out = margin_logits(x, w, labels, spec, lam)
    gx, gw = torch.autograd.grad(out, (x, w), grad.to(dtype))
    xr = x.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(True)
    ref = family_reference(xr, wr, labels, spec.kind, params, lam)
    rgx, rgw = torch.autograd.grad(ref, (xr, wr), grad.double())
    tol = TOL[dtype]
    assert out.dtype == dtype
    assert max_rel_err(out.detach(), ref.detach()) <= tol
    assert max_rel_err(gx, rgx) <= tol
    assert max_rel_err(gw, rgw) <= tol
    plain = margin_logits(x.detach(), w.detach(), None, spec)
    assert max_rel_err(plain, family_reference(xr, wr, None, spec.kind, params)) <= tol


@pytest.mark.parametrize(("spec", "params"), SPECS, ids=IDS)
def test_gradcheck(spec: Any, params: dict[str, Any]) -> None:
    del params
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 1])
    lam = 0.5 if spec.uses_lambda else 0.0
    assert torch.autograd.gradcheck(lambda a, b: margin_logits(a, b, y, spec, lam), (x, w))
    # The op called directly, without labels too (the plain normalized logits).
    op = torch.ops.lsoftmax.margin_family_linear
    assert torch.autograd.gradcheck(
        lambda a, b: op(a, b, None, 0.0, spec.kind, spec.params()), (x, w)
    )


def test_double_backward_is_refused() -> None:
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out = margin_logits(x, w, torch.tensor([0, 1, 2]), CosFace(0.35, 8.0))
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="do not support double backward"):
        gx.sum().backward()
    assert "double backward" in DOUBLE_BACKWARD_ERROR


def test_op_rejects_bad_specs_and_labels() -> None:
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    op = torch.ops.lsoftmax.margin_family_linear
    with pytest.raises(ValueError, match="unknown margin kind 'nope'"):
        op(x, w, None, 0.0, "nope", [0.0] * 6)
    with pytest.raises(ValueError, match="cosface scale s must be a finite number > 0"):
        op(x, w, None, 0.0, "cosface", [0.3, 0, 0, 0, 0.0, 0])
    with pytest.raises(ValueError, match=r"labels\[2\] = 5 is out of range \[0, 5\)"):
        op(x, w, torch.tensor([0, 1, 5]), 0.0, "arcface", ArcFace().params())
    with pytest.raises(TypeError, match=r"margin must be a lsoftmax\.margins\.Margin"):
        margin_logits(x, w, None, 4)  # type: ignore[arg-type]


# --- MarginLinear --------------------------------------------------------------------------


def test_margin_linear_train_eval_and_nd_inputs() -> None:
    torch.manual_seed(0)
    head = MarginLinear(4, 5, margin=CosFace(0.35, 10.0))
    x, y = torch.randn(6, 4, dtype=torch.float32), torch.randint(0, 5, (6,))
    head.train()
    out = head(x, y)
    ref = family_reference(x, head.weight, y, "cosface", {"m": 0.35, "s": 10.0})
    assert max_rel_err(out.detach(), ref.detach()) <= 1e-5
    head.eval()
    plain = head(x, y)
    assert (
        max_rel_err(
            plain.detach(),
            family_reference(x, head.weight, None, "cosface", {"m": 0.35, "s": 10.0}),
        )
        <= 1e-5
    )
    nd = head(x.reshape(2, 3, 4), y.reshape(2, 3))
    torch.testing.assert_close(nd.reshape(6, 5), plain)


def test_margin_linear_defaults_state_dict_and_schedule() -> None:
    head = MarginLinear(4, 5)
    assert head.margin == ArcFace(0.5, 64.0)
    assert head.schedule == Constant(0.0)
    sph = MarginLinear(4, 5, margin=SphereFace(2))
    assert sph.schedule.to_dict() == {
        "kind": "exponential",
        "base": 1000.0,
        "gamma": 0.12,
        "power": 1.0,
        "lambda_min": 5.0,
        "iteration": 0,
    }
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    for _ in range(3):
        sph(x, y)
    restored = MarginLinear(4, 5)
    restored.load_state_dict(sph.state_dict())
    assert restored.margin == SphereFace(2)
    assert int(restored.step) == 3 and restored.schedule == sph.schedule
    assert "margin=SphereFace(m=2)" in repr(restored)
    with pytest.raises(TypeError, match=r"margin must be a lsoftmax\.margins\.Margin"):
        MarginLinear(4, 5, margin=4)  # type: ignore[arg-type]


def test_margin_linear_lsoftmax_is_lsoftmax_linear() -> None:
    torch.manual_seed(0)
    ref = LSoftmaxLinear(4, 5, margin=3)
    head = MarginLinear(4, 5, margin=LSoftmax(3))
    head.load_state_dict(
        {
            "weight": ref.weight.detach().clone(),
            "step": ref.step.clone(),
            "_extra_state": head.get_extra_state(),
        }
    )
    x, y = torch.randn(6, 4, dtype=torch.float32), torch.randint(0, 5, (6,))
    torch.testing.assert_close(head(x, y), ref(x, y), rtol=0, atol=0)


# --- torch.compile and torch.export ----------------------------------------------------------


@pytest.mark.parametrize("spec", [SphereFace(2), ArcFace(0.5, 8.0)], ids=["sphereface", "arcface"])
def test_compile_fullgraph_matches_eager(spec: Any) -> None:
    torch.manual_seed(0)
    eager = MarginLinear(4, 5, margin=spec).double()
    compiled_head = copy.deepcopy(eager)
    compiled = torch.compile(compiled_head, fullgraph=True)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 5, (6,))
    out_e, out_c = eager(x, y), compiled(x, y)
    torch.testing.assert_close(out_c, out_e, rtol=1e-12, atol=1e-12)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    torch.testing.assert_close(compiled_head.weight.grad, eager.weight.grad, rtol=1e-12, atol=1e-12)
    assert int(compiled_head.step) == int(eager.step) == 1


def test_export_emits_the_family_op() -> None:
    head = MarginLinear(4, 5, margin=ArcFace(0.5, 8.0)).eval()
    x = torch.randn(3, 4)
    ep = torch.export.export(head, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "lsoftmax.margin_family_linear.default" in targets
    torch.testing.assert_close(ep.module()(x), head(x))

    class Train(torch.nn.Module):
        def forward(self, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return margin_logits(x, w, y, CosFace(0.35, 8.0))

    w, y = torch.randn(5, 4), torch.tensor([0, 1, 2])
    ep2 = torch.export.export(Train(), (x, w, y))
    torch.testing.assert_close(ep2.module()(x, w, y), Train()(x, w, y))


def test_opcheck() -> None:
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 1])
    torch.library.opcheck(
        torch.ops.lsoftmax.margin_family_linear.default,
        (x, w, y, 0.0, "arcface", ArcFace(0.5, 8.0).params()),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


# --- CUDA (skipped without a GPU) --------------------------------------------------------------


@pytest.mark.gpu
@needs_torch_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("spec", "params"), SPECS, ids=IDS)
def test_cuda_matches_reference(spec: Any, params: dict[str, Any], dtype: Any) -> None:
    from lsoftmax import _core
    from lsoftmax.torch._kernels import _mat, _vec

    x64, w64, labels = case()
    lam = 0.7 if spec.uses_lambda else 0.0
    grad = torch.randn(x64.shape[0], w64.shape[0], generator=torch.Generator().manual_seed(3))
    x = x64.to(dtype).cuda().requires_grad_(True)
    w = w64.to(dtype).cuda().requires_grad_(True)
    out = margin_logits(x, w, labels.cuda(), spec, lam)
    gx, gw = torch.autograd.grad(out, (x, w), grad.to(dtype).cuda())
    xr = x.detach().cpu().double().requires_grad_(True)
    wr = w.detach().cpu().double().requires_grad_(True)
    ref = family_reference(xr, wr, labels, spec.kind, params, lam)
    rgx, rgw = torch.autograd.grad(ref, (xr, wr), grad.double())
    tol = TOL[dtype]
    assert max_rel_err(out.detach().cpu(), ref.detach()) <= tol
    assert max_rel_err(gx.cpu(), rgx) <= tol
    assert max_rel_err(gw.cpu(), rgw) <= tol
    # The raw-input device forward (the ONNX Runtime CUDA EP's entry point) on the plain logits.
    plain = margin_logits(x.detach(), w.detach(), None, spec).contiguous()
    y = labels.cuda()
    _core.cuda_margin_family_forward_(
        _mat("logits", plain),
        _mat("x", x.detach()),
        _mat("weight", w.detach()),
        _vec(y),
        spec.kind,
        spec.params(),
        lam,
        stream=torch.cuda.current_stream().cuda_stream,
    )
    assert max_rel_err(plain.cpu(), ref.detach()) <= tol

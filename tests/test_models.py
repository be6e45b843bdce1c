"""Models: the paper's MNIST net structure, heads, margin logits, param groups, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lsoftmax.checkpoint import load_model, save_checkpoint
from lsoftmax.models import MODELS, build_model, model_kwargs_for
from lsoftmax.schedules import Constant, Exponential
from lsoftmax.torch import LSoftmaxLinear


def margin_target_logit_f64(x: torch.Tensor, w: torch.Tensor, m: int, lam: float) -> torch.Tensor:
    """Independent float64 reference of the L-Softmax target logit (acos, not Chebyshev)."""
    x, w = x.double(), w.double()
    xn, wn = x.norm(dim=1), w.norm(dim=1)
    c = ((x * w).sum(1) / (xn * wn)).clamp(-1, 1)
    theta = torch.acos(c)
    k = torch.floor(theta * m / math.pi).clamp(max=m - 1)
    psi = (-1.0) ** k * torch.cos(m * theta) - 2 * k
    return (lam * (x * w).sum(1) + xn * wn * psi) / (1 + lam)


def test_mnist_net_matches_the_prototxt() -> None:
    model = build_model("mnist_net", margin=4)
    convs = [m for m in model.body if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.body if isinstance(m, nn.BatchNorm2d)]
    pools = [m for m in model.body if isinstance(m, nn.MaxPool2d)]
    # pre_conv + 3 stages of 3 convs, each with batch norm; pooling after each stage.
    assert [c.out_channels for c in convs] == [64] + [64] * 3 + [128] * 3 + [256] * 3
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert len(bns) == len(convs) and len(pools) == 3
    fc = model.fc[0]
    assert isinstance(fc, nn.Linear) and (fc.in_features, fc.out_features) == (256 * 3 * 3, 512)
    assert isinstance(model.head, LSoftmaxLinear) and model.head.weight.shape == (10, 512)
    # Same structure at 1/8 width (the full one is slow to run on a shared CI core).
    small = build_model("mnist_net", margin=4, width=8, feat_dim=32).eval()
    x = torch.randn(2, 1, 28, 28)
    assert small.features(x).shape == (2, 32) and small(x).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_margin_logits_in_training_only(name: str) -> None:
    torch.manual_seed(0)
    shape = (1, 8, 8) if name == "mlp" else (1, 28, 28)
    kwargs = model_kwargs_for(name, shape, 10, margin=3, schedule=Constant(0.5).to_dict())
    if name == "mnist_net":
        kwargs.update(width=4, convs_per_stage=1, feat_dim=16)
    model = build_model(name, **kwargs)
    x, y = torch.randn(6, *shape), torch.arange(6) % 10
    model.eval()
    plain = model(x)
    feat = model.features(x).detach()
    torch.testing.assert_close(plain, feat @ model.head.weight.T)
    # BN in eval mode keeps the features identical, so the training logits differ only in the
    # target column, by the independent reference formula.
    model.head.train()
    margin = model(x, y).detach()
    rows = torch.arange(6)
    mask = torch.zeros_like(margin, dtype=torch.bool)
    mask[rows, y] = True
    torch.testing.assert_close(margin[~mask], plain[~mask])
    ref = margin_target_logit_f64(feat, model.head.weight.detach()[y], 3, 0.5)
    torch.testing.assert_close(margin[rows, y].double(), ref, rtol=1e-5, atol=1e-5)
    assert model.step == 1 and model.current_lambda == 0.5


def test_loss_backward_and_param_groups() -> None:
    model = build_model("mlp", margin=2, hidden=(16,), feat_dim=8)
    groups = model.param_groups(0.1, 5e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.head.weight) in decayed
    assert all(p.ndim > 1 for p in model.parameters() if id(p) in decayed)
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    loss, logits = model.loss(x, y)
    loss.backward()
    assert logits.shape == (5, 10) and torch.isfinite(loss)
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_lgm_head() -> None:
    model = build_model("mlp", head="lgm", alpha=0.1, lambda_lkd=0.01, feat_dim=2)
    assert model.head.means.shape == (10, 2)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8)
    loss, logits = model.loss(x, y)
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (8, 10)
    assert model.head.means.grad is not None
    groups = model.param_groups(0.1, 5e-4)
    lrs = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lrs[id(model.head.log_var)] < lrs[id(model.head.means)]
    model.eval()
    assert model(x).shape == (8, 10)
    assert model.current_lambda is None


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")
    with pytest.raises(ValueError, match="margin"):
        build_model("mlp", margin=0)
    with pytest.raises(ValueError, match="head"):
        build_model("mlp", head="arcface")
    with pytest.raises(ValueError, match="model 'mlp' does not take width"):
        build_model("mlp", width=4)


def test_checkpoint_roundtrip_keeps_weights_and_schedule_step(tmp_path: Path) -> None:
    sched = Exponential(base=100, gamma=0.1, power=2)
    kwargs = model_kwargs_for("mlp", (1, 8, 8), 10, margin=4, schedule=sched.to_dict())
    model = build_model("mlp", **kwargs)
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    for _ in range(3):
        model.loss(x, y)[0].backward()
    path = tmp_path / "ck.pt"
    save_checkpoint(path, "mlp", kwargs, model, {"input_shape": [1, 8, 8], "dtype": "float32"})
    loaded, meta = load_model(path)
    assert meta["input_shape"] == [1, 8, 8] and meta["dtype"] == "float32"
    assert loaded.step == 3 and loaded.head.schedule == sched
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    model.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

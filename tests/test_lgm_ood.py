"""The out-of-distribution recipe of docs/lgm.md on sklearn digits: train a small MLP with
``LGMLoss`` for a few seconds, take the log-likelihood of the predicted class from
``LGMClassifier``, threshold it at the 5th percentile of held-out in-distribution data, and flag
what falls below. Uniform noise must be flagged; in-distribution test digits must mostly not be.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lsoftmax.torch import LGMClassifier, LGMLoss

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


class _Model:
    def __init__(self, net: nn.Module, clf: LGMClassifier, threshold: float, test: tuple) -> None:
        self.net, self.clf, self.threshold, self.test = net, clf, threshold, test

    @torch.no_grad()
    def score(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        return self.clf(self.net(inputs))


@pytest.fixture(scope="module")
def model() -> _Model:
    from sklearn.datasets import load_digits

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: thread start-up would dominate
    try:
        x_np, y_np = load_digits(return_X_y=True)
        x = torch.tensor(x_np / 16.0, dtype=torch.float32)
        y = torch.tensor(y_np)
        gen = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(x), generator=gen)
        train, held_out, test = perm[:1200], perm[1200:1500], perm[1500:]
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 16)
        )
        lgm = LGMLoss(10, 16, alpha=0.3, lambda_lkd=1.0)
        opt = torch.optim.Adam([{"params": net.parameters(), "lr": 3e-3}, *lgm.param_groups(3e-3)])
        for _ in range(40):
            order = train[torch.randperm(len(train), generator=gen)]
            for start in range(0, len(order), 64):
                idx = order[start : start + 64]
                loss, _ = lgm(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        lgm.eval()
        clf = LGMClassifier(lgm)
        with torch.no_grad():
            _, held_out_loglik = clf(net(x[held_out]))
        threshold = torch.quantile(held_out_loglik, 0.05).item()
        return _Model(net, clf, threshold, (x[test], y[test]))
    finally:
        torch.set_num_threads(before)


def test_in_distribution_is_classified_and_mostly_accepted(model: _Model) -> None:
    x, y = model.test
    logits, loglik = model.score(x)
    assert (logits.argmax(1) == y).float().mean().item() >= 0.9
    false_positive_rate = (loglik < model.threshold).float().mean().item()
    assert false_positive_rate <= 0.15  # the threshold targets 5 %


def test_uniform_noise_is_flagged(model: _Model) -> None:
    noise = torch.rand(1000, 64, generator=torch.Generator().manual_seed(1))
    _, loglik = model.score(noise)
    assert (loglik < model.threshold).float().mean().item() >= 0.8


@pytest.mark.skipif(not FASHION.exists(), reason=f"Fashion-MNIST not found at {FASHION}")
def test_fashion_mnist_is_mostly_flagged(model: _Model) -> None:
    with gzip.open(FASHION) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:2000]
    small = torch.nn.functional.interpolate(
        torch.tensor(images, dtype=torch.float32) / 255.0, size=(8, 8), mode="area"
    ).reshape(-1, 64)
    _, loglik = model.score(small)
    assert (loglik < model.threshold).float().mean().item() >= 0.5

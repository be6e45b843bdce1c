"""Networks for the paper's experiments, each a feature extractor plus a pluggable margin head.

* ``mnist_net``: the paper's MNIST network, after the original Caffe prototxt
  (``lsoftmax_mnist_train_test.prototxt``): a 3×3 conv "pre" layer, then three stages of three
  3×3 convs (64, 128, 256 channels), each conv followed by batch norm and ReLU, 2×2 max pooling
  after every stage, a 512-wide FC layer with batch norm and ReLU, then the head. ``width``
  scales every channel count (``width=64`` is the paper's), ``convs_per_stage`` shortens it.
* ``feat2d_net``: a smaller conv net whose feature layer has 2 units, for the paper's
  Figure 2 style scatter plots.
* ``mlp``: a small MLP for scikit-learn's 8×8 digits.

Heads: ``head="lsoftmax"`` is :class:`lsoftmax.torch.LSoftmaxLinear` (``margin``, ``schedule``);
``head="lgm"`` is ``lsoftmax.torch.LGMLoss`` (``alpha``, ``lambda_lkd``, ...). Every model's
``forward(x, target=None)`` returns logits (margin logits in training with a target), and
``features(x)`` the input of the head. ``loss(x, target) -> (loss, logits)`` is what training
calls. :func:`build_model` rebuilds a model from its name and JSON-able keyword arguments (the
checkpoint format stores exactly those).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsoftmax.schedules import Schedule, schedule_from_dict
from lsoftmax.torch.modules import LSoftmaxLinear

__all__ = [
    "HEADS",
    "MODELS",
    "Feat2DNet",
    "FeatureMLP",
    "MNISTNet",
    "MarginClassifier",
    "build_model",
    "lgm_available",
]

HEADS = ("lsoftmax", "lgm")


def lgm_available() -> bool:
    """Whether ``lsoftmax.torch.LGMLoss`` exists in this installation."""
    try:
        from lsoftmax.torch import LGMLoss  # noqa: F401
    except ImportError:
        return False
    return True


def _lgm_class() -> Any:
    try:
        from lsoftmax.torch import LGMLoss
    except ImportError as e:
        raise RuntimeError(
            "head 'lgm' needs lsoftmax.torch.LGMLoss, which this installation does not have yet"
        ) from e
    return LGMLoss


def _as_schedule(schedule: Schedule | dict[str, Any] | None) -> Schedule | None:
    if schedule is None or isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, dict):
        return schedule_from_dict(schedule)
    raise TypeError(f"schedule must be a Schedule or its to_dict(), got {type(schedule).__name__}")


class MarginClassifier(nn.Module):
    """Base class: ``body`` maps inputs to features, ``head`` maps features to logits."""

    def __init__(
        self,
        feat_dim: int,
        num_classes: int,
        *,
        head: str = "lsoftmax",
        margin: int = 4,
        schedule: Schedule | dict[str, Any] | None = None,
        alpha: float = 0.1,
        lambda_lkd: float = 0.01,
        isotropic: bool = False,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.head_kind = head
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.head: nn.Module
        if head == "lsoftmax":
            self.head = LSoftmaxLinear(feat_dim, num_classes, margin, _as_schedule(schedule))
        else:
            self.head = _lgm_class()(
                num_classes, feat_dim, alpha=alpha, lambda_lkd=lambda_lkd, isotropic=isotropic
            )

    def features(self, x: Tensor) -> Tensor:
        """The head's input for ``x``."""
        raise NotImplementedError

    def forward(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        feat = self.features(x)
        if self.head_kind == "lgm":
            return self.head(feat, target if self.training else None)[1]
        return self.head(feat, target)

    def loss(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Training loss and the (margin) logits it was computed from."""
        feat = self.features(x)
        if self.head_kind == "lgm":
            loss, logits = self.head(feat, target)
            return loss, logits
        logits = self.head(feat, target)
        return F.cross_entropy(logits, target), logits

    @property
    def current_lambda(self) -> float | None:
        """The L-Softmax head's latest lambda (``None`` for other heads)."""
        if isinstance(self.head, LSoftmaxLinear):
            return self.head.current_lambda
        return None

    @property
    def step(self) -> int:
        """Steps counted by the L-Softmax head (0 for other heads)."""
        return int(self.head.step) if isinstance(self.head, LSoftmaxLinear) else 0

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """SGD parameter groups the way the Caffe solver sets them up.

        Conv/FC weights and the head decay; biases and batch-norm parameters do not
        (``decay_mult: 0`` in the prototxt); L-GM variances get the head's own learning rate.
        """
        head_ids: set[int] = set()
        groups: list[dict[str, Any]] = []
        if self.head_kind == "lgm" and hasattr(self.head, "param_groups"):
            for g in self.head.param_groups(lr):
                g = dict(g)
                g.setdefault("weight_decay", 0.0)
                head_ids.update(id(p) for p in g["params"])
                groups.append(g)
        decay, no_decay = [], []
        for p in self.parameters():
            if id(p) in head_ids or not p.requires_grad:
                continue
            (decay if p.ndim > 1 else no_decay).append(p)
        groups.insert(0, {"params": decay, "lr": lr, "weight_decay": weight_decay})
        groups.insert(1, {"params": no_decay, "lr": lr, "weight_decay": 0.0})
        return [g for g in groups if g["params"]]


def _conv_bn_act(cin: int, cout: int, act: Callable[[int], nn.Module]) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), act(cout)]


def _activation(name: str) -> Callable[[int], nn.Module]:
    if name == "relu":
        return lambda c: nn.ReLU(inplace=True)
    if name == "prelu":
        return lambda c: nn.PReLU(c)
    raise ValueError(f"activation must be 'relu' or 'prelu', got {name!r}")


def _msra_init(module: nn.Module) -> None:
    # Caffe's "msra" weight filler and constant-0 bias filler, as in the prototxt.
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MNISTNet(MarginClassifier):
    """The paper's MNIST network (see the module docstring)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        width: int = 64,
        convs_per_stage: int = 3,
        feat_dim: int = 512,
        activation: str = "relu",
        **head_kwargs: Any,
    ) -> None:
        super().__init__(feat_dim, num_classes, **head_kwargs)
        act = _activation(activation)
        layers: list[nn.Module] = _conv_bn_act(in_channels, width, act)
        cin, size = width, input_size
        for stage in range(3):
            cout = width * (2**stage)
            for _ in range(convs_per_stage):
                layers += _conv_bn_act(cin, cout, act)
                cin = cout
            layers.append(nn.MaxPool2d(2, 2))
            size //= 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Sequential(
            nn.Linear(cin * size * size, feat_dim), nn.BatchNorm1d(feat_dim), act(feat_dim)
        )
        _msra_init(self.body)
        _msra_init(self.fc)

    def features(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


class Feat2DNet(MarginClassifier):
    """Conv net with a 2-D feature layer (no activation on it) for Figure 2 style plots."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        width: int = 32,
        feat_dim: int = 2,
        **head_kwargs: Any,
    ) -> None:
        super().__init__(feat_dim, num_classes, **head_kwargs)
        act = _activation("prelu")
        layers: list[nn.Module] = []
        cin, size = in_channels, input_size
        for stage in range(3):
            cout = width * (2**stage)
            layers += _conv_bn_act(cin, cout, act) + _conv_bn_act(cout, cout, act)
            layers.append(nn.MaxPool2d(2, 2))
            cin = cout
            size //= 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        # A 2-wide bottleneck is hard to train straight from a big flatten: go through 64 units.
        self.fc = nn.Sequential(
            nn.Linear(cin * size * size, 64), nn.PReLU(64), nn.Linear(64, feat_dim)
        )
        _msra_init(self.body)
        _msra_init(self.fc)

    def features(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


class FeatureMLP(MarginClassifier):
    """A small MLP (BN + PReLU hidden layers) for flat or small inputs such as 8×8 digits."""

    def __init__(
        self,
        num_classes: int = 10,
        in_features: int = 64,
        hidden: Sequence[int] = (128,),
        feat_dim: int = 32,
        **head_kwargs: Any,
    ) -> None:
        super().__init__(feat_dim, num_classes, **head_kwargs)
        sizes = [in_features, *hidden, feat_dim]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            # No activation after a 2-D feature layer, so its scatter plot is not clipped.
            if i < len(sizes) - 2 or feat_dim > 2:
                layers += [nn.BatchNorm1d(b), nn.PReLU(b)]
        self.body = nn.Sequential(*layers)
        _msra_init(self.body)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


MODELS: dict[str, type[MarginClassifier]] = {
    "mnist_net": MNISTNet,
    "feat2d_net": Feat2DNet,
    "mlp": FeatureMLP,
}


def build_model(name: str, **kwargs: Any) -> MarginClassifier:
    """Build a model by registry name; ``kwargs`` are the constructor's (JSON-able) arguments."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    if isinstance(kwargs.get("hidden"), list):
        kwargs["hidden"] = tuple(kwargs["hidden"])
    cls = MODELS[name]
    own = set(inspect.signature(cls.__init__).parameters)
    head = set(inspect.signature(MarginClassifier.__init__).parameters) - {"feat_dim"}
    unknown = sorted(set(kwargs) - own - head)
    if unknown:
        raise ValueError(f"model {name!r} does not take {', '.join(unknown)}")
    return cls(**kwargs)


def model_kwargs_for(
    name: str, input_shape: Sequence[int], num_classes: int, **overrides: Any
) -> dict[str, Any]:
    """Constructor kwargs that fit a data set's input shape ``(C, H, W)``."""
    c, h, w = (int(v) for v in input_shape)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if name == "mlp":
        kwargs["in_features"] = c * h * w
    else:
        if h != w or h < 8:
            raise ValueError(f"model {name!r} needs square inputs of at least 8×8, got {h}×{w}")
        kwargs.update(in_channels=c, input_size=h)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs


def example_input(input_shape: Sequence[int], batch: int = 2) -> Tensor:
    """A float32 dummy batch for export and shape checks."""
    return torch.zeros((batch, *(int(v) for v in input_shape)), dtype=torch.float32)

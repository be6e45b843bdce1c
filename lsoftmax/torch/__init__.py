"""PyTorch side of lsoftmax: the ``lsoftmax::`` custom ops, the functional form and modules."""

from lsoftmax.schedules import Constant, Exponential, Scaled, Schedule
from lsoftmax.torch import functional, ops
from lsoftmax.torch.modules import LSoftmaxLinear

__all__ = [
    "Constant",
    "Exponential",
    "LSoftmaxLinear",
    "Scaled",
    "Schedule",
    "functional",
    "ops",
]
from lsoftmax.torch.lgm import LGMClassifier, LGMLoss  # noqa: F401

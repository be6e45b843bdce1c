"""PyTorch side of lsoftmax: the ``lsoftmax::`` custom ops, the functional form and modules."""

from lsoftmax.schedules import Constant, Exponential, Scaled, Schedule
from lsoftmax.torch import functional, ops
from lsoftmax.torch.fused import MarginCrossEntropy
from lsoftmax.torch.modules import LSoftmaxLinear, MarginLinear

__all__ = [
    "Constant",
    "Exponential",
    "LSoftmaxLinear",
    "MarginCrossEntropy",
    "MarginLinear",
    "Scaled",
    "Schedule",
    "functional",
    "ops",
]
from lsoftmax.torch._kernels import (  # noqa: F401  (CUDA settings)
    deterministic_enabled,
    get_label_check,
    set_deterministic,
    set_label_check,
)
from lsoftmax.torch.lgm import LGMClassifier, LGMLoss  # noqa: F401

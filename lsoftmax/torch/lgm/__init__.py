"""The L-GM loss in PyTorch, shaped like the L-Softmax side of ``lsoftmax.torch``:

- ``functional``: input checks (``check_lgm_inputs``) and ``log_var_from_variances``;
- ``ops``: the ``lsoftmax::lgm_logits``, ``lsoftmax::lgm_margin_logits`` and
  ``lsoftmax::lgm_backward`` custom ops, on the CPU (the core's assembly around torch's GEMMs)
  and on CUDA (the core's kernels on torch's current stream);
- ``modules``: ``LGMLoss`` (the loss over a feature layer, with an alpha schedule) and
  ``LGMClassifier`` (the inference head).
"""

from lsoftmax.torch.lgm.functional import check_lgm_inputs, log_var_from_variances
from lsoftmax.torch.lgm.modules import LOG_VAR_FLOOR, LGMClassifier, LGMLoss
from lsoftmax.torch.lgm.ops import lgm_backward, lgm_logits, lgm_margin_logits

__all__ = [
    "LOG_VAR_FLOOR",
    "LGMClassifier",
    "LGMLoss",
    "check_lgm_inputs",
    "lgm_backward",
    "lgm_logits",
    "lgm_margin_logits",
    "log_var_from_variances",
]

"""Gluon L-GM parameter files (``save_parameters``) -> ``LGMLoss`` (+ a user's feature net).

The Gluon port stores the class means as ``mean`` and the (diagonal) variances as ``var``, and
its logits keep the log-determinant (``sqrt(det)`` in the probability): they map to ``LGMLoss``
with ``log_var = log(var)`` and ``include_logdet=True``. Gluon has no graph in a parameter
file, so the feature network comes from the user as a torch module; its weights are assigned
by name (``key_map`` renames Gluon names to torch names).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np
import torch
from lsoftmax.converters.mxnet_params import read_params
from torch import Tensor, nn

__all__ = ["GluonLGMNet", "load_gluon_lgm"]


class GluonLGMNet(nn.Module):
    """``features`` then the L-GM head: ``forward(x, label=None) -> logits``.

    Eval mode (or no label): inference logits ``-d_k - 1/2 log|V_k|``. Training mode with a
    label: the head's training logits (margin ``alpha`` on the target). The L-GM loss itself
    is ``self.lgm(features, label)``.
    """

    def __init__(self, features: nn.Module, lgm: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.lgm = lgm

    def forward(self, x: Tensor, label: Tensor | None = None) -> Tensor:
        feat = self.features(x)
        if self.training and label is not None:
            return self.lgm(feat, label)[1]
        return self.lgm(feat)[1]


def _head_keys(arrays: Mapping[str, np.ndarray], path: str) -> tuple[str, str]:
    means = [k for k in arrays if k.rsplit(".", 1)[-1] == "mean"]
    if len(means) != 1:
        raise ValueError(
            f"{path}: expected exactly one L-GM 'mean' array (a name ending in 'mean'), "
            f"found {means or 'none'}"
        )
    var = means[0][: -len("mean")] + "var"
    if var not in arrays:
        raise ValueError(f"{path}: has {means[0]!r} but no {var!r}")
    return means[0], var


def _lgm_from_arrays(
    mean: np.ndarray, var: np.ndarray, path: str, alpha: float, lambda_lkd: float
) -> nn.Module:
    from lsoftmax.torch.lgm import LOG_VAR_FLOOR, LGMLoss

    if mean.ndim != 2 or mean.size == 0:
        raise ValueError(f"{path}: L-GM mean must be (classes, dim), got {list(mean.shape)}")
    c, d = mean.shape
    if var.shape not in ((c, d), (c, 1)):
        raise ValueError(
            f"{path}: L-GM var has shape {list(var.shape)}, expected {[c, d]} or {[c, 1]}"
        )
    var64 = var.astype(np.float64)
    if not np.all(np.isfinite(var64)) or np.any(var64 <= 0):
        raise ValueError(f"{path}: L-GM var must be positive and finite")
    if not np.all(np.isfinite(mean)):
        raise ValueError(f"{path}: L-GM mean must be finite")
    # Keep every stored variance as it is: lower LGMLoss's floor when the file goes below it.
    floor = min(LOG_VAR_FLOOR, float(np.log(var64.min())))
    lgm = LGMLoss(
        c,
        d,
        alpha=alpha,
        lambda_lkd=lambda_lkd,
        isotropic=var.shape[1] == 1 and d > 1,
        learn_variance=True,
        include_logdet=True,
        log_var_floor=floor,
    )
    with torch.no_grad():
        lgm.means.copy_(torch.from_numpy(mean.astype(np.float64)))
        lgm.log_var.copy_(torch.from_numpy(np.log(var64)).reshape(lgm.log_var.shape))
    return lgm


def load_gluon_lgm(
    params: str | os.PathLike[str],
    feature_net: nn.Module | None = None,
    key_map: Mapping[str, str] | Callable[[str], str | None] | None = None,
    *,
    head_params: str | os.PathLike[str] | None = None,
    alpha: float = 0.0,
    lambda_lkd: float = 0.0,
) -> nn.Module:
    """Load a Gluon L-GM model.

    ``params``: a ``save_parameters`` file. Its ``mean``/``var`` arrays (names ending in
    ``mean``/``var``) are the head, unless ``head_params`` names a separate file for them.
    Without ``feature_net`` the result is the ``LGMLoss`` head. With one, every other array is
    copied into ``feature_net.state_dict()`` under ``key_map(name)`` (a dict or a function;
    returning None skips an array; default: the same name), strictly: every torch entry must
    be filled and every array used, with equal shapes. The result is a ``GluonLGMNet``.
    ``alpha`` and ``lambda_lkd`` are training settings, which parameter files do not hold.
    """
    p = os.fspath(params)
    arrays = read_params(p)
    head_src, head_path = arrays, p
    if head_params is not None:
        head_path = os.fspath(head_params)
        head_src = read_params(head_path)
    mean_key, var_key = _head_keys(head_src, head_path)
    lgm = _lgm_from_arrays(head_src[mean_key], head_src[var_key], head_path, alpha, lambda_lkd)
    if feature_net is None:
        return lgm
    if not isinstance(feature_net, nn.Module):
        raise TypeError(f"feature_net must be a torch.nn.Module, got {type(feature_net).__name__}")
    body = {
        k: v for k, v in arrays.items() if head_params is not None or k not in (mean_key, var_key)
    }
    if callable(key_map):
        rename: Callable[[str], str | None] = key_map
    elif key_map is not None:
        mapping = dict(key_map)
        rename = lambda k: mapping.get(k, k)  # noqa: E731
    else:
        rename = lambda k: k  # noqa: E731
    state = feature_net.state_dict()
    filled: dict[str, Tensor] = {}
    for name, array in body.items():
        target = rename(name)
        if target is None:
            continue
        if target not in state:
            raise ValueError(f"{p}: array {name!r} maps to {target!r}, which feature_net lacks")
        if tuple(state[target].shape) != array.shape:
            raise ValueError(
                f"{p}: array {name!r} has shape {list(array.shape)} but feature_net's "
                f"{target!r} is {list(state[target].shape)}"
            )
        if target in filled:
            raise ValueError(f"{p}: two arrays map to {target!r}")
        filled[target] = torch.from_numpy(np.ascontiguousarray(array)).to(state[target].dtype)
    missing = [k for k in state if k not in filled and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{p}: no array for feature_net entries {missing}")
    feature_net.load_state_dict(filled, strict=False)
    return GluonLGMNet(feature_net, lgm).eval()

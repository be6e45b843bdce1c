"""Model checkpoints shared by ``lsoftmax train`` and ``lsoftmax export``.

A checkpoint is a ``torch.save``d dict that ``torch.load(weights_only=True)`` can read (no
pickled classes): the model's factory name and JSON-able constructor arguments, its
``state_dict``, and ``extra`` (training metadata: tensors, numbers, strings, lists and dicts).
``load_model`` rebuilds the model with ``lsoftmax.models.build_model(name, **kwargs)`` (or a
factory registered with ``register_factory``) and loads the weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["FORMAT", "load_model", "register_factory", "save_checkpoint"]

FORMAT = "lsoftmax-checkpoint"
VERSION = 1

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register_factory(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``name`` loadable in this process (for models not in ``lsoftmax.models``)."""
    _FACTORIES[name] = factory


def _build(name: str, kwargs: dict[str, Any]) -> nn.Module:
    if name in _FACTORIES:
        return _FACTORIES[name](**kwargs)
    from lsoftmax.models import build_model

    return build_model(name, **kwargs)


def save_checkpoint(
    path: str | os.PathLike[str],
    model_factory_name: str,
    model_kwargs: dict[str, Any],
    model: nn.Module,
    extra: dict[str, Any],
) -> None:
    """Save ``model`` so that ``load_model(path)`` rebuilds it as
    ``build_model(model_factory_name, **model_kwargs)`` with the same weights.

    ``extra`` should hold ``input_shape`` (per-sample shape, e.g. ``[64]`` or ``[1, 28, 28]``) and
    ``dtype`` (e.g. ``"float32"``) so the model can be exported without further information.
    """
    if not isinstance(model_factory_name, str) or not model_factory_name:
        raise ValueError("model_factory_name must be a non-empty string")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    try:
        kwargs = json.loads(json.dumps(model_kwargs))
    except (TypeError, ValueError) as e:
        raise ValueError(f"model_kwargs must be JSON-serializable: {e}") from None
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_name": model_factory_name,
        "model_kwargs": kwargs,
        "state_dict": model.state_dict(),
        "extra": extra,
    }
    torch.save(payload, os.fspath(path))


def _infer_input_shape(model: nn.Module) -> list[int] | None:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return [m.in_features]
        if isinstance(m, nn.Conv2d):
            return None
        if hasattr(m, "in_features") and isinstance(m.in_features, int):
            return [m.in_features]
    return None


def load_model(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by ``save_checkpoint``; returns ``(model, meta)``.

    ``meta`` holds the ``extra`` entries, plus ``model_name``, ``model_kwargs``, ``input_shape``
    (from ``extra``, or inferred from a first Linear layer), ``dtype`` (from ``extra``, or the
    parameters') and ``extra`` itself. The model is returned in eval mode.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file, not an lsoftmax checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable lsoftmax checkpoint ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not an lsoftmax checkpoint (no {FORMAT!r} header)")
    if int(payload.get("version", 0)) > VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {payload.get('version')} is newer than this "
            f"lsoftmax reads ({VERSION})"
        )
    for key in ("model_name", "model_kwargs", "state_dict"):
        if key not in payload:
            raise ValueError(f"{path}: lsoftmax checkpoint lacks {key!r}")
    name, kwargs = payload["model_name"], dict(payload["model_kwargs"])
    try:
        model = _build(name, dict(kwargs))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: cannot rebuild model {name!r}: {e}") from None
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{path}: weights do not fit model {name!r}: {first}") from None
    model.eval()
    extra = dict(payload.get("extra") or {})
    meta: dict[str, Any] = dict(extra)
    meta.update(model_name=name, model_kwargs=kwargs, extra=extra)
    if meta.get("input_shape") is None:
        meta["input_shape"] = _infer_input_shape(model)
    if meta.get("dtype") is None:
        first_param = next(model.parameters(), None)
        dtype = first_param.dtype if first_param is not None else torch.float32
        meta["dtype"] = str(dtype).removeprefix("torch.")
    return model, meta

"""Save / reload converted models (what ``lsoftmax convert --out`` writes).

The file is ``torch.save`` of the whole module (a pickle): reloading needs no source files and
no rebuild, only this package. As with any pickle, load only files you trust.
"""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["load_converted", "save_converted"]


def save_converted(module: nn.Module, path: str | os.PathLike[str]) -> None:
    torch.save(module, os.fspath(path))


def load_converted(path: str | os.PathLike[str], map_location: str = "cpu") -> nn.Module:
    """Reload a module saved by ``save_converted`` / ``lsoftmax convert --out`` (eval mode)."""
    p = os.fspath(path)
    try:
        module = torch.load(p, map_location=map_location, weights_only=False)
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot load {p!r}: {e}") from e
    except Exception as e:  # unpickling errors have many types
        raise ValueError(f"{p}: not a saved converted model ({type(e).__name__}: {e})") from e
    if not isinstance(module, nn.Module):
        raise ValueError(f"{p}: holds a {type(module).__name__}, not a torch module")
    return module.eval()

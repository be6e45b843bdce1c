"""ONNX Runtime helpers: the custom-op library's path and sessions with it registered.

>>> from lsoftmax import ort
>>> sess = ort.session("model.onnx", providers="cpu")  # doctest: +SKIP
>>> logits = sess.run(None, {"input": x})[0]  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import importlib.resources
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnxruntime

__all__ = ["DOMAIN", "kernel_calls", "library_path", "resolve_providers", "session"]

DOMAIN = "ai.lsoftmax"
LIBRARY_NAME = "liblsoftmax_ort.so"

_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}


def _package_dirs() -> list[Path]:
    # In an editable install the compiled files live in site-packages while lsoftmax.__file__
    # points at the source tree, so look where the compiled _core module is.
    dirs: list[Path] = []
    try:
        from lsoftmax import _core

        dirs.append(Path(_core.__file__).resolve().parent)
    except ImportError:
        pass
    for entry in importlib.resources.files("lsoftmax").iterdir():
        if entry.name == LIBRARY_NAME:
            dirs.append(Path(str(entry)).parent)
    return dirs


def library_path() -> str:
    """Absolute path of ``liblsoftmax_ort.so`` (the ``ai.lsoftmax`` custom-op library)."""
    override = os.environ.get("LSOFTMAX_ORT_LIBRARY")
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"LSOFTMAX_ORT_LIBRARY={override!r} is not a file")
        return str(Path(override).resolve())
    for d in _package_dirs():
        candidate = d / LIBRARY_NAME
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"{LIBRARY_NAME} was not built with this lsoftmax install (ONNX Runtime headers were "
        "not found at build time). Rebuild with ONNXRUNTIME_ROOT pointing at ONNX Runtime's "
        "headers (scripts/fetch_ort_headers.sh prints one), or export with mode='portable'."
    )


def resolve_providers(providers: str | Sequence[str] | None) -> list[str]:
    """Provider names for ONNX Runtime: ``"cpu"``/``"cuda"`` shorthands or full names."""
    if providers is None:
        return [_PROVIDERS["cpu"]]
    items = [providers] if isinstance(providers, str) else list(providers)
    if not items:
        raise ValueError("providers must name at least one execution provider")
    known = set(_PROVIDERS.values())
    try:
        import onnxruntime

        known.update(onnxruntime.get_all_providers())
    except ImportError:
        pass
    out: list[str] = []
    for p in items:
        if not isinstance(p, str):
            raise TypeError(f"providers must be strings, got {type(p).__name__}")
        name = _PROVIDERS.get(p.lower(), p)
        if name not in known:
            raise ValueError(
                f"unknown execution provider {p!r}; use 'cpu', 'cuda' or a full ONNX Runtime "
                f"provider name such as 'CPUExecutionProvider'"
            )
        if name == _PROVIDERS["cuda"]:
            import onnxruntime

            if name not in onnxruntime.get_available_providers():
                raise ValueError(
                    "providers: CUDAExecutionProvider is not available in this onnxruntime "
                    "(install onnxruntime-gpu instead of onnxruntime)"
                )
        if name not in out:
            out.append(name)
    # CUDA sessions still place shape ops on the CPU, so keep the CPU provider as a fallback.
    if _PROVIDERS["cpu"] not in out:
        out.append(_PROVIDERS["cpu"])
    return out


def session(
    path: str | os.PathLike[str] | bytes,
    providers: str | Sequence[str] | None = None,
    **options: Any,
) -> onnxruntime.InferenceSession:
    """An ``InferenceSession`` for ``path`` (a file, or serialized model bytes) with the
    ``ai.lsoftmax`` library registered. ``options`` are set on ``SessionOptions``
    (e.g. ``intra_op_num_threads=1``)."""
    import onnxruntime

    so = onnxruntime.SessionOptions()
    for key, value in options.items():
        if not hasattr(so, key):
            raise ValueError(f"unknown SessionOptions attribute {key!r}")
        setattr(so, key, value)
    so.register_custom_ops_library(library_path())
    model: Any = path if isinstance(path, bytes) else os.fspath(path)
    if isinstance(model, str) and not Path(model).is_file():
        raise FileNotFoundError(f"model file {model!r} does not exist")
    return onnxruntime.InferenceSession(model, so, providers=resolve_providers(providers))


def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(library_path())
    lib.lsoftmax_ort_kernel_calls.restype = ctypes.c_int64
    lib.lsoftmax_ort_kernel_calls.argtypes = []
    lib.lsoftmax_ort_reset_kernel_calls.restype = None
    lib.lsoftmax_ort_reset_kernel_calls.argtypes = []
    return lib


def kernel_calls(reset: bool = False) -> int:
    """Debug counter: ``ai.lsoftmax`` kernel invocations in this process since load (or the
    last reset). ``reset=True`` returns the count and sets it to zero."""
    lib = _library()
    n = int(lib.lsoftmax_ort_kernel_calls())
    if reset:
        lib.lsoftmax_ort_reset_kernel_calls()
    return n

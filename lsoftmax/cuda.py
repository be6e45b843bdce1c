"""The core's kernels on GPU arrays of any framework (torch, CuPy, ...), with no copies.

Arrays are read through ``__cuda_array_interface__`` (pointer, shape, strides, typestr; bfloat16
is typestr ``<V2`` as torch and ml_dtypes write it) and, when an object has none, through DLPack
(``__dlpack__`` / ``__dlpack_device__``; the capsule is kept alive until the launch is queued).
The GEMMs are the caller's, as in :mod:`lsoftmax.core`:

>>> import torch, lsoftmax.cuda as lc                       # doctest: +SKIP
>>> logits = x @ w.T                                        # doctest: +SKIP
>>> lc.margin_forward_(logits, x, w, labels, margin=4, lam=0.0)  # doctest: +SKIP

Work runs on ``stream`` (an int handle, or an object with ``cuda_stream`` / ``ptr``); by
default on the stream the first array names in its interface, else the legacy default stream.
With ``error_flag=None`` labels are checked synchronously (a ValueError names the first bad
label, at the cost of a stream sync); pass a device int32 array as ``error_flag`` to have the
kernels set it to 1 instead, with no sync. Every check of types and shapes happens before
anything is launched.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from lsoftmax import _core
from lsoftmax._checks import check_features

__all__ = [
    "DeviceArray",
    "available",
    "backward_workspace_size",
    "device_count",
    "margin_backward_",
    "margin_forward_",
    "unavailable_reason",
]

# "V2" is bfloat16 by the convention torch and ml_dtypes follow (numpy has no bfloat16 type).
_TYPESTRS = {
    "f4": "float32",
    "f8": "float64",
    "f2": "float16",
    "V2": "bfloat16",
    "i4": "int32",
    "i8": "int64",
}
_FLOATS = ("float32", "float64", "float16", "bfloat16")
_INTS = ("int32", "int64")
_ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8}
_DL_CUDA, _DL_CUDA_MANAGED = 2, 13
_DL_DTYPES = {
    (0, 32): "int32",
    (0, 64): "int64",
    (2, 16): "float16",
    (2, 32): "float32",
    (2, 64): "float64",
    (4, 16): "bfloat16",
}


def available() -> bool:
    """True when lsoftmax was built with CUDA and a device is usable (never raises)."""
    return bool(_core.cuda_available())


def device_count() -> int:
    return int(_core.cuda_device_count())


def unavailable_reason() -> str:
    """Why the CUDA kernels cannot run here (``''`` when they can)."""
    return str(_core.cuda_unavailable_reason())


@dataclass(frozen=True)
class _Array:
    name: str
    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements
    dtype: str
    readonly: bool
    stream: int | None
    keepalive: Any = None  # a DLPack capsule must outlive the launch

    def matrix(self) -> tuple[int, int, int, int, int, str]:
        rows, cols = self.shape
        return (self.ptr, rows, cols, self.strides[0], self.strides[1], self.dtype)

    def vector(self) -> tuple[int, int, int, str]:
        return (self.ptr, self.shape[0], self.strides[0], self.dtype)


def _typestr_dtype(name: str, typestr: Any) -> str:
    if isinstance(typestr, str) and len(typestr) == 3 and typestr[0] in "<=|":
        dt = _TYPESTRS.get(typestr[1:])
        if dt is not None:
            return dt
    raise TypeError(
        f"{name} has typestr {typestr!r}; lsoftmax.cuda takes float32/float64/float16/bfloat16 "
        "('<f4', '<f8', '<f2', '<V2') arrays and int32/int64 ('<i4', '<i8') labels"
    )


def _element_strides(name: str, shape: tuple[int, ...], byte_strides: Any, item: int) -> tuple:
    if byte_strides is None:  # C-contiguous
        out, acc = [], 1
        for n in reversed(shape):
            out.append(acc)
            acc *= n
        return tuple(reversed(out))
    if len(byte_strides) != len(shape):
        raise ValueError(f"{name} has {len(shape)} dims but {len(byte_strides)} strides")
    for s in byte_strides:
        if s % item != 0:
            raise ValueError(f"{name} has a stride of {s} bytes, not a multiple of its item size")
        if s < 0:
            raise ValueError(f"{name} has a negative stride; pass a view with positive strides")
    return tuple(s // item for s in byte_strides)


def _from_cai(name: str, cai: dict[str, Any]) -> _Array:
    if not isinstance(cai, dict):
        raise TypeError(f"{name}.__cuda_array_interface__ must be a dict")
    try:
        shape = tuple(int(n) for n in cai["shape"])
        typestr = cai["typestr"]
        ptr, readonly = cai["data"]
    except (KeyError, TypeError, ValueError) as e:
        raise TypeError(f"{name} has a malformed __cuda_array_interface__ ({e})") from e
    if cai.get("mask") is not None:
        raise ValueError(f"{name} is a masked array; lsoftmax.cuda takes plain arrays")
    dtype = _typestr_dtype(name, typestr)
    strides = _element_strides(name, shape, cai.get("strides"), _ITEMSIZE[dtype])
    stream = cai.get("stream")
    return _Array(name, int(ptr or 0), shape, strides, dtype, bool(readonly), stream)


class _DLDevice(ctypes.Structure):
    _fields_ = (("device_type", ctypes.c_int), ("device_id", ctypes.c_int))


class _DLDataType(ctypes.Structure):
    _fields_ = (("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16))


class _DLTensor(ctypes.Structure):
    _fields_ = (
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    )


def _capsule_pointer(capsule: Any) -> int:
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = (ctypes.py_object, ctypes.c_char_p)
    return int(get(capsule, b"dltensor"))


def _from_dlpack(name: str, obj: Any, stream: int | None) -> _Array:
    dev_type, _dev_id = obj.__dlpack_device__()
    if int(dev_type) not in (_DL_CUDA, _DL_CUDA_MANAGED):
        raise TypeError(f"{name} is not on a CUDA device (DLPack device type {int(dev_type)})")
    # DLPack: 1 names the legacy default stream (0 is not allowed for CUDA).
    capsule = obj.__dlpack__(stream=stream if stream else 1)
    t = _DLTensor.from_address(_capsule_pointer(capsule))  # DLManagedTensor starts with it
    key = (int(t.dtype.code), int(t.dtype.bits))
    if key not in _DL_DTYPES or t.dtype.lanes != 1:
        raise TypeError(f"{name} has an unsupported DLPack dtype (code {key[0]}, bits {key[1]})")
    dtype = _DL_DTYPES[key]
    shape = tuple(int(t.shape[k]) for k in range(t.ndim))
    if t.strides:
        strides: tuple[int, ...] = tuple(int(t.strides[k]) for k in range(t.ndim))
        if any(s < 0 for s in strides):
            raise ValueError(f"{name} has a negative stride; pass a view with positive strides")
    else:
        strides = _element_strides(name, shape, None, 1)
    ptr = int(t.data or 0) + int(t.byte_offset)
    return _Array(name, ptr, shape, strides, dtype, False, None, keepalive=capsule)


def _array(name: str, obj: Any, stream: int | None = None) -> _Array:
    try:
        cai = obj.__cuda_array_interface__
    except (AttributeError, TypeError):  # torch: CPU tensors, bfloat16
        cai = None
    if cai is not None:
        return _from_cai(name, cai)
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        return _from_dlpack(name, obj, stream)
    raise TypeError(
        f"{name} must be a CUDA array (an object with __cuda_array_interface__ or __dlpack__), "
        f"got {type(obj).__name__}"
    )


def _require(a: _Array, ndim: int, dtypes: tuple[str, ...]) -> None:
    if a.dtype not in dtypes:
        raise TypeError(f"{a.name} must be {' or '.join(dtypes)}, got {a.dtype}")
    if len(a.shape) != ndim:
        raise ValueError(f"{a.name} must be {ndim}-D, got shape {a.shape}")


def _same_dtype(a: _Array, ref: _Array) -> None:
    if a.dtype != ref.dtype:
        raise TypeError(f"{a.name} is {a.dtype} but {ref.name} is {ref.dtype}; they must match")


def _shape(a: _Array, expected: tuple[int, ...]) -> None:
    if a.shape != expected:
        raise ValueError(f"{a.name} has shape {a.shape}, expected {expected}")


def _writable(a: _Array) -> None:
    if a.readonly:
        raise ValueError(f"{a.name} must be writeable (its interface marks it read-only)")


def _stream_handle(stream: Any, arrays: list[_Array]) -> int:
    if stream is None:
        for a in arrays:
            if a.stream is not None:
                return int(a.stream)
        return 0
    for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    if isinstance(stream, bool) or not isinstance(stream, int):
        raise TypeError(f"stream must be an int handle or a stream object, got {stream!r}")
    return stream


def _flag_ptr(error_flag: Any) -> int:
    if error_flag is None:
        return 0
    f = _array("error_flag", error_flag)
    if f.dtype != "int32" or f.shape not in ((), (1,)):
        raise TypeError(f"error_flag must be a device int32 array of one element, got {f.dtype}")
    _writable(f)
    return f.ptr


def _pair(x: _Array, w: _Array, labels: _Array) -> None:
    _require(x, 2, _FLOATS)
    _require(w, 2, _FLOATS)
    _same_dtype(w, x)
    _require(labels, 1, _INTS)
    check_features(x.shape[1], "weight", w.shape[1], "(num_classes, in_features)")
    _shape(labels, (x.shape[0],))


def margin_forward_(
    logits: Any,
    x: Any,
    weight: Any,
    labels: Any,
    margin: int,
    lam: float,
    *,
    stream: Any = None,
    error_flag: Any = None,
) -> None:
    """In place: ``logits`` holds ``x @ weight.T``; row i's target logit becomes the margin one."""
    _core.validate_margin_params(margin, lam)
    s0 = None if stream is None else _stream_handle(stream, [])
    a_l, a_x, a_w, a_y = (
        _array(n, o, s0)
        for n, o in (("logits", logits), ("x", x), ("weight", weight), ("labels", labels))
    )
    _pair(a_x, a_w, a_y)
    _require(a_l, 2, _FLOATS)
    _same_dtype(a_l, a_x)
    _shape(a_l, (a_x.shape[0], a_w.shape[0]))
    _writable(a_l)
    flag = _flag_ptr(error_flag)
    _core.cuda_margin_forward_(
        a_l.matrix(),
        a_x.matrix(),
        a_w.matrix(),
        a_y.vector(),
        margin,
        lam,
        error_flag=flag,
        stream=_stream_handle(stream, [a_l, a_x, a_w, a_y]),
    )


def margin_backward_(
    grad_logits: Any,
    x: Any,
    weight: Any,
    labels: Any,
    grad_x: Any,
    grad_weight: Any,
    margin: int,
    lam: float,
    *,
    deterministic: bool = False,
    workspace: Any = None,
    stream: Any = None,
    error_flag: Any = None,
) -> None:
    """In place: ``grad_x`` holds ``G @ weight`` and ``grad_weight`` holds ``G.T @ x``; adds the
    margin terms (only ``G[i, labels[i]]`` is read).

    ``deterministic`` sums shared ``grad_weight`` rows in a fixed order (float16/bfloat16 always
    do); it needs ``backward_workspace_size(...)`` bytes of ``workspace`` (a device uint8 array),
    borrowed from the stream-ordered allocator when none is given.
    """
    _core.validate_margin_params(margin, lam)
    s0 = None if stream is None else _stream_handle(stream, [])
    names = ("grad_logits", "x", "weight", "labels", "grad_x", "grad_weight")
    objs = (grad_logits, x, weight, labels, grad_x, grad_weight)
    a_g, a_x, a_w, a_y, a_gx, a_gw = (_array(n, o, s0) for n, o in zip(names, objs, strict=True))
    _pair(a_x, a_w, a_y)
    for a, shape in (
        (a_g, (a_x.shape[0], a_w.shape[0])),
        (a_gx, a_x.shape),
        (a_gw, a_w.shape),
    ):
        _require(a, 2, _FLOATS)
        _same_dtype(a, a_x)
        _shape(a, shape)
    _writable(a_gx)
    _writable(a_gw)
    ws_ptr, ws_bytes = _buffer("workspace", workspace) if workspace is not None else (0, 0)
    flag = _flag_ptr(error_flag)
    _core.cuda_margin_backward_(
        a_g.matrix(),
        a_x.matrix(),
        a_w.matrix(),
        a_y.vector(),
        a_gx.matrix(),
        a_gw.matrix(),
        margin,
        lam,
        deterministic=bool(deterministic),
        workspace=ws_ptr,
        workspace_bytes=ws_bytes,
        error_flag=flag,
        stream=_stream_handle(stream, [a_g, a_x, a_w, a_y, a_gx, a_gw]),
    )


def _buffer(name: str, obj: Any) -> tuple[int, int]:
    """(pointer, bytes) of a contiguous device array of any dtype (a workspace)."""
    cai = getattr(obj, "__cuda_array_interface__", None)
    if not isinstance(cai, dict):
        raise TypeError(f"{name} must be a device array with __cuda_array_interface__")
    typestr, shape = str(cai.get("typestr", "")), tuple(int(n) for n in cai.get("shape", ()))
    if len(typestr) < 3 or not typestr[2:].isdigit():
        raise TypeError(f"{name} has an unreadable typestr {typestr!r}")
    item = int(typestr[2:])
    if _element_strides(name, shape, cai.get("strides"), item) != _element_strides(
        name, shape, None, 1
    ):
        raise ValueError(f"{name} must be contiguous")
    n = 1
    for k in shape:
        n *= k
    return int(cai["data"][0] or 0), n * item


def backward_workspace_size(n: int, num_classes: int, dtype: str, deterministic: bool) -> int:
    """Bytes of device workspace :func:`margin_backward_` needs (0 for the atomic path)."""
    return int(_core.cuda_backward_workspace_size(n, num_classes, dtype, deterministic))


class DeviceArray:
    """A device copy of a numpy array that exposes ``__cuda_array_interface__``.

    For callers without a GPU array library (and for the tests, which then need no CUDA build
    of torch): allocation and copies are synchronous, on the legacy default stream.
    """

    def __init__(self, array: Any) -> None:
        a = np.ascontiguousarray(array)
        self.shape: tuple[int, ...] = tuple(a.shape)
        self.dtype = a.dtype
        self.nbytes = int(a.nbytes)
        self.ptr = 0
        self.ptr = int(_core.cuda_malloc(max(self.nbytes, 1)))
        if self.nbytes:
            _core.cuda_memcpy(self.ptr, a.ctypes.data, self.nbytes)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self.ptr, False),
            "strides": None,
            "version": 3,
        }

    def numpy(self) -> np.ndarray:
        """A host copy."""
        out = np.empty(self.shape, self.dtype)
        if self.nbytes:
            _core.cuda_memcpy(out.ctypes.data, self.ptr, self.nbytes)
        return out

    def __del__(self) -> None:
        if self.ptr:
            try:
                _core.cuda_free(self.ptr)
            except Exception:  # interpreter shutdown or a dead context: nothing left to do
                pass
            self.ptr = 0

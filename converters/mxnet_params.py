"""Read MXNet's binary NDArray list files (``.params``) in pure Python (no ``mxnet`` import).

Layout (little-endian): uint64 0x112, uint64 0, uint64 N; N arrays; uint64 M; M names
(uint64 length + UTF-8), M = N or 0. An array is one of:

- uint32 0xF993FAC9 (V2) or 0xF993FACA (V3, numpy-shape mode): int32 storage type (0 = dense),
  int32 ndim, int64 dims[ndim], then the payload;
- uint32 0xF993FAC8 (V1, before MXNet 1.0): int32 ndim, int64 dims[ndim], then the payload;
- no magic (older): the uint32 read is ndim, then uint32 dims[ndim], then the payload.

The payload (absent when ndim is 0, or -1 in V3: an empty array) is int32 device type, int32
device id, int32 dtype, raw data. Every malformed input is a ``ValueError`` naming the file:
sizes are checked against the bytes left before anything is allocated.
"""

from __future__ import annotations

import os
import struct

import numpy as np

__all__ = ["LIST_MAGIC", "NDARRAY_MAGICS", "parse_params", "read_params"]

LIST_MAGIC = 0x112
V1_MAGIC, V2_MAGIC, V3_MAGIC = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
NDARRAY_MAGICS = (V1_MAGIC, V2_MAGIC, V3_MAGIC)
DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("<f8"),
    2: np.dtype("<f2"),
    3: np.dtype("u1"),
    4: np.dtype("<i4"),
    5: np.dtype("i1"),
    6: np.dtype("<i8"),
    7: np.dtype("?"),
}
MAX_NDIM = 32


class _Reader:
    def __init__(self, data: bytes, path: str) -> None:
        self.data = data
        self.pos = 0
        self.path = path

    def fail(self, msg: str) -> ValueError:
        return ValueError(f"{self.path}: {msg} (at byte {self.pos})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"truncated: {what} needs {n} bytes, {len(self.data) - self.pos} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple[int, ...]:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def left(self) -> int:
        return len(self.data) - self.pos


def _read_array(r: _Reader, index: int) -> np.ndarray:
    what = f"array {index}"
    (magic,) = r.unpack("I", f"{what} header")
    if magic in (V2_MAGIC, V3_MAGIC):
        (stype,) = r.unpack("i", f"{what} storage type")
        if stype != 0:
            raise r.fail(f"{what} has sparse storage type {stype}; only dense arrays are read")
    if magic in NDARRAY_MAGICS:
        (ndim,) = r.unpack("i", f"{what} ndim")
        if magic == V3_MAGIC and ndim == -1:
            return np.zeros((0,), np.float32)  # unknown shape: an empty array
        if not 0 <= ndim <= MAX_NDIM:
            raise r.fail(f"{what} has ndim {ndim}")
        dims = r.unpack(f"{ndim}q", f"{what} shape") if ndim else ()
    else:
        ndim = magic  # legacy files start with the ndim itself
        if ndim > MAX_NDIM:
            raise r.fail(f"{what}: bad magic or ndim 0x{magic:08X}")
        dims = r.unpack(f"{ndim}I", f"{what} shape") if ndim else ()
    if ndim == 0:
        return np.zeros((0,), np.float32)  # MXNet writes nothing more for an empty array
    if any(d < 0 for d in dims):
        raise r.fail(f"{what} has negative dimension in {list(dims)}")
    _dev_type, _dev_id, dtype_flag = r.unpack("iii", f"{what} context and dtype")
    if dtype_flag not in DTYPES:
        raise r.fail(f"{what} has unknown dtype flag {dtype_flag}")
    dtype = DTYPES[dtype_flag]
    count = 1
    for d in dims:
        count *= d
        if count * dtype.itemsize > r.left():
            raise r.fail(f"truncated: {what} of shape {list(dims)} needs more bytes than left")
    raw = r.take(count * dtype.itemsize, f"{what} data")
    return np.frombuffer(raw, dtype=dtype).reshape(dims).copy()


def read_params(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """All arrays of a ``.params`` file by name (``arg:x``/``aux:x`` or Gluon names).

    A file with no names (M = 0) gives keys ``"0"``, ``"1"``, ... in file order.
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise ValueError(f"cannot read {p!r}: {e.strerror or e}") from e
    return parse_params(data, p)


def parse_params(data: bytes, p: str) -> dict[str, np.ndarray]:
    """``read_params`` on bytes already read (``p`` names them in errors)."""
    r = _Reader(data, p)
    if len(data) < 24:
        raise ValueError(f"{p}: {len(data)} bytes, too short for an MXNet .params file")
    magic, _reserved = r.unpack("QQ", "header")
    if magic != LIST_MAGIC:
        raise ValueError(f"{p}: not an MXNet .params file (magic 0x{magic:X}, expected 0x112)")
    (n,) = r.unpack("Q", "array count")
    if n > r.left() // 4:
        raise r.fail(f"array count {n} exceeds what the file can hold")
    arrays = [_read_array(r, i) for i in range(n)]
    (m,) = r.unpack("Q", "name count")
    if m not in (0, n):
        raise r.fail(f"{m} names for {n} arrays")
    names: list[str] = []
    for i in range(m):
        (length,) = r.unpack("Q", f"name {i} length")
        raw = r.take(length, f"name {i}")
        try:
            names.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise r.fail(f"name {i} is not UTF-8") from None
    if r.left():
        raise r.fail(f"{r.left()} unexpected trailing bytes")
    if not names:
        names = [str(i) for i in range(n)]
    if len(set(names)) != len(names):
        raise ValueError(f"{p}: duplicate array names")
    return dict(zip(names, arrays, strict=True))

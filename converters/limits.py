"""The converters' resource policy: the largest model they accept, checked before allocating.

A model file is untrusted input: a 200-byte prototxt can declare an 80 TB layer. Every size a
file declares (parameter shapes, input shapes, attribute strings) is checked against these
bounds with exact integer arithmetic *before* anything of that size is allocated, and a
violation is a ``ValueError`` naming the file and the layer (docs/reliability.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "MAX_ACTIVATION_ELEMENTS",
    "MAX_ATTRIBUTE_CHARS",
    "MAX_MODEL_ELEMENTS",
    "MAX_TENSOR_ELEMENTS",
    "check_elements",
    "elements",
]

# One parameter tensor (a blob, a layer's weight): 2^27 values, 512 MiB in float32. VGG-16's
# largest layer, fc6 (4096 x 25088 = 103M), fits.
MAX_TENSOR_ELEMENTS = 2**27
# All parameters of one model together: 2^28 values, 1 GiB in float32 (VGG-16: 138M).
MAX_MODEL_ELEMENTS = 2**28
# One sample's activation at any layer, which shape inference materializes: 2^26 values.
MAX_ACTIVATION_ELEMENTS = 2**26
# One MXNet attribute string (a kernel, a shape): real ones are a few characters.
MAX_ATTRIBUTE_CHARS = 1024


def elements(shape: Sequence[int]) -> int:
    """The element count of ``shape`` in Python ints (no int64 overflow)."""
    return math.prod(int(d) for d in shape)


def check_elements(where: str, what: str, shape: Sequence[int], limit: int) -> int:
    """``elements(shape)``; ValueError naming ``where`` and ``what`` above ``limit``."""
    if any(int(d) < 0 for d in shape):
        raise ValueError(f"{where}: {what} has a negative dimension in {list(shape)}")
    n = elements(shape)
    if n > limit:
        raise ValueError(
            f"{where}: {what} of shape {list(shape)} has {n} elements, more than the "
            f"{limit} the converters accept (docs/reliability.md, resource policy)"
        )
    return n

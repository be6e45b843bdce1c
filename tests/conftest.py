"""One home for what many test modules share: parity tolerances, markers, paths.

Test modules import these names (``from conftest import TOL``): pytest puts this directory on
``sys.path`` (rootdir-relative "prepend" imports, as for ``helpers`` and ``reference``).
``tests/ort_compat.py generate`` imports ``TOL`` too (in the main venv only: ``check`` runs where
only numpy and onnxruntime are installed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch

import lsoftmax.cuda as lc

#: The repository root.
ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Tolerances: the largest relative error (reference.max_rel_err) allowed against an independent
# float64 reference, by dtype. float32 and float64 are the project's parity bars (README); the
# 16-bit ones bound CUDA kernels whose per-row math runs in float32 but whose inputs and outputs
# are rounded to 16 bits.
_TOL_BY_NAME = {"float64": 1e-10, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
# ONNX TensorProto element types (onnx.TensorProto.FLOAT, ...), without importing onnx.
_ONNX_TYPES = {1: "float32", 11: "float64", 10: "float16", 16: "bfloat16"}


def dtype_name(dtype: Any) -> str:
    """``"float32"`` and so on for a torch dtype, a numpy dtype or scalar type, an ONNX
    TensorProto element type or a name."""
    if isinstance(dtype, str):
        return dtype
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        return _ONNX_TYPES[int(dtype)]
    if type(dtype).__module__ == "torch":  # torch.float32 -> "torch.float32"
        return str(dtype).removeprefix("torch.")
    return np.dtype(dtype).name


class _Tolerances(Mapping[Any, float]):
    """``TOL[dtype]`` for any spelling of the dtype (see ``dtype_name``)."""

    def __getitem__(self, dtype: Any) -> float:
        return _TOL_BY_NAME[dtype_name(dtype)]

    def __iter__(self) -> Iterator[str]:
        return iter(_TOL_BY_NAME)

    def __len__(self) -> int:
        return len(_TOL_BY_NAME)


TOL = _Tolerances()
#: Converted models against the framework's own outputs, always compared in float32.
CONVERTER_TOL = TOL["float32"]

# ---------------------------------------------------------------------------------------------
# Converter fixtures: real-format Caffe and MXNet model files kept outside the repository.
FIXTURES = Path(os.environ.get("LSOFTMAX_FIXTURES", "/work/shared/fixtures"))
CAFFE_MODELS = FIXTURES / "caffe" / "models"
MXNET_FIXTURES = FIXTURES / "mxnet"


_FIXTURES_REASON = f"converter fixtures not found at {FIXTURES} (set LSOFTMAX_FIXTURES)"
needs_caffe_fixtures = pytest.mark.skipif(not CAFFE_MODELS.is_dir(), reason=_FIXTURES_REASON)
needs_mxnet_fixtures = pytest.mark.skipif(not MXNET_FIXTURES.is_dir(), reason=_FIXTURES_REASON)


# ---------------------------------------------------------------------------------------------
# GPU tests: marked ``gpu`` and skipped, with a reason that says what they need, without one.
GPU_REASON = "needs an NVIDIA GPU with a CUDA driver; run benchmarks/gpu_check.sh on a GPU machine"
#: The core's CUDA kernels can run (a CUDA build, a driver and a device).
CUDA_READY = lc.available()
#: ... and torch is a CUDA build that sees the device.
TORCH_CUDA = CUDA_READY and torch.cuda.is_available()
#: ... and onnxruntime has the CUDAExecutionProvider (onnxruntime-gpu).
ORT_CUDA = CUDA_READY and "CUDAExecutionProvider" in onnxruntime.get_available_providers()

needs_gpu = pytest.mark.skipif(not CUDA_READY, reason=GPU_REASON)
needs_torch_cuda = pytest.mark.skipif(
    not TORCH_CUDA, reason=GPU_REASON + " (and a CUDA build of torch)"
)
needs_ort_cuda = pytest.mark.skipif(
    not ORT_CUDA, reason=GPU_REASON + " (and onnxruntime-gpu with the CUDAExecutionProvider)"
)


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU with a CUDA driver")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")

"""Helpers shared by several test modules."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

#: The ``cuda_stream`` handle of the stand-in stream that ``fake_cuda_runtime`` installs.
FAKE_STREAM = 77


def fake_cuda_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-ins for torch.cuda's stream, device and capture calls, so the torch CUDA glue runs on
    CPU tensors (with the ``_core`` launchers replaced by the caller)."""

    class Stream:
        cuda_stream = FAKE_STREAM

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)


def ep_session(model: bytes, provider: str, profile_dir: Path | None = None) -> Any:
    """An ONNX Runtime session with lsoftmax's op library on the CUDA EP (``provider="cuda"``,
    CPU EP as fallback) or the CPU EP alone; profiled into ``profile_dir`` when given."""
    import onnxruntime

    from lsoftmax import ort as lort

    so = onnxruntime.SessionOptions()
    so.register_custom_ops_library(lort.library_path())
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_dir / "ort_profile")
    if provider == "cuda":
        # TF32 off: parity with the CPU EP is measured at float32 precision.
        providers: list[Any] = [
            ("CUDAExecutionProvider", {"use_tf32": "0"}),
            "CPUExecutionProvider",
        ]
    else:
        providers = ["CPUExecutionProvider"]
    return onnxruntime.InferenceSession(model, so, providers=providers)


def kernel_placements(sess: Any, op_name: str) -> list[str]:
    """The execution provider of every ``op_name`` node run in a profiled session's profile."""
    events = json.loads(Path(sess.end_profiling()).read_text())
    return [
        e["args"]["provider"]
        for e in events
        if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == op_name
    ]

"""Helpers shared by several test modules."""

from __future__ import annotations

import contextlib

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

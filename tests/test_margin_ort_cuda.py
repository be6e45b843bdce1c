"""ONNX Runtime CUDA EP: the ``ai.lsoftmax::MarginLinear`` CUDA kernel for every kind against the
float64 reference and the CPU EP, with the node placed on the CUDA EP (checked in the session
profile, so a silent CPU fallback fails the test).

Needs an NVIDIA GPU and onnxruntime-gpu; ``benchmarks/gpu_check.sh`` runs it on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TOL, needs_ort_cuda
from helpers import ep_session, kernel_placements
from reference import family_reference, max_rel_err
from test_margin_onnx import LAM, SPECS, _data, _ref_params, node_model

pytestmark = [pytest.mark.gpu, needs_ort_cuda]


@pytest.mark.parametrize("with_labels", [False, True], ids=["plain", "labels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(SPECS))
def test_cuda_ep_matches_reference_and_cpu_ep(
    name: str, dtype: torch.dtype, with_labels: bool, tmp_path: Path
) -> None:
    spec = SPECS[name]
    lam = LAM if spec.uses_lambda else 0.0
    x, w, t = _data(dtype)
    proto = node_model(dtype, spec, with_labels, lam).SerializeToString()
    feeds = {"X": x.numpy(), "W": w.numpy()}
    if with_labels:
        feeds["labels"] = t.numpy()
    cuda = ep_session(proto, "cuda", tmp_path)
    got = cuda.run(None, feeds)[0]
    want = ep_session(proto, "cpu").run(None, feeds)[0]
    ref = family_reference(x, w, t if with_labels else None, spec.kind, _ref_params(spec), lam)
    assert max_rel_err(got, ref) <= TOL[dtype]
    assert max_rel_err(got, want) <= TOL[dtype]
    assert kernel_placements(cuda, "MarginLinear") == ["CUDAExecutionProvider"]

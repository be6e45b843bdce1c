"""benchmarks/bench_layer.py runs end to end at toy sizes (its numbers are measurements, not
asserted; this checks that every table and the --split breakdown are printed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from lsoftmax.torch import ops

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> object:
    spec = importlib.util.spec_from_file_location("bench_layer", ROOT / "benchmarks/bench_layer.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_layer"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(
    ops.SCHEDULED_MARGIN_LINEAR is None,
    reason="--split needs the libtorch extension (lsoftmax/_torch_ops.so)",
)
def test_split_prints_each_peeled_layer(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()
    args = ["--sizes", "7", "--batch", "16", "--features", "8", "--repeats", "2",
            "--warmup", "1", "--threads", "1", "--mnist-repeats", "0", "--split"]
    assert bench.main(args) == 0  # type: ignore[attr-defined]
    out = capsys.readouterr().out
    assert "| 7 |" in out  # the side-by-side table's row
    assert "where (b)'s time goes, C=7, threads 1" in out
    rows = [line for line in out.splitlines() if line.startswith("| (") or line.startswith("| ...")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == [
        "(a) nn.Linear + CE",
        "(b) LSoftmaxLinear + CE",
        "(b)'s C++ op, called directly",
        "... without schedule and counter",
        "... at margin 1 (no margin terms)",
    ]
    for r in rows:
        us = float(r.split("|")[2])
        assert us > 0

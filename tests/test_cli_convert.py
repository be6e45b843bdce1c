"""``lsoftmax convert ... --onnx``: the input shape a prototxt declares, and docs/converters.md's
example run on the fixture it names."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import CAFFE_MODELS as CAFFE
from conftest import ROOT, needs_caffe_fixtures
from lsoftmax.converters import load_converted

from lsoftmax.cli import main

DECLARED = """
name: "declared"
input: "data"
input_shape { dim: 2 dim: 6 }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 3 } }
"""


def test_onnx_uses_the_declared_input_shape(tmp_path: Path) -> None:
    proto = tmp_path / "deploy.prototxt"
    proto.write_text(DECLARED)
    out, onnx_path = tmp_path / "m.pt", tmp_path / "m.onnx"
    args = ["convert", "caffe", str(proto), "--out", str(out), "--onnx", str(onnx_path)]
    assert main(args) == 0  # no --input-shape needed
    model = onnx.load(onnx_path)
    dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [6]
    import onnxruntime

    net = load_converted(out)
    x = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
    sess = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x})
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_onnx_without_a_declared_shape_names_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proto = tmp_path / "train.prototxt"
    proto.write_text(
        DECLARED.replace('input: "data"\ninput_shape { dim: 2 dim: 6 }\n', "").replace(
            'layer { name: "ip1"',
            'layer { name: "d" type: "Data" top: "data" top: "label" }\nlayer { name: "ip1"',
        )
    )
    args = ["convert", "caffe", str(proto), "--out", str(tmp_path / "m.pt")]
    assert main([*args, "--onnx", str(tmp_path / "m.onnx"), "--input-shape", "2,6"]) == 0
    capsys.readouterr()
    assert main([*args, "--onnx", str(tmp_path / "n.onnx")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"input[-_]shape", err) and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "n.onnx").exists()


def _docs_example() -> tuple[list[str], list[str]]:
    """The command and the output lines of docs/converters.md's CLI example."""
    text = (ROOT / "docs" / "converters.md").read_text()
    block = re.search(r"```text\n(\$ lsoftmax convert caffe .*?)```", text, re.S)
    assert block, "docs/converters.md lost its convert example"
    lines = block.group(1).splitlines()
    command: list[str] = []
    more = True
    while more:
        line = lines.pop(0)
        more = line.rstrip().endswith("\\")
        command += line.removeprefix("$ ").rstrip(" \\").split()
    return command, lines


@needs_caffe_fixtures
def test_docs_convert_example_prints_what_the_docs_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    command, expected = _docs_example()
    assert command[:3] == ["lsoftmax", "convert", "caffe"]
    argv = [str(CAFFE / a) if a.startswith("lsoftmax_mnist_tiny.") else a for a in command[1:]]
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    got = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    want = [" ".join(line.split()) for line in expected if line.strip() != "..."]
    # The rule under the header is as wide as the widest cell of the whole table, which the
    # sample ("...") leaves out: compare its shape (one run of dashes per column), not widths.
    rule = [w for w in want if set(w) <= {"-", " "}]
    assert [len(r.split()) for r in rule] == [
        len(g.split()) for g in got if g and set(g) <= {"-", " "}
    ], "the table rule has another number of columns"
    missing = [line for line in want if line not in got and line not in rule]
    assert not missing, f"docs/converters.md shows lines the command does not print: {missing}"
    assert (tmp_path / "mnist.onnx").stat().st_size > 0

"""The README's Python examples run as written (in a scratch directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT

README = ROOT / "README.md"


def test_readme_python_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 4, "README lost its usage examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile("import numpy as np\n" + "\n".join(blocks), str(README), "exec"), namespace)
    assert (tmp_path / "model.onnx").stat().st_size > 0
    assert namespace["logits"].shape == (3, 10)  # type: ignore[attr-defined]

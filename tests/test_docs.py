"""The docs cannot drift: every fenced ``python`` and ``sh`` block in README.md and docs/*.md runs.

Convention (README.md, "Documentation"):
- ```` ```python ```` and ```` ```sh ```` (or ```` ```bash ````) blocks run standalone, each in a
  fresh scratch directory that mirrors the repository root (so ``scripts/...``, ``benchmarks/...``
  resolve, and what a block writes stays out of the checkout), with the interpreter's ``bin`` on
  PATH; sh blocks run under ``bash -e -o pipefail``.
- ``<!-- doc-test: skip: REASON -->`` on the line right before a fence skips it; the REASON is
  the pytest skip reason (e.g. "needs a GPU", "long run, ~40 min").
- ```` ```text ```` blocks are output samples and diagrams, not run. A text block preceded by
  ``<!-- doc-test: output -->`` is what the previous runnable block prints: its lines must appear,
  in order, in that block's stdout (spaces collapsed; a line ``...`` stands for any lines).
- Every fence names its language, so a command cannot hide in an untagged block.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = {"python": "python", "sh": "sh", "bash": "sh"}
SKIP = re.compile(r"^<!--\s*doc-test:\s*skip:\s*(.*?)\s*-->$")
OUTPUT = re.compile(r"^<!--\s*doc-test:\s*output\s*-->$")
MARKER = re.compile(r"^<!--\s*doc-test\b")
FENCE = re.compile(r"^(\s*)```(.*)$")
TIMEOUT_S = 1200  # generous: a shared 2-core machine can be 30x slower than an idle one


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str  # the line right before the fence
    outputs: list[Block] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        m = SKIP.match(self.marker.strip())
        return m.group(1) if m else None


def parse(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2).strip()
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{start + 1}: unclosed ``` fence")
        marker = lines[start - 1] if start > 0 else ""
        blocks.append(Block(path, start + 1, lang, "\n".join(body) + "\n", marker))
        i += 1
    return blocks


def all_blocks() -> list[Block]:
    blocks = [b for path in DOC_FILES for b in parse(path)]
    last_runnable: Block | None = None
    for b in blocks:
        if OUTPUT.match(b.marker.strip()) and last_runnable is not None:
            if last_runnable.path == b.path:
                last_runnable.outputs.append(b)
        if b.lang in RUNNABLE:
            last_runnable = b
    return blocks


BLOCKS = all_blocks()


def test_every_fence_follows_the_convention() -> None:
    problems = []
    for b in BLOCKS:
        marker = b.marker.strip()
        if not b.lang:
            problems.append(
                f"{b.where}: untagged fence: ```text for output, ```sh or ```python to run"
            )
        if MARKER.match(marker) and not (SKIP.match(marker) or OUTPUT.match(marker)):
            problems.append(f"{b.where}: unknown doc-test marker {marker!r}")
        if SKIP.match(marker):
            if b.lang not in RUNNABLE:
                problems.append(f"{b.where}: skip marker on a ```{b.lang} block (never run)")
            elif not b.skip_reason:
                problems.append(f"{b.where}: skip marker without a reason")
        if OUTPUT.match(marker):
            if b.lang != "text":
                problems.append(f"{b.where}: output marker on a ```{b.lang} block, not ```text")
            owners = [r for r in BLOCKS if b in r.outputs]
            if not owners:
                problems.append(f"{b.where}: output block with no runnable block before it")
            elif owners[0].skip_reason:
                problems.append(f"{b.where}: output of a skipped block ({owners[0].where})")
    assert not problems, "\n".join(problems)


def _params() -> list[object]:
    params = []
    for b in BLOCKS:
        if b.lang not in RUNNABLE:
            continue
        reason = b.skip_reason
        marks = [pytest.mark.skip(reason=f"{b.where}: {reason}")] if reason else []
        params.append(pytest.param(b, id=b.where, marks=marks))
    return params


def _scratch_root(tmp_path: Path) -> Path:
    """A directory that looks like the repository root: every top-level entry, symlinked."""
    work = tmp_path / "root"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {".git", "runs"}:
            (work / entry.name).symlink_to(entry)
    return work


def _normalize(line: str) -> str:
    return " ".join(line.split())


def assert_output_matches(expected: Block, stdout: str) -> None:
    """The text block's lines appear in stdout in order and contiguously, except where a ``...``
    line stands for any lines; the sample may start and end anywhere in the output."""
    got = [_normalize(line) for line in stdout.splitlines() if line.strip()]
    want = [_normalize(line) for line in expected.code.splitlines() if line.strip()]
    pos = 0
    gap_allowed = True
    for line in want:
        if line == "...":
            gap_allowed = True
            continue
        if gap_allowed:
            while pos < len(got) and got[pos] != line:
                pos += 1
        if pos >= len(got) or got[pos] != line:
            near = "\n".join(got[max(0, pos - 2) : pos + 3])
            raise AssertionError(
                f"{expected.where}: the docs say\n  {line}\nbut the command printed (near)\n"
                f"{near}\nfull output:\n{stdout}"
            )
        pos += 1
        gap_allowed = False


# A block that appears verbatim in several files (``lsoftmax demo``) runs once per session.
_RESULTS: dict[tuple[str, str], subprocess.CompletedProcess[str]] = {}


@pytest.mark.slow  # the blocks train and export for real: ~3 min of CPU in all
@pytest.mark.parametrize("block", _params())
def test_doc_block_runs(block: Block, tmp_path: Path) -> None:
    key = (block.lang, block.code)
    if key not in _RESULTS:
        _RESULTS[key] = _run(block, tmp_path)
    proc = _RESULTS[key]
    assert proc.returncode == 0, (
        f"{block.where} ({block.lang}) exited {proc.returncode}\n--- code\n{block.code}"
        f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    for expected in block.outputs:
        assert_output_matches(expected, proc.stdout)


def _run(block: Block, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    work = _scratch_root(tmp_path)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MPLBACKEND"] = "Agg"
    if block.lang == "python":
        # The script lives outside the scratch root so that the checkout's source tree does not
        # shadow the installed package on sys.path.
        script = tmp_path / "block.py"
        script.write_text(block.code)
        cmd = [sys.executable, str(script)]
    else:
        script = tmp_path / "block.sh"
        script.write_text(block.code)
        cmd = ["bash", "-e", "-o", "pipefail", str(script)]
    try:
        return subprocess.run(
            cmd, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{block.where}: still running after {TIMEOUT_S} s") from e


def test_output_matching_catches_a_changed_number() -> None:
    sample = Block(ROOT / "README.md", 1, "text", "accuracy 0.9711\n...\nmax 1.3e-05\n", "")
    assert_output_matches(sample, "accuracy   0.9711\nnoise\nmax 1.3e-05\n")
    with pytest.raises(AssertionError, match=re.escape("0.9711")):
        assert_output_matches(sample, "accuracy 0.9311\nmax 1.3e-05\n")
    with pytest.raises(AssertionError, match=re.escape("1.3e-05")):
        assert_output_matches(sample, "accuracy 0.9711\nmax 1.4e-05\n")
    strict = Block(ROOT / "README.md", 1, "text", "a 1\nb 2\n", "")
    with pytest.raises(AssertionError, match="b 2"):
        assert_output_matches(strict, "a 1\nextra\nb 2\n")  # no "..." between: contiguous


def _commands(block: Block) -> list[str]:
    """The ``lsoftmax ...`` command lines of a block (continuations joined, comments dropped)."""
    text = block.code.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.strip().removeprefix("$ ")
        line = line.split(" #")[0].split(" | ")[0].strip()
        for prefix in (".venv/bin/lsoftmax ", "lsoftmax "):
            if line.startswith(prefix):
                commands.append(line[len(prefix) :])
    return commands


def test_every_documented_command_parses() -> None:
    """Skipped blocks too: a renamed or removed option in a documented command fails here."""
    import shlex

    from lsoftmax.cli import build_parser

    parser = build_parser()
    problems = []
    seen = 0
    for b in BLOCKS:
        if b.lang not in RUNNABLE and not b.code.startswith("$ "):
            continue
        for command in _commands(b):
            argv = shlex.split(command.replace("$m", "1").replace("$PWD", "/tmp"))
            seen += 1
            try:
                parser.parse_args(argv)
            except SystemExit:
                problems.append(f"{b.where}: lsoftmax {command}")
    assert seen >= 20, f"only {seen} documented lsoftmax commands found"
    assert not problems, "documented commands the CLI rejects:\n" + "\n".join(problems)

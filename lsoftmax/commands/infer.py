"""``lsoftmax infer MODEL.onnx INPUT.npy``: run an ONNX model in ONNX Runtime, summarize."""

from __future__ import annotations

import argparse
import os
from typing import Any

# Rows up to this many get their top-1 class printed; larger batches get class counts.
_LIST_ROWS = 16


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "infer",
        help="run an ONNX model on a .npy batch with ONNX Runtime",
        description="Run MODEL.onnx in ONNX Runtime (with the lsoftmax custom-op library "
        "registered when it is built) on INPUT.npy and print the output shape and the predicted "
        "classes.",
    )
    p.add_argument("model", help="ONNX model file")
    p.add_argument("input", help=".npy file with a batch of inputs (or one sample)")
    p.add_argument("--labels", default=None, help=".npy file of int labels (margin logits)")
    p.add_argument("--provider", default="cpu", help="execution provider: cpu (default) or cuda")
    p.add_argument("--out", default=None, help="save the first output to this .npy file")
    p.set_defaults(func=run)


def _load_npy(path: str, what: str) -> Any:
    import numpy as np

    from lsoftmax.cli import CLIError

    if not os.path.isfile(path):
        raise CLIError(f"{what} file {path!r} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CLIError(f"{what} file {path!r} is not a readable .npy array ({e})") from None


def _session(path: str, provider: str) -> Any:
    import onnxruntime

    from lsoftmax import ort
    from lsoftmax.cli import CLIError

    if not os.path.isfile(path):
        raise CLIError(f"model file {path!r} does not exist")
    providers = ort.resolve_providers(provider)
    try:
        try:
            ort.library_path()
        except FileNotFoundError:
            # Portable and function-mode models run without the library.
            return onnxruntime.InferenceSession(path, providers=providers)
        return ort.session(path, providers=providers)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"cannot load ONNX model {path!r}: {first}") from None


_NP_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
}


def _fit(array: Any, spec: Any, what: str) -> Any:
    """Cast to the input's dtype within the same kind; add a batch axis to a single sample."""
    import numpy as np

    from lsoftmax.cli import CLIError

    want = _NP_TYPES.get(spec.type)
    if want is None:
        raise CLIError(f"model input {spec.name!r} has unsupported type {spec.type}")
    want_dt = np.dtype(want)
    if array.dtype.kind != want_dt.kind and not (array.dtype.kind in "iu" and want_dt.kind in "iu"):
        raise CLIError(f"{what} has dtype {array.dtype} but model input {spec.name!r} is {want_dt}")
    array = array.astype(want_dt, copy=False)
    rank = len(spec.shape)
    if array.ndim == rank - 1:
        array = array[None]
    fixed = [d if isinstance(d, int) else None for d in spec.shape]
    if array.ndim != rank or any(
        f is not None and f != n for f, n in zip(fixed, array.shape, strict=False)
    ):
        raise CLIError(
            f"{what} has shape {array.shape} but model input {spec.name!r} has shape "
            f"{list(spec.shape)}"
        )
    return array


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from lsoftmax.cli import CLIError

    sess = _session(args.model, args.provider)
    x = _load_npy(args.input, "input")
    inputs = sess.get_inputs()
    feeds = {inputs[0].name: _fit(x, inputs[0], "input")}
    if args.labels is not None:
        if len(inputs) < 2:
            raise CLIError(f"model {args.model!r} has no labels input (it takes one input)")
        labels = _load_npy(args.labels, "labels")
        feeds[inputs[1].name] = _fit(labels, inputs[1], "labels")
    elif len(inputs) > 1:
        raise CLIError(f"model {args.model!r} needs --labels (input {inputs[1].name!r})")
    try:
        out = sess.run(None, feeds)[0]
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"inference failed: {first}") from None
    print(f"output {sess.get_outputs()[0].name}: shape {tuple(out.shape)}, dtype {out.dtype}")
    if out.ndim == 2 and out.shape[0] > 0:
        top1 = np.argmax(out, axis=1)
        if out.shape[0] <= _LIST_ROWS:
            print("top-1 per row: " + " ".join(str(int(c)) for c in top1))
        else:
            classes, counts = np.unique(top1, return_counts=True)
            pairs = ", ".join(f"{int(c)}: {int(n)}" for c, n in zip(classes, counts, strict=True))
            print(f"argmax counts (class: rows): {pairs}")
    if args.out:
        np.save(args.out, out)
        print(f"saved {args.out}")
    return 0

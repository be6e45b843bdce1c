"""``lsoftmax infer MODEL.onnx INPUT.npy``: run an ONNX model in ONNX Runtime, summarize.

``--labels`` are ground truth (accuracy is printed); a model with a labels input (margin logits)
gets them through ``--margin-labels``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from lsoftmax.commands._device import add_device_argument

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
    p.add_argument(
        "--labels", default=None, help=".npy file of true int labels: print the top-1 accuracy"
    )
    p.add_argument(
        "--margin-labels",
        default=None,
        help=".npy file of int labels fed to the model's labels input (margin-logit graphs)",
    )
    add_device_argument(p, "the model (ONNX Runtime's CPU or CUDA provider)", "--provider")
    p.add_argument(
        "--out", default=None, help="save the first output to this .npy file (.npy is added)"
    )
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
    try:
        providers = ort.resolve_providers(provider)
    except ValueError as e:
        raise CLIError(f"--device {provider}: {e}") from None
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
    if want_dt.kind == "i":
        _check_int_range(array, want_dt, what)
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


def _check_int_range(array: Any, want: Any, what: str) -> None:
    """Integers must fit the model's integer type: a cast would wrap 2**32 + 3 to 3."""
    import numpy as np

    from lsoftmax.cli import CLIError

    if array.size == 0:
        return
    info = np.iinfo(want)
    lo, hi = int(array.min()), int(array.max())
    if lo < info.min or hi > info.max:
        bad = lo if lo < info.min else hi
        raise CLIError(
            f"{what} holds {bad}, which does not fit the model's {want} labels input "
            f"[{info.min}, {info.max}]"
        )


def _true_labels(path: str, rows: int) -> Any:
    from lsoftmax.cli import CLIError

    labels = _load_npy(path, "--labels")
    if labels.ndim == 0:
        labels = labels[None]
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise CLIError(
            f"--labels must be a 1-D integer array, got dtype {labels.dtype}, shape "
            f"{labels.shape}"
        )
    if len(labels) != rows:
        raise CLIError(f"--labels has {len(labels)} labels for {rows} input rows")
    return labels


def _out_path(out: str) -> str:
    # np.save appends .npy to a name without it; report the file actually written.
    return out if out.endswith(".npy") else out + ".npy"


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from lsoftmax.cli import CLIError

    if args.out is not None and os.path.isdir(args.out):
        raise CLIError(f"--out {args.out!r} is a directory; give a file name such as logits.npy")
    sess = _session(args.model, args.device)
    x = _load_npy(args.input, "input")
    inputs = sess.get_inputs()
    feeds = {inputs[0].name: _fit(x, inputs[0], "input")}
    rows = feeds[inputs[0].name].shape[0]
    truth = _true_labels(args.labels, rows) if args.labels is not None else None
    if args.margin_labels is not None:
        if len(inputs) < 2:
            raise CLIError(
                f"model {args.model!r} has no labels input (it takes one input); "
                "--labels is for ground truth"
            )
        labels = _load_npy(args.margin_labels, "--margin-labels")
        feeds[inputs[1].name] = _fit(labels, inputs[1], "--margin-labels")
    elif len(inputs) > 1:
        raise CLIError(
            f"model {args.model!r} needs --margin-labels (its input {inputs[1].name!r})"
        )
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
    if truth is not None:
        if out.ndim != 2 or out.shape[0] != rows:
            raise CLIError(f"--labels needs (rows, classes) scores; the output has {out.shape}")
        classes = out.shape[1]
        if truth.size and (int(truth.min()) < 0 or int(truth.max()) >= classes):
            bad = int(truth.min()) if int(truth.min()) < 0 else int(truth.max())
            raise CLIError(f"--labels holds {bad}, outside the model's {classes} classes")
        correct = int((np.argmax(out, axis=1) == truth).sum())
        print(f"accuracy {correct / max(rows, 1):.4f} ({correct}/{rows} rows)")
    if args.out:
        path = _out_path(args.out)
        np.save(path, out)
        print(f"saved {path}")
    return 0

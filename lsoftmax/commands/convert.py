"""``lsoftmax convert caffe|mxnet ...``: bring a Caffe or MXNet model into PyTorch (and ONNX)."""

from __future__ import annotations

import argparse
from typing import Any

from lsoftmax.cli import CLIError


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shape like 1,1,28,28: {text!r}") from None
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"shape needs >= 2 positive dims: {text!r}")
    return dims


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        required=True,
        help="where to save the module (torch.save of the whole module; "
        "reload with lsoftmax.converters.load_converted)",
    )
    p.add_argument("--onnx", default=None, help="also export to this ONNX file")
    p.add_argument(
        "--onnx-mode",
        choices=("function", "custom", "portable"),
        default="function",
        help="ONNX flavour (see lsoftmax export; default function)",
    )
    p.add_argument(
        "--input-shape",
        type=_shape,
        default=None,
        metavar="N,C,H,W",
        help="shape of the data input (for shape checks and the ONNX example input)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a Caffe or MXNet model (L-Softmax, L-GM) to PyTorch / ONNX",
        description="Convert a Caffe (BVLC, L-Softmax fork, L-GM fork) or MXNet model to a "
        "PyTorch module, print what each source layer became, optionally export ONNX.",
    )
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    c = sub.add_parser("caffe", help="NET.prototxt [WEIGHTS.caffemodel]")
    c.add_argument("prototxt", metavar="NET.prototxt")
    c.add_argument("caffemodel", metavar="WEIGHTS.caffemodel", nargs="?", default=None)
    c.add_argument("--phase", choices=("test", "train"), default="test")
    _common(c)
    c.set_defaults(func=run)
    m = sub.add_parser("mxnet", help="SYMBOL.json PARAMS")
    m.add_argument("symbol", metavar="SYMBOL.json")
    m.add_argument("params", metavar="PARAMS")
    m.add_argument(
        "--logits",
        action="store_true",
        help="drop SoftmaxOutput: output the logits instead of probabilities",
    )
    _common(m)
    m.set_defaults(func=run)


def _example_shape(module: Any, args: argparse.Namespace) -> tuple[int, ...]:
    if args.input_shape is not None:
        return tuple(args.input_shape)
    shape = module.source.get("input_shape")
    if shape is None:
        raise CLIError("--onnx needs --input-shape (the source does not declare its input shape)")
    return tuple(shape)


def run(args: argparse.Namespace) -> int:
    import torch

    from lsoftmax.converters import from_caffe, from_mxnet
    from lsoftmax.converters.graph import format_mapping
    from lsoftmax.converters.saving import save_converted

    if args.source == "caffe":
        module = from_caffe(
            args.prototxt, args.caffemodel, phase=args.phase, input_shape=args.input_shape
        )
    else:
        module = from_mxnet(args.symbol, args.params, keep_softmax=not args.logits)
    print(format_mapping(module.mapping))
    print(f"outputs: {', '.join(module.output_names)}")
    example_shape = _example_shape(module, args) if args.onnx else None
    save_converted(module, args.out)
    print(f"wrote {args.out}")
    if example_shape is not None:
        from lsoftmax.exporters import export_onnx

        export_onnx(module.eval(), (torch.randn(*example_shape),), args.onnx, mode=args.onnx_mode)
        print(f"wrote {args.onnx}")
    return 0

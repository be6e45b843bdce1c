"""``lsoftmax export CHECKPOINT OUT.onnx``: a trained model -> a checked ONNX file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

MODES = ("portable", "custom", "function")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX",
        description="Export a model saved by `lsoftmax train` (lsoftmax.checkpoint) to ONNX with "
        "a dynamic batch dimension. Modes: function (default: ai.lsoftmax nodes with standard-op "
        "function bodies, runs anywhere, uses the lsoftmax kernel where its library is "
        "registered), custom (ai.lsoftmax nodes only) and portable (standard ONNX ops only).",
    )
    p.add_argument("checkpoint", help="checkpoint file (lsoftmax.checkpoint format)")
    p.add_argument("out", help="output .onnx path")
    p.add_argument("--mode", choices=MODES, default="function", help="export mode")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (>= 18; default torch's)")
    p.add_argument("--batch-size", type=int, default=2, help="batch size of the example input")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import onnx
    import torch

    from lsoftmax.checkpoint import load_model
    from lsoftmax.cli import CLIError
    from lsoftmax.exporters import export_onnx
    from lsoftmax.exporters.domain import MIN_OPSET

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    newest = onnx.defs.onnx_opset_version()
    if args.opset is not None and not MIN_OPSET <= args.opset <= newest:
        raise CLIError(
            f"--opset must be between {MIN_OPSET} and {newest} (the newest this onnx "
            f"{onnx.__version__} knows), got {args.opset}"
        )
    model, meta = load_model(args.checkpoint)
    shape = meta.get("input_shape")
    if not shape:
        raise CLIError(f"{args.checkpoint}: the checkpoint records no input_shape")
    dtype = getattr(torch, str(meta.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CLIError(f"{args.checkpoint}: unsupported dtype {meta.get('dtype')!r}")
    model = _with_ood_score(model.to(dtype).eval())
    example = torch.zeros((args.batch_size, *(int(v) for v in shape)), dtype=dtype)
    # Written under a temporary name and renamed only when it is what was asked for, so a failed
    # or mismatched export leaves nothing at args.out.
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        proto = export_onnx(model, example, str(tmp), mode=args.mode, opset=args.opset)
        opset = next(i.version for i in proto.opset_import if i.domain in ("", "ai.onnx"))
        if args.opset is not None and opset != args.opset:
            raise CLIError(f"--opset {args.opset}: the exporter produced opset {opset} instead")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    ins = ", ".join(_describe(v) for v in proto.graph.input)
    outs = ", ".join(_describe(v) for v in proto.graph.output)
    print(f"wrote {out} (mode {args.mode}, opset {opset}): inputs {ins} -> outputs {outs}")
    return 0


def _with_ood_score(model: Any) -> Any:
    """An L-GM model exports ``(logits, loglik)``: ``loglik`` is its out-of-distribution score."""
    import torch

    if getattr(model, "head_kind", None) != "lgm":
        return model

    class LGMInference(torch.nn.Module):
        onnx_output_names = ("logits", "loglik")

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, loglik = self.net.head.inference(self.net.features(x))
            return logits, loglik

    return LGMInference(model).eval()


def _describe(value: object) -> str:
    import onnx

    assert isinstance(value, onnx.ValueInfoProto)
    t = value.type.tensor_type
    dims = [d.dim_param or str(d.dim_value) for d in t.shape.dim]
    return f"{value.name}[{','.join(dims)}]:{onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)}"

"""PyTorch -> ONNX for models with lsoftmax layers (installed as ``lsoftmax.exporters``).

>>> from lsoftmax.exporters import export_onnx
>>> export_onnx(model.eval(), torch.randn(8, 64), "model.onnx", mode="function")  # doctest: +SKIP
"""

from lsoftmax.exporters.export import MODES, check, export_onnx, finalize, output_names
from lsoftmax.exporters.translations import TrainingOpError

__all__ = ["MODES", "TrainingOpError", "check", "export_onnx", "finalize", "output_names"]

"""lsoftmax: large-margin softmax losses (L-Softmax, L-GM) for PyTorch, ONNX and ONNX Runtime.

Submodules are imported on demand so that ``import lsoftmax`` stays cheap:
``lsoftmax.core`` (numpy API over the C++ core), ``lsoftmax.schedules``, ``lsoftmax.torch``
(custom ops and modules), ``lsoftmax.ort`` (ONNX Runtime helpers), ``lsoftmax.exporters`` and
``lsoftmax.converters``.
"""

__version__ = "0.1.0"

"""The ``ai.lsoftmax`` ONNX domain: name, version, and schema registration with ``onnx``.

Registering the schemas lets the onnxscript-based translations emit our nodes (the exporter
looks schemas up) and lets ``onnx.checker`` check them like standard ops.
"""

from __future__ import annotations

import onnx
import onnx.defs
import onnxscript

__all__ = ["DOMAIN", "DOMAIN_VERSION", "MIN_OPSET", "opset", "register_schema"]

DOMAIN = "ai.lsoftmax"
DOMAIN_VERSION = 1
# The dynamo exporter emits standard ops at opset 18 or newer.
MIN_OPSET = 18

opset = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


def register_schema(schema: onnx.defs.OpSchema) -> None:
    """Register ``schema`` with ``onnx`` once per process."""
    if not onnx.defs.has(schema.name, schema.since_version, schema.domain):
        onnx.defs.register_schema(schema)

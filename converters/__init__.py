"""Bring Caffe and MXNet models (L-Softmax, L-GM) into PyTorch (and, via exporters, ONNX).

- ``from_caffe(prototxt, caffemodel=None, phase="test")``: BVLC Caffe and both research forks.
- ``from_mxnet(symbol_json, params)``: MXNet symbol + ``.params`` checkpoints.
- ``load_gluon_lgm(params, feature_net=None, key_map=None)``: Gluon L-GM parameter files.
- ``load_converted(path)``: reload a model saved by ``lsoftmax convert --out``.

See docs/converters.md for the layer mapping and the numerical conventions.
"""

from __future__ import annotations

from typing import Any

__all__ = ["from_caffe", "from_mxnet", "load_converted", "load_gluon_lgm"]


def from_caffe(*args: Any, **kwargs: Any) -> Any:
    from lsoftmax.converters.caffe_convert import from_caffe as impl

    return impl(*args, **kwargs)


def from_mxnet(*args: Any, **kwargs: Any) -> Any:
    from lsoftmax.converters.mxnet_convert import from_mxnet as impl

    return impl(*args, **kwargs)


def load_gluon_lgm(*args: Any, **kwargs: Any) -> Any:
    from lsoftmax.converters.gluon_lgm import load_gluon_lgm as impl

    return impl(*args, **kwargs)


def load_converted(*args: Any, **kwargs: Any) -> Any:
    from lsoftmax.converters.saving import load_converted as impl

    return impl(*args, **kwargs)


from_caffe.__doc__ = "See lsoftmax.converters.caffe_convert.from_caffe."
from_mxnet.__doc__ = "See lsoftmax.converters.mxnet_convert.from_mxnet."
load_gluon_lgm.__doc__ = "See lsoftmax.converters.gluon_lgm.load_gluon_lgm."
load_converted.__doc__ = "See lsoftmax.converters.saving.load_converted."

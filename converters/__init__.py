"""Bring Caffe and MXNet models (L-Softmax, L-GM) into PyTorch (and, via exporters, ONNX).

- ``from_caffe(prototxt, caffemodel=None, phase="test")``: BVLC Caffe and both research forks.
- ``from_mxnet(symbol_json, params)``: MXNet symbol + ``.params`` checkpoints.
- ``load_gluon_lgm(params, feature_net=None, key_map=None)``: Gluon L-GM parameter files.
- ``load_converted(path)``: reload a model saved by ``lsoftmax convert --out``.

See docs/converters.md for the layer mapping and the numerical conventions.
"""

from lsoftmax.converters.caffe_convert import from_caffe
from lsoftmax.converters.gluon_lgm import load_gluon_lgm
from lsoftmax.converters.graph import ConvertedNet
from lsoftmax.converters.mxnet_convert import from_mxnet
from lsoftmax.converters.saving import load_converted, save_converted

__all__ = [
    "ConvertedNet",
    "from_caffe",
    "from_mxnet",
    "load_converted",
    "load_gluon_lgm",
    "save_converted",
]

"""The toolkit's exported-model format (``sphereface-plus export``), one owner for its names.

An exported ONNX or TorchScript file takes the toolkit's preprocessed crops as ``input`` and returns
``embedding`` (L2-normalised) and ``feature`` (before normalisation); its metadata marks it with
:data:`FORMAT_KEY` and records the template, input size, preprocessing and flip policy. The exporter
(``eval.export``), the reader of such files (``eval.onnx_model``) and the importer that rewrites a foreign
ONNX model into this format (:mod:`sphereface_plus.importers.foreign_onnx`) all read these names here.
"""
from __future__ import annotations

__all__ = ["FORMAT_KEY", "FORMAT_VERSION", "TORCHSCRIPT_META", "INPUT_NAME", "EMBEDDING_OUTPUT", "FEATURE_OUTPUT",
           "FLIP_POLICY", "PREPROCESSING", "FLIP_KEY"]

#: metadata key that marks a file written by ``sphereface-plus export`` (value: the format version)
FORMAT_KEY = "sphereface_plus.format"
FORMAT_VERSION = "1"
#: the name of the TorchScript extra file holding the metadata (JSON)
TORCHSCRIPT_META = "sphereface_plus.json"
INPUT_NAME = "input"
EMBEDDING_OUTPUT = "embedding"
FEATURE_OUTPUT = "feature"
#: the flip policy the toolkit uses and the stored threshold was chosen with (eval.features.embed_batch)
FLIP_POLICY = "concat: feature = [f(crop), f(mirror)], then L2-normalised and compared by cosine"
PREPROCESSING = "BGR uint8 crop, (x - 127.5) / 128, NCHW float32"
#: machine-readable flip policy (concat | sum | none, sphereface_plus.importers.preprocessing.FLIP_POLICIES);
#: absent in older files: concat
FLIP_KEY = "flip"

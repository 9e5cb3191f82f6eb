"""The input convention a released model was trained with, and the module that feeds it.

Every model of this toolkit takes BGR crops as ``(x - 127.5) / 128`` (docs/interfaces.md). Models from
elsewhere were trained with their own convention, and scoring one with another loses accuracy without
any error. An imported checkpoint therefore carries a ``preprocessing`` entry:

========== ================================================================================
template   ``112x96`` (SphereFace), ``112x112`` (insightface, OpenSphere) or ``150x150`` (dlib's
           face chip): the alignment the crops must have (``sphereface_plus.templates.TEMPLATES``)
color      ``bgr`` (Caffe / OpenCV order: SphereFace) or ``rgb`` (insightface, OpenSphere, dlib)
mean, std  pixel normalisation ``(x - mean) / std`` per channel, in the source's channel order:
           SphereFace 127.5 / 128 (``test/code/evaluation.m``), insightface and OpenSphere
           127.5 / 127.5 (``arcface_torch`` ``eval``, OpenSphere ``dataset/utils.py``), dlib
           (122.782, 117.001, 104.298) / 256 (``input_rgb_image_sized``)
flip       how the mirror image is used at test time: ``concat`` (SphereFace, OpenSphere: the
           feature is ``[f(crop), f(mirror)]``), ``sum`` (insightface ``verification.py``:
           ``f(crop) + f(mirror)``) or ``none`` (dlib)
embedding  the layer whose output is the embedding (``fc5``, ``features``...), for the record
source     where the weights came from (``caffe``, ``insightface``, ...)
========== ================================================================================

:class:`SourceInput` is the one place the convention is applied: it wraps the backbone so that it takes
the toolkit's input and hands the backbone exactly what the source pipeline would have computed from
the same uint8 pixels (``x * 128 + 127.5`` recovers them exactly: both steps are exact in float32),
so everything that embeds (``verify``, ``compare``, ``export``, IJB, ``FaceEmbedder``) applies it
without a branch. The flip policy is applied where crop and mirror features are combined: by
``FaceEmbedder`` / ``compare`` (features are always extracted as ``[f(crop), f(mirror)]``, and a
verification protocol fuses them its own way).
A checkpoint without the entry is the toolkit's own convention and is loaded unwrapped, as before.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from sphereface_plus.templates import TEMPLATE_SIZES
from sphereface_plus.errors import CheckpointError, UsageError, short_repr

__all__ = ["PREPROCESSING_KEY", "COLORS", "FLIP_POLICIES", "TEMPLATE_SIZES", "Preprocessing", "SourceInput",
           "TOOLKIT", "SPHEREFACE", "INSIGHTFACE", "OPENSPHERE", "DLIB", "wrap_backbone", "source_backbone"]

#: the checkpoint key holding the dict of :class:`Preprocessing`
PREPROCESSING_KEY = "preprocessing"
COLORS = ("bgr", "rgb")
FLIP_POLICIES = ("concat", "sum", "none")
#: the toolkit's own input: x_toolkit = (pixel - 127.5) / 128, BGR
TOOLKIT_MEAN, TOOLKIT_STD = 127.5, 128.0

Number = Union[float, Sequence[float]]


def _three(value: Number, name: str, where: str) -> List[float]:
    vals = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or not all(v == v for v in vals):
        raise CheckpointError(f"{where}: preprocessing {name} must be one number or three (one per channel), got {short_repr(value)}")
    return vals


@dataclass
class Preprocessing:
    """The source model's input convention (see the module docstring). ``mean``/``std``: per channel, in
    the source's channel order (``color``)."""

    template: str = "112x96"
    color: str = "bgr"
    mean: List[float] = field(default_factory=lambda: [TOOLKIT_MEAN] * 3)
    std: List[float] = field(default_factory=lambda: [TOOLKIT_STD] * 3)
    flip: str = "concat"
    embedding: str = "fc5"
    source: str = "toolkit"

    def __post_init__(self) -> None:
        self.check("preprocessing")

    def check(self, where: str) -> "Preprocessing":
        for name in ("template", "color", "flip", "embedding", "source"):  # text fields, checked before any use
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > 200:
                raise CheckpointError(f"{where}: {name} must be a short text, got {short_repr(value)}")
        if self.template not in TEMPLATE_SIZES:
            raise CheckpointError(f"{where}: template {short_repr(self.template)} is not one of {', '.join(TEMPLATE_SIZES)}")
        if self.color not in COLORS:
            raise CheckpointError(f"{where}: color {short_repr(self.color)} is not one of {', '.join(COLORS)}")
        if self.flip not in FLIP_POLICIES:
            raise CheckpointError(f"{where}: flip {short_repr(self.flip)} is not one of {', '.join(FLIP_POLICIES)}")
        self.mean = _three(self.mean, "mean", where)
        self.std = _three(self.std, "std", where)
        if any(s == 0 for s in self.std):
            raise CheckpointError(f"{where}: preprocessing std must not be 0, got {self.std}")
        return self

    @property
    def input_size(self):
        return TEMPLATE_SIZES[self.template]

    def is_toolkit_input(self) -> bool:
        """True when the backbone takes the toolkit's input as it is (BGR, (x - 127.5) / 128)."""
        return self.color == "bgr" and self.mean == [TOOLKIT_MEAN] * 3 and self.std == [TOOLKIT_STD] * 3

    def describe(self) -> str:
        def fmt(v: List[float]) -> str:
            return f"{v[0]:g}" if len(set(v)) == 1 else "[" + ", ".join(f"{x:g}" for x in v) + "]"

        return (f"{self.template} crops, {self.color.upper()}, (x - {fmt(self.mean)}) / {fmt(self.std)}, "
                f"flip {self.flip}, embedding {self.embedding}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "checkpoint") -> "Preprocessing":
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{where}: '{PREPROCESSING_KEY}' must be a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise CheckpointError(f"{where}: unknown preprocessing keys {unknown} (known: "
                                  f"{', '.join(cls.__dataclass_fields__)}); was it written by a newer toolkit?")
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise CheckpointError(f"{where}: {e}") from None
            raise CheckpointError(f"{where}: bad preprocessing entry ({e})") from None


#: the conventions of the sources the importers know (``mean``/``std`` in the source's channel order)
TOOLKIT = Preprocessing()
SPHEREFACE = Preprocessing(template="112x96", color="bgr", mean=[127.5] * 3, std=[128.0] * 3, flip="concat",
                           embedding="fc5", source="caffe")
INSIGHTFACE = Preprocessing(template="112x112", color="rgb", mean=[127.5] * 3, std=[127.5] * 3, flip="sum",
                            embedding="features", source="insightface")
OPENSPHERE = Preprocessing(template="112x112", color="rgb", mean=[127.5] * 3, std=[127.5] * 3, flip="concat",
                           embedding="fc", source="opensphere")
#: dlib's input_rgb_image_sized<150> (dlib/dnn/input.h): (pixel - mean_c) / 256 in RGB; the importer takes
#: the means from the file (these are dlib's defaults, which the released model stores). No test-time
#: mirror: dlib embeds the chip alone, or averages random jitters (eval.jitter).
DLIB = Preprocessing(template="150x150", color="rgb", mean=[122.782, 117.001, 104.298], std=[256.0] * 3, flip="none",
                     embedding="fc", source="dlib")


def parse_override(pre: Preprocessing, template: Optional[str] = None, color: Optional[str] = None,
                   mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                   flip: Optional[str] = None) -> Preprocessing:
    """``pre`` with the settings given on the command line replaced (each checked, one error line)."""
    data = pre.to_dict()
    for key, value in (("template", template), ("color", color), ("mean", mean), ("std", std), ("flip", flip)):
        if value is not None:
            data[key] = list(value) if isinstance(value, (list, tuple)) else value
    try:
        return Preprocessing(**data)
    except CheckpointError as e:
        raise UsageError(str(e).replace("preprocessing: ", "--")) from None


class SourceInput(nn.Module):
    """``backbone`` behind the conversion toolkit input -> the source's input (module docstring).

    ``forward(x)``: ``x`` is ``B x 3 x H x W`` in the toolkit's convention; the backbone sees
    ``(pixels[, RGB] - mean) / std``.
    """

    def __init__(self, backbone: nn.Module, pre: Preprocessing):
        super().__init__()
        self.backbone = backbone
        self.preprocessing = pre
        self.swap_rb = pre.color == "rgb"
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def source_input(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.float() * TOOLKIT_STD + TOOLKIT_MEAN  # exact: the uint8 values back
        if self.swap_rb:
            pixels = pixels.flip(1)
        return (pixels - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.source_input(x))

    def extra_repr(self) -> str:
        return self.preprocessing.describe()


def wrap_backbone(backbone: nn.Module, pre: Optional[Preprocessing]) -> nn.Module:
    """The module that takes the toolkit's input for ``backbone``: the backbone itself when ``pre`` is
    ``None`` or the toolkit's own pixel convention, else a :class:`SourceInput`."""
    if pre is None or pre.is_toolkit_input():
        return backbone
    return SourceInput(backbone, pre)


def source_backbone(module: nn.Module) -> nn.Module:
    """The backbone inside a :class:`SourceInput` (the module whose weights checkpoints hold), or ``module``."""
    return module.backbone if isinstance(module, SourceInput) else module

"""The standard insightface verification packs: ``verify packs`` and validation during training.

A folder of packs as insightface distributes them (``lfw.bin``, ``cfp_fp.bin``, ``cfp_ff.bin``,
``agedb_30.bin``, ``calfw.bin``, ``cplfw.bin``, ``vgg2_fp.bin``: pickles of encoded 112x112 crops and
same/different flags, read by :func:`eval.pairs.load_bin_pack`) is scored in one pass: the images of
every pack go through the model in one stream (one progress bar), then each pack is scored under the
chosen protocol (:mod:`eval.protocols`; ``insightface`` by default, the protocol of the published
tables) with contiguous folds, and the packs' accuracies are averaged.

Image size rule (one rule, :func:`eval.features.fit_crop` / ``data_prep.geometry.cut_wide_crop``): a
pack image of the model's input size is used as it is; an image as tall as the input and wider by an
even number of columns is cut to its middle columns. The packs hold 112x112 crops of insightface's
template, which is the SphereFace 112x96 template shifted right by 8 pixels, so the middle 96
columns of a pack crop ARE the 112x96 alignment: nothing is resized or resampled. Any other size (a
pack of 112x96 crops for a 112x112 model, 128x128 crops...) fits no rule and is refused before
anything is embedded.
"""
from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from sphereface_plus.errors import InputFileError, MissingFileError, UsageError

logger = logging.getLogger(__name__)

#: the standard packs, in the order tables list them (the file in a pack folder is ``<name>.bin``)
STANDARD_PACKS = ("lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "vgg2_fp")

SIZE_RULE = ("a pack image of the model's input size is used as it is, and one as tall and wider by an even number "
             "of columns (112x112 for a 112x96 model) is cut to its middle columns")


class LoadedPack(NamedTuple):
    name: str
    path: Path
    images: List[bytes]
    issame: np.ndarray


def check_pack_names(names: Sequence[str], where: str = "eval.packs") -> List[str]:
    """``names`` as a list, each one of :data:`STANDARD_PACKS` (else a UsageError naming the nearest)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out = []
    for name in names:
        if name not in STANDARD_PACKS:
            close = difflib.get_close_matches(str(name), STANDARD_PACKS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"{where}: {name!r} is not a standard pack{hint}; choose from {', '.join(STANDARD_PACKS)}")
        if name in out:
            raise UsageError(f"{where}: {name!r} is listed twice")
        out.append(name)
    return out


def pack_paths(folder, names: Optional[Sequence[str]] = None, where: str = "--dir") -> Dict[str, Path]:
    """``{name: folder/<name>.bin}``: the named packs (each must exist), or every standard pack found."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{where} {folder}: no such folder; give the folder holding lfw.bin, cfp_fp.bin, ...")
    if names:
        names = check_pack_names(names)
        missing = [n for n in names if not (folder / f"{n}.bin").is_file()]
        if missing:
            raise MissingFileError(f"{where} {folder} has no {', '.join(m + '.bin' for m in missing)}; put the packs "
                                   f"there or drop them from the list")
        return {n: folder / f"{n}.bin" for n in names}
    found = {n: folder / f"{n}.bin" for n in STANDARD_PACKS if (folder / f"{n}.bin").is_file()}
    if not found:
        raise MissingFileError(f"{where} {folder} holds none of the standard packs "
                               f"({', '.join(n + '.bin' for n in STANDARD_PACKS)})")
    return found


def load_packs(paths: Dict[str, Path]) -> List[LoadedPack]:
    """Read every pack (restricted unpickling, :func:`eval.pairs.load_bin_pack`)."""
    from eval.pairs import load_bin_pack

    packs = []
    for name, path in paths.items():
        images, issame = load_bin_pack(path)
        if len(issame) < 2:
            raise InputFileError(f"{path} holds {len(issame)} pair(s); a verification pack needs at least 2")
        packs.append(LoadedPack(name, Path(path), images, issame))
    return packs


def check_pack_size(pack: LoadedPack, input_size) -> None:
    """Refuse, before anything is embedded, a pack whose (first) image fits no size rule of the model."""
    import cv2

    from data_prep.geometry import cut_wide_crop

    image = cv2.imdecode(np.frombuffer(pack.images[0], dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise InputFileError(f"{pack.path}: image 0 cannot be decoded (is this an insightface .bin pack?)")
    if input_size is not None and cut_wide_crop(image, input_size) is None:
        h, w = image.shape[:2]
        raise InputFileError(f"{pack.path}: its images are {h}x{w} (HxW) and the model takes {input_size[0]}x"
                             f"{input_size[1]}: no rule fits ({SIZE_RULE}); use a model trained on {h}x{w} crops "
                             f"or a pack of {input_size[0]}x{input_size[1]} crops")


def embed_packs(model, packs: Sequence[LoadedPack], input_size, batch_size: int = 64, flip: bool = True,
                device="cpu", num_workers: int = 0, precision: str = "fp32",
                channels_last: Optional[bool] = None) -> List[np.ndarray]:
    """Features of every image of every pack, in one stream (one progress bar); one array per pack."""
    from torch.utils.data import ConcatDataset

    from eval.features import EncodedImages, extract_from_dataset

    for p in packs:
        check_pack_size(p, input_size)
    data = ConcatDataset([EncodedImages(p.images, input_size) for p in packs])
    feats = extract_from_dataset(model, data, batch_size, flip, device, num_workers, desc="packs",
                                 precision=precision, channels_last=channels_last)
    bounds = np.cumsum([0] + [len(p.images) for p in packs])
    return [feats[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def score_packs(packs: Sequence[LoadedPack], features: Sequence[np.ndarray], protocol: str = "insightface",
                num_folds: int = 10, flip_halves: bool = True, roc_points: bool = True) -> Dict[str, object]:
    """The report of every pack (:func:`eval.protocols.protocol_report`, contiguous folds) and their mean.

    Returns ``protocol``, ``packs`` (``{name: report}``), ``accuracies`` (``{name: mean accuracy}``),
    ``mean_accuracy`` (the mean over the packs) and ``num_folds``.
    """
    from eval.pairs import contiguous_folds
    from eval.protocols import protocol_report

    reports = {}
    for p, f in zip(packs, features):
        folds = contiguous_folds(len(p.issame), num_folds)
        rep = protocol_report(protocol, f[0::2], f[1::2], p.issame, folds, flip_halves=flip_halves,
                              roc_points=roc_points)
        reports[p.name] = {"pack": str(p.path), **rep}
    accs = {n: r["mean_accuracy"] for n, r in reports.items()}
    return {"protocol": protocol, "packs": reports, "accuracies": accs,
            "mean_accuracy": float(np.mean(list(accs.values()))), "num_folds": int(num_folds)}


def format_packs_table(summary: Dict[str, object]) -> str:
    """One table: pairs, k-fold accuracy +- std (percent) and VAL@FAR per pack, then the packs' mean."""
    from eval.protocols import COMPARABLE_TO

    protocol = summary["protocol"]
    lines = [f"protocol: {protocol} ({summary['num_folds']}-fold; comparable to {COMPARABLE_TO[protocol]})",
             f"{'pack':<10} {'pairs':>6}  {'accuracy':>16}  {'VAL@FAR=1e-3':>12}"]
    for name, rep in summary["packs"].items():
        val = rep.get("val_at_far")
        val_text = f"{100 * val['val']:11.2f}%" if val else f"{'-':>12}"
        lines.append(f"{name:<10} {rep['num_pairs']:>6}  {100 * rep['mean_accuracy']:7.2f}% +- {100 * rep['std_accuracy']:5.2f}"
                     f"  {val_text}")
    lines.append(f"{'mean':<10} {'':>6}  {100 * summary['mean_accuracy']:7.2f}%")
    return "\n".join(lines)


def packs_verifier(folder, names: Sequence[str], input_size, batch_size: int = 64, num_workers: int = 0,
                   protocol: str = "insightface", num_folds: int = 10):
    """A verifier for :class:`sphereface_plus.trainer.Trainer` on standard packs (validation during training).

    ``verifier(backbone, device, precision=, channels_last=) -> report``: :func:`score_packs` (ROC
    points left out) plus ``std_accuracy`` (None: the mean over packs has no fold spread) and
    ``compare_threshold``, the plain-cosine threshold (sphereface protocol without mean subtraction,
    what ``compare`` scores) on the first pack of ``names``. ``input_size``: the model's (H, W). The packs are read on the first call
    (only rank 0 verifies), and the model is switched back to training mode afterwards.
    """
    paths = pack_paths(folder, names, where="eval.pack_dir")
    loaded: List[LoadedPack] = []

    def verifier(model, device, precision: str = "fp32", channels_last: bool = False) -> Dict[str, object]:
        from eval.protocols import protocol_report

        if not loaded:
            loaded.extend(load_packs(paths))
        was_training = model.training
        model.eval()
        try:
            feats = embed_packs(model, loaded, input_size, batch_size, True, device, num_workers, precision,
                                channels_last)
        finally:
            model.train(was_training)
        summary = score_packs(loaded, feats, protocol, num_folds, flip_halves=True, roc_points=False)
        first, f = loaded[0], feats[0]
        from eval.pairs import contiguous_folds

        plain = protocol_report("sphereface", f[0::2], f[1::2], first.issame, contiguous_folds(len(first.issame),
                                num_folds), mean_sub=False, roc_points=False)
        return {**summary, "std_accuracy": None, "compare_threshold": float(plain["threshold"]),
                "compare_threshold_source": f"{first.name}: sphereface protocol, plain cosine"}

    return verifier


def oracle_note() -> str:
    from eval.protocols import ORACLE_LABEL

    return f"oracle_accuracy in each pack's report: {ORACLE_LABEL}"

"""The demo's data (``sphereface-plus demo``): a training set and a separate test set of pairs, aligned.

Without ``--data``, two deterministic synthetic identity sets from :mod:`data_prep.synthetic` (cartoon faces,
NOT real people); with an LFW folder, the people of every fold but the test fold who have enough images
train, and the test fold's pairs test. Either way the images are aligned by :func:`data_prep.prepare.align_tree`
and a rerun keeps the finished crops.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from data_prep.prepare import align_tree
from data_prep.synthetic import ensure_synthetic_dataset
from eval.lfw import lfw_people_split, parse_pairs
from eval.pairs import stratified_folds
from sphereface_plus.errors import UsageError
from sphereface_plus.utils import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["DemoData", "TEST_SEED_OFFSET", "prepare_synthetic_demo", "prepare_lfw"]

#: seed offset of the synthetic TEST identities (their appearance is drawn from seed + this), so they
#: are other people than the training identities drawn from ``seed``.
TEST_SEED_OFFSET = 7919


@dataclass
class DemoData:
    """What training and verification need, wherever it came from."""
    kind: str  # "synthetic" | "lfw"
    train_root: Path  # aligned crops the training list refers to
    train_list: Path  # "relative/path label" lines, labels 0..C-1
    num_train_identities: int
    num_train_images: int
    test_root: Path  # aligned crops the pairs refer to
    pairs: list  # eval.pairs.Pair with fold indices 0..9
    description: str  # one paragraph for the report
    details: Dict[str, Any] = field(default_factory=dict)


def _align(input_dir: Path, output_dir: Path, landmarks: Path, workers: int, what: str):
    """The ``align`` command as a function; a rerun keeps the finished crops."""
    try:
        s = align_tree(input_dir=input_dir, output_dir=output_dir, landmarks=landmarks, template="112x96",
                       workers=workers)
    except UsageError as exc:
        raise RuntimeError(f"aligning {what}: {exc}") from None
    c = s.counts
    print(f"  aligned {what}: {c['aligned']} crops ({s.resumed} kept from an earlier run), "
          f"{c['skipped']} skipped, {c['failed']} failed, {s.seconds:.1f} s -> {output_dir}", flush=True)
    if c["aligned"] == 0:
        raise RuntimeError(f"aligning {what}: no image was aligned; see {s.manifest}")
    return s


def _write_list(path: Path, items: Sequence[Tuple[str, int]]) -> None:

    atomic_write_text(path, "".join(f"{p} {lab}\n" for p, lab in items))


def prepare_synthetic_demo(work: Path, seed: int = 0, train_identities: int = 100, train_images: int = 16,
                           test_identities: int = 100, test_images: int = 8, pairs_per_fold: int = 60,
                           workers: int = 0) -> DemoData:
    """Generate (or reuse) the synthetic training and test identity sets and align both.

    Two separate sets, not one set split by folds: the 10-fold protocol then scores people that the
    model never saw, which is what a verification number means.
    """
    sets = {}
    for name, n_id, n_img, s, ppf in (("train", train_identities, train_images, seed, 2),
                                      ("test", test_identities, test_images, seed + TEST_SEED_OFFSET, pairs_per_fold)):
        raw = ensure_synthetic_dataset(work / f"synthetic_{name}", n_id, n_img, seed=s, pairs_per_fold=ppf,
                                       workers=workers)
        print(f"  synthetic {name} set: {n_id} identities x {n_img} images (seed {s}) in {raw.root}", flush=True)
        aligned = work / f"synthetic_{name}_112x96"
        summary = _align(raw.images, aligned, raw.landmarks_file, workers, f"synthetic {name} set")
        sets[name] = (raw, aligned, summary)
    raw_tr, aligned_tr, s_tr = sets["train"]
    raw_te, aligned_te, _ = sets["test"]
    pairs = parse_pairs(raw_te.pairs_file)
    return DemoData(
        kind="synthetic", train_root=aligned_tr, train_list=Path(s_tr.list_path),
        num_train_identities=s_tr.num_classes, num_train_images=s_tr.num_listed,
        test_root=aligned_te, pairs=pairs,
        description=(
            f"SYNTHETIC data (data_prep.synthetic: cartoon faces drawn with OpenCV, not real people). "
            f"Training: {train_identities} identities x {train_images} images (seed {seed}); test: "
            f"{test_identities} other identities x {test_images} images (seed {seed + TEST_SEED_OFFSET}) with "
            f"{len(pairs)} pairs in 10 person-disjoint folds. Aligned from their exact landmarks to 112x96."
        ),
        details={"train_seed": seed, "test_seed": seed + TEST_SEED_OFFSET, "train_identities": train_identities,
                 "train_images_per_identity": train_images, "test_identities": test_identities,
                 "test_images_per_identity": test_images},
    )


def prepare_lfw(data_dir, work: Path, test_fold: int = 10, min_images: int = 5, workers: int = 0) -> DemoData:
    """Align LFW with its landmark file (reused when done) and split it by the folds of pairs.txt.

    ``test_fold`` is 1-based as in the LFW documentation. The test pairs are that fold's 600 pairs,
    re-split into 10 stratified folds of 60 (30 matched + 30 mismatched) for the 10-fold protocol.
    """
    data = Path(data_dir)
    images, pairs_file, lm_file = data / "images", data / "pairs.txt", data / "lfw_landmark.txt"
    for p, what in ((images, "an images/ folder"), (pairs_file, "pairs.txt"), (lm_file, "lfw_landmark.txt")):
        if not p.exists():
            raise FileNotFoundError(f"--data {data}: {p} is missing; an LFW folder holds images/<Name>/<Name>_NNNN.jpg, "
                                    f"pairs.txt and lfw_landmark.txt ({what})")
    all_pairs = parse_pairs(pairs_file)
    n_folds = max(p.fold for p in all_pairs) + 1
    if not 1 <= test_fold <= n_folds:
        raise ValueError(f"--test-fold {test_fold}: {pairs_file} has folds 1..{n_folds}")
    aligned = work / "lfw_112x96"
    s = _align(images, aligned, lm_file, workers, "LFW")
    listed = [ln.rsplit(None, 1)[0] for ln in Path(s.list_path).read_text().splitlines() if ln.strip()]
    by_person: Dict[str, List[str]] = {}
    for rel in listed:
        by_person.setdefault(rel.split("/", 1)[0], []).append(rel)
    counts = {k: len(v) for k, v in by_person.items()}
    train_people, test_people = lfw_people_split(all_pairs, counts, test_fold - 1, min_images)
    if not train_people:
        raise RuntimeError(f"no LFW person outside fold {test_fold} has {min_images} or more aligned images; lower --min-images")
    leak = set(train_people) & set(test_people)
    if leak:  # cannot happen with the official pairs.txt (person-disjoint folds)
        raise RuntimeError(f"{pairs_file}: fold {test_fold} shares people with the other folds: {sorted(leak)[:5]}")
    items = [(rel, label) for label, name in enumerate(train_people) for rel in sorted(by_person[name])]
    train_list = work / f"lfw_train_fold{test_fold}_min{min_images}.txt"
    _write_list(train_list, items)
    test = [p for p in all_pairs if p.fold == test_fold - 1]
    sub = stratified_folds([p.same for p in test], 10)
    pairs = [p._replace(fold=int(f)) for p, f in zip(test, sub)]
    print(f"  LFW split: train on {len(train_people)} people of the other folds with >= {min_images} images "
          f"({len(items)} images); test on the {len(pairs)} pairs of fold {test_fold} ({len(test_people)} people)",
          flush=True)
    return DemoData(
        kind="lfw", train_root=aligned, train_list=train_list, num_train_identities=len(train_people),
        num_train_images=len(items), test_root=aligned, pairs=pairs,
        description=(
            f"LFW ({data}), aligned from lfw_landmark.txt to 112x96. Training: the {len(train_people)} people "
            f"named in the pairs of the folds other than fold {test_fold} who have at least {min_images} images "
            f"({len(items)} images). Test: the {len(pairs)} pairs of fold {test_fold} ({len(test_people)} people, "
            f"none of them trained on), split into 10 stratified folds of {len(pairs) // 10} pairs for the "
            f"10-fold protocol (threshold of each chosen on the other nine)."
        ),
        details={"data": str(data), "test_fold": test_fold, "min_images": min_images,
                 "train_people": len(train_people), "test_people": len(test_people)},
    )


# ------------------------------------------------------------------------------------------- train

"""Fine-tuning a released model on your own identities: dlib's ResNet on the LFW people outside the test fold.

    python bench/finetune_lfw.py --crops CROPS          # the measured run of docs/benchmarks.md#fine-tuning-experiment
    python bench/finetune_lfw.py --crops CROPS --iterations 4 --tag tiny   # a quick check of the whole script

``CROPS``: LFW aligned to the model's template by the toolkit (``sphereface-plus align --input
../shared/data/lfw/images --output CROPS --detector mtcnn --template 150x150 --format png``, about 30 minutes
on two cores; docs/model_zoo.md). The model: ``sphereface-plus import --from dlib`` (from the
``face-recognition-models`` wheel), written under ``--work`` once.

Split (person-disjoint, as bench/lfw_fold_experiment.py): training people are those named in the pairs of
the nine other folds with at least ``--min-images`` crops; the test is the 600 pairs of ``--test-fold``,
re-split into 10 stratified sub-folds of 60, each scored with the threshold that is best on the other 540
(so no threshold is fitted on a training person).

Variants, identical except for the loss (recipe ``configs/face/finetune_dlib.yaml``: same data order, lr
schedule, iterations, the same new head drawn from the same seed):

- ``none``: the released model as imported (no fine-tuning);
- ``a_softmax``: A-Softmax, m = 4, lambda schedule of docs/theory.md#lambda-schedule;
- ``sphereface_plus``: the same plus lambda_M = 1 x the classifier MHE (Riesz s = 2, batch_vs_all).

Each is scored on its raw 128-d descriptors two ways: cosine similarity and Euclidean distance (dlib's rule;
with dlib's fixed threshold 0.6 as well, the released model's own decision rule). Writes
``<work>/finetune_lfw/<tag>/results.json`` and, for the default tag, ``bench/results/finetune_lfw.md``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = {"none": None, "a_softmax": 0.0, "sphereface_plus": 1.0}  # name: lambda_M (None: no training)
DEFAULT_LFW = ROOT.parent / "shared" / "data" / "lfw"
DLIB_THRESHOLD = 0.6  # dlib's face_recognition example: same person below 0.6


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crops", required=True, help="LFW aligned to 150x150 by `sphereface-plus align` (PNG)")
    p.add_argument("--lfw", default=str(DEFAULT_LFW), help="LFW folder with pairs.txt")
    p.add_argument("--work", default=str(ROOT / "bench" / "out"), help="where the model and the runs go")
    p.add_argument("--tag", default="main", help="run name (default main: writes the results table)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--test-fold", type=int, default=1)
    p.add_argument("--min-images", type=int, default=2)
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1, help="the head's lr (optim.lr)")
    p.add_argument("--backbone-lr-scale", type=float, default=0.01, help="the backbone's lr / optim.lr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "finetune_lfw.md"))
    return p.parse_args(argv)


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sphereface_plus", *args], check=True, cwd=ROOT)


def split(args):
    """(train list path, number of people, number of images, test pairs with sub-fold indices)."""
    from eval.lfw import lfw_people_split
    from eval.pairs import parse_lfw_pairs, stratified_folds

    pairs = parse_lfw_pairs(Path(args.lfw) / "pairs.txt", ext=".png")
    crops = Path(args.crops)
    by_person = {d.name: sorted(f"{d.name}/{f.name}" for f in d.glob("*.png")) for d in crops.iterdir() if d.is_dir()}
    counts = {k: len(v) for k, v in by_person.items()}
    train_people, test_people = lfw_people_split(pairs, counts, args.test_fold - 1, args.min_images)
    assert not set(train_people) & set(test_people)
    items = [(rel, label) for label, name in enumerate(train_people) for rel in by_person[name]]
    out = Path(args.work) / "finetune_lfw" / args.tag
    out.mkdir(parents=True, exist_ok=True)
    listing = out / f"train_fold{args.test_fold}_min{args.min_images}.txt"
    listing.write_text("".join(f"{rel} {label}\n" for rel, label in items))
    test = [p for p in pairs if p.fold == args.test_fold - 1]
    missing = [q for p in test for q in (p.path1, p.path2) if not (crops / q).is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} test crops are missing from {crops}, e.g. {missing[0]}")
    sub = stratified_folds([p.same for p in test], 10)
    return listing, len(train_people), len(items), [p._replace(fold=int(f)) for p, f in zip(test, sub)], len(test_people)


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold (``same`` when score > t) with the most correct pairs: every midpoint tried (exact)."""
    s = np.unique(scores)
    cands = np.concatenate([[s[0] - 1], (s[:-1] + s[1:]) / 2, [s[-1] + 1]])
    correct = [(np.sum((scores > t) == same)) for t in cands]
    return float(cands[int(np.argmax(correct))])


def subfold_accuracy(scores: np.ndarray, same: np.ndarray, folds: np.ndarray):
    accs = []
    for k in range(10):
        t = best_threshold(scores[folds != k], same[folds != k])
        accs.append(float(np.mean((scores[folds == k] > t) == same[folds == k])))
    return float(np.mean(accs)), float(np.std(accs))


def evaluate(checkpoint, crops, pairs):
    """Raw descriptors of the test crops (no flip: dlib's rule), scored three ways."""
    import torch

    from eval.features import extract_features, load_embedding_model

    model, info = load_embedding_model(checkpoint)
    paths = sorted({q for p in pairs for q in (p.path1, p.path2)})
    torch.manual_seed(0)
    feats = extract_features(model, crops, paths, batch_size=32, flip=False, input_size=info["input_size"],
                             template=info["template"], precision="fp32")
    index = {p: i for i, p in enumerate(paths)}
    a = feats[[index[p.path1] for p in pairs]].astype(np.float64)
    b = feats[[index[p.path2] for p in pairs]].astype(np.float64)
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    dist = np.linalg.norm(a - b, axis=1)
    return {
        "cosine": subfold_accuracy(cos, same, folds),
        "euclidean": subfold_accuracy(-dist, same, folds),
        "euclidean_0.6": float(np.mean((dist < DLIB_THRESHOLD) == same)),
        "mean_norm": float(np.mean(np.linalg.norm(feats, axis=1))),
    }


def main(argv=None):
    args = parse_args(argv)
    import torch

    from sphereface_plus.commands.train import train
    from sphereface_plus.utils import atomic_write_json, atomic_write_text, setup_logging

    setup_logging()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    work = Path(args.work)
    model = work / "dlib_resnet.pt"
    if not model.is_file():
        cli("import", "--from", "dlib", "--out", str(model))
    listing, n_people, n_images, pairs, n_test_people = split(args)
    print(f"train on {n_people} people ({n_images} crops) outside fold {args.test_fold}; test on its "
          f"{len(pairs)} pairs ({n_test_people} people)", flush=True)
    out = work / "finetune_lfw" / args.tag
    results = []
    for name in names:
        lam = VARIANTS[name]
        t0 = time.perf_counter()
        summary = None
        checkpoint = model
        if lam is not None:
            overrides = [f"out_dir={out / name}", f"train.init_from={model}", f"data.root={args.crops}",
                         f"data.list_file={listing}", f"train.iterations={args.iterations}",
                         f"train.batch_size={args.batch_size}", f"optim.lr={args.lr}", f"train.seed={args.seed}",
                         f"optim.backbone_lr_scale={args.backbone_lr_scale}",
                         f"optim.milestones=[{args.iterations * 2 // 3}]",
                         f"mhe.lambda_m={lam}"]
            resume = "auto" if (out / name / "checkpoints").is_dir() else None
            summary = train(str(ROOT / "configs" / "face" / "finetune_dlib.yaml"), resume=resume, overrides=overrides)
            checkpoint = summary["checkpoint"]
        t_train = time.perf_counter() - t0
        scores = evaluate(checkpoint, args.crops, pairs)
        row = {"variant": name, "lambda_m": lam, "train_seconds": t_train, **scores}
        if summary is not None:
            row.update(final=summary["final"], images_per_s=summary["images_per_s"], precision=summary["precision"],
                       iterations=summary["iteration"], skipped_steps=summary["skipped_steps"])
        results.append(row)
        print(json.dumps(row, default=str), flush=True)
        atomic_write_json(out / "results.json", {"args": vars(args), "results": results})
    from bench._timing import cpu_name, load_average

    meta = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "load": load_average(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join(["python bench/finetune_lfw.py"] + list(sys.argv[1:] if argv is None else argv)),
            "people": n_people, "images": n_images, "test_people": n_test_people}
    atomic_write_json(out / "results.json", {"args": vars(args), "meta": meta, "results": results})
    text = markdown(results, meta, args)
    print(text)
    if args.tag == "main":
        atomic_write_text(args.results, text)
    return 0


def markdown(results, meta, args) -> str:
    lines = [
        "# Fine-tuning dlib's ResNet on LFW people outside the test fold",
        "",
        f"Measured on {meta['cpu']} ({meta['threads']} torch threads), {meta['date']}, load average at the end "
        f"{meta['load'][0]:.1f} (the CPU was shared with other jobs: times are upper bounds).",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Training: {meta['people']} LFW people of the other nine folds with >= {args.min_images} crops "
        f"({meta['images']} crops, MTCNN-aligned 150x150), {args.iterations} iterations of batch {args.batch_size} "
        f"({args.iterations * args.batch_size / meta['images']:.1f} epochs), recipe configs/face/finetune_dlib.yaml, "
        f"lr {args.lr:g} for the head and {args.lr * args.backbone_lr_scale:g} for the backbone (x0.1 after "
        f"{args.iterations * 2 // 3} iterations), seed {args.seed}. Test: the 600 pairs of fold {args.test_fold} ({meta['test_people']} people, "
        "none trained on), 10 stratified sub-folds of 60, each scored at the threshold best on the other 540.",
        "",
        "| variant | cosine | Euclidean | Euclidean < 0.6 (dlib's rule) | mean descriptor norm | train loss / acc (last window) | train time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        fin = r.get("final") or {}
        train_cell = f"{fin['loss']:.3f} / {100 * fin['acc']:.1f}%" if fin else "-"
        tt = f"{r['train_seconds'] / 60:.1f} min" if r["lambda_m"] is not None else "-"
        lines.append(f"| {r['variant']} | {100 * r['cosine'][0]:.2f}% ± {100 * r['cosine'][1]:.2f} | "
                     f"{100 * r['euclidean'][0]:.2f}% ± {100 * r['euclidean'][1]:.2f} | {100 * r['euclidean_0.6']:.2f}% | "
                     f"{r['mean_norm']:.3f} | {train_cell} | {tt} |")
    lines += ["", "With 600 test pairs one sub-fold standard deviation (about one point) is the scale below which "
              "differences between rows mean little.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

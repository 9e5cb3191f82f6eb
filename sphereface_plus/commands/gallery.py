"""``sphereface-plus gallery build|add|remove|search|info``: 1:N identification on a gallery folder.

The work is :class:`eval.gallery.Gallery` (storage, index, open-set threshold) and
:mod:`eval.gallery_inputs` (embeddings files, images, the model's identity); this module parses the
command line and prints.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from sphereface_plus.commands.options import add_precision_argument
from sphereface_plus.errors import UsageError

logger = logging.getLogger(__name__)

HELP = "1:N identification: build a gallery, enrol and remove people, search probes (exact, HNSW, IVF-PQ)"
DESCRIPTION = """\
Identification ("who is this?") against a gallery of enrolled people, kept in a folder: embeddings,
identities, the index and the model's identity, every file checksummed. add and remove are atomic: a
gallery killed at any moment is as before or as after the change (the next command says which);
searches read a consistent snapshot while a change runs; a second writer is refused.

Search returns, per probe and in input order, the top-k identities (one per identity: its best
vector) with cosine scores, and a decision: the best identity when its score is above the gallery's
threshold, else 'unknown'. The threshold is calibrated at --fpir (default 1%) on held-out enrolments
(each identity left out in turn) and stored with the gallery; docs/gallery.md.

Inputs: --images (a photo, a folder of photos named after their identity, or a tree
<identity>/<images>; photos are detected and aligned to the model's template, crops of the model's
size are used as they are) with --checkpoint, or --embeddings E.npy (N x d) with --ids IDS.txt (one
identity per line). A probe embedded by another model than the gallery's is refused.

examples:
  sphereface-plus gallery build --gallery people --checkpoint model.pt --images enrol/
  sphereface-plus gallery build --gallery big --embeddings E.npy --ids IDS.txt --index hnsw
  sphereface-plus gallery add --gallery people --images new_people/
  sphereface-plus gallery remove --gallery people --id "Jane Doe" --id "John Roe"
  sphereface-plus gallery search --gallery people --images probes/ --top-k 5 --json hits.json
  sphereface-plus gallery info --gallery people

exit status: 0 done; 2 usage or input error (one 'error:' line: nothing was changed).
"""

ACTIONS = ("build", "add", "remove", "search", "info")


def _image_options(p: argparse.ArgumentParser, checkpoint_help: str) -> None:
    from data_prep.detectors import list_detectors

    g = p.add_argument_group("images (with --images)")
    g.add_argument("--checkpoint", help=checkpoint_help)
    g.add_argument("--landmarks", help="5-point landmark file (relative path x1 y1 ... x5 y5): align the photos with "
                                       "these points instead of detecting faces")
    g.add_argument("--aligned", action="store_true", help="every image is an aligned crop: no detection")
    g.add_argument("--detector", default="mtcnn", choices=list_detectors(), help="face detector for photos "
                                                                                 "(default mtcnn)")
    g.add_argument("--no-flip", action="store_true", help="embed the crop only (default: crop + mirror)")
    g.add_argument("--batch-size", type=int, default=32, help="images embedded per forward pass (default 32)")
    g.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_precision_argument(g)


def _source_options(p: argparse.ArgumentParser, probes: bool = False) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="an image, a folder of images" + ("" if probes else ", or a tree of identity "
                                                                                       "folders"))
    src.add_argument("--embeddings", help="N x d embeddings (.npy)" + (" of the probes" if probes else ""))
    if not probes:
        p.add_argument("--ids", help="with --embeddings: one identity per line, one line per row")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from eval.gallery import CALIBRATION_SIZE, DEFAULT_FPIR, DEFAULT_TOP_K
    from eval.vector_index import EXACT_UP_TO, HNSW_UP_TO, INDEX_KINDS, INDEX_PARAMS

    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    ckpt = ("the model (.pt / .onnx) that embeds the images; with --embeddings, the model that made them "
            "(recorded, hashed, not run)")
    b = sub.add_parser("build", help="create a gallery from images or embeddings",
                       description="Create a gallery in a new (or empty) folder, choose its index, calibrate "
                                   "its open-set threshold, and report the index's recall against exact search.")
    b.add_argument("--gallery", required=True, help="the gallery folder (new or empty)")
    _source_options(b)
    b.add_argument("--index", default="auto", choices=("auto",) + INDEX_KINDS,
                   help=f"exact (inner product), hnsw or ivfpq; default auto: exact up to {EXACT_UP_TO:,} vectors, "
                        f"HNSW up to {HNSW_UP_TO:,}, IVF-PQ beyond (chosen again as the gallery grows)")
    b.add_argument("--index-param", action="append", default=[], metavar="KEY=VALUE",
                   help="index setting: " + "; ".join(f"{', '.join(v)} ({k})" for k, v in INDEX_PARAMS.items() if v))
    b.add_argument("--fpir", type=float, default=DEFAULT_FPIR,
                   help=f"target false-positive identification rate of the threshold (default {DEFAULT_FPIR})")
    b.add_argument("--calibration-size", type=int, default=CALIBRATION_SIZE,
                   help=f"identities held out in turn to calibrate the threshold (default {CALIBRATION_SIZE})")
    _image_options(b, ckpt)
    a = sub.add_parser("add", help="enrol more images or embeddings (atomic)")
    a.add_argument("--gallery", required=True)
    _source_options(a)
    _image_options(a, ckpt + "; default: the gallery's model, where it was built")
    r = sub.add_parser("remove", help="delete every vector of some identities (atomic)")
    r.add_argument("--gallery", required=True)
    r.add_argument("--id", action="append", required=True, metavar="NAME", help="an identity to delete (repeat)")
    s = sub.add_parser("search", help="top-k identities and an identity-or-unknown decision per probe")
    s.add_argument("--gallery", required=True)
    _source_options(s, probes=True)
    s.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help=f"identities per probe (default {DEFAULT_TOP_K})")
    s.add_argument("--threshold", type=float, help="decision threshold (default: the gallery's calibrated one)")
    s.add_argument("--json", help="write the results here (JSON)")
    _image_options(s, ckpt + "; default: the gallery's model, where it was built")
    i = sub.add_parser("info", help="size, model, index, recall and threshold of a gallery")
    i.add_argument("--gallery", required=True)
    i.add_argument("--json", help="write the information here (JSON)")


def _index_params(items: List[str]) -> Dict[str, int]:
    from eval.vector_index import INDEX_PARAMS

    out = {}
    known = [name for names in INDEX_PARAMS.values() for name in names]
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise UsageError(f"--index-param {item!r}: expected KEY=VALUE with KEY one of {', '.join(known)}")
        try:
            out[key] = int(value)
        except ValueError:
            raise UsageError(f"--index-param {item!r}: the value must be an integer") from None
        if out[key] < 1:
            raise UsageError(f"--index-param {item!r}: the value must be at least 1")
    return out


def _embedder(args, stored_model: Optional[dict]):
    """The image embedder of ``--checkpoint``, or of the gallery's own model where it was built."""
    from pathlib import Path

    from eval import gallery_inputs as G
    from eval.features import read_landmarks

    checkpoint = args.checkpoint
    if checkpoint is None and stored_model and stored_model.get("path") and Path(stored_model["path"]).is_file():
        checkpoint = stored_model["path"]
    if checkpoint is None:
        where = f" (it was built with {stored_model.get('file')}, not found at {stored_model.get('path')})" \
            if stored_model else ""
        raise UsageError(f"--images needs --checkpoint, the model that embeds them{where}")
    landmarks = read_landmarks(args.landmarks) if args.landmarks else None
    return G.ImageEmbedder(checkpoint, device=args.device, detector=args.detector, flip=not args.no_flip,
                           precision=args.precision, batch_size=args.batch_size, landmarks=landmarks,
                           aligned=True if args.aligned else None)


def _inputs(args, stored_model: Optional[dict], probes: bool = False) -> Tuple[np.ndarray, List[str], List[str],
                                                                             Optional[dict], List[Tuple[str, str]]]:
    """``(vectors, identities, names or sources, model identity, failed images)`` of --images / --embeddings."""
    from pathlib import Path

    from eval import gallery_inputs as G

    if args.embeddings:
        x = G.read_embeddings(args.embeddings)
        ids = [] if probes else G.read_ids(_required(args.ids, "--ids", "with --embeddings"), x.shape[0])
        model = G.read_embeddings_model(args.embeddings)
        if model is None and getattr(args, "checkpoint", None):
            model = G.declared_model(args.checkpoint, x.shape[1])
        names = [f"{Path(args.embeddings).name}[{i}]" for i in range(x.shape[0])]
        return x, ids, names, model, []
    if getattr(args, "ids", None):
        raise UsageError("--ids goes with --embeddings; with --images the identities come from the file names")
    items = G.list_images(args.images, identities=not probes)
    emb = _embedder(args, stored_model)
    x, ok, failed = emb.embed(items)
    model = emb.model(x.shape[1])
    if probes:
        return x, [], [items[i][0] for i in ok], model, failed
    return x, [items[i][2] for i in ok], [items[i][0] for i in ok], model, failed


def _required(value, flag: str, when: str):
    if value is None:
        raise UsageError(f"{flag} is needed {when}")
    return value


def _summary(g) -> str:
    info = g.info()
    cal, index = info["calibration"], info["index"]
    line = (f"gallery {info['folder']}: version {info['version']}, {info['num_vectors']:,} vectors of "
            f"{info['num_identities']:,} identities ({info['dim']}-d), {index['kind']} index ({index['backend']})")
    if cal.get("threshold") is not None:
        line += (f"; threshold {cal['threshold']:.4f} at FPIR {cal['fpir']:g} ({cal['searches']} held-out searches, "
                 f"FPIR reached {cal['fpir_reached']:.4f})")
    else:
        line += "; no threshold (fewer than 2 identities): every probe gets its best identity"
    rec = index.get("recall")
    if rec and rec.get("recall_at_1") is not None:
        line += (f"\n{index['kind']} recall against exact search: recall@1 {rec['recall_at_1']:.4f}, "
                 f"recall@{rec['k']} {rec['recall_at_k']:.4f} ({rec['queries']} leave-one-out queries, measured at "
                 f"version {rec['measured_at_version']})")
    return line


def _report_failed(failed: List[Tuple[str, str]], what: str) -> None:
    if failed:
        print(f"{len(failed)} image(s) not {what} (no face or unreadable): "
              + ", ".join(n for n, _ in failed[:5]) + (" ..." if len(failed) > 5 else ""))


def build(args) -> int:
    from eval.gallery import Gallery
    from eval.gallery_writer import check_new_folder

    params = _index_params(args.index_param)
    if not 0 < args.fpir < 1:
        raise UsageError(f"--fpir must lie in (0, 1), got {args.fpir}")
    check_new_folder(args.gallery)  # before any image is embedded
    if args.images and not args.checkpoint:
        raise UsageError("--images needs --checkpoint, the model that embeds them")
    x, ids, sources, model, failed = _inputs(args, None)
    if model is None:
        logger.warning("no model is recorded for %s (pass --checkpoint, the model that made them): probes cannot be "
                       "checked against it", args.embeddings)
    g = Gallery.create(args.gallery, x, ids, sources, model=model, index=args.index, fpir=args.fpir,
                       index_params=params, calibration_size=args.calibration_size)
    _report_failed(failed, "enrolled")
    print(_summary(g))
    return 0


def add(args) -> int:
    from eval.gallery import Gallery

    g = Gallery.open(args.gallery)
    x, ids, sources, model, failed = _inputs(args, g.manifest.get("model"))
    g = g.add(x, ids, sources, model=model)
    _report_failed(failed, "enrolled")
    print(f"added {x.shape[0]} vectors of {len(set(ids))} identities")
    print(_summary(g))
    return 0


def remove(args) -> int:
    from eval.gallery import Gallery

    g = Gallery.open(args.gallery)
    before = g.num_vectors
    g = g.remove(args.id)
    print(f"removed {before - g.num_vectors} vectors of {len(set(args.id))} identities")
    print(_summary(g))
    return 0


def _table(results: List[Dict[str, Any]], k: int) -> str:
    width = max([5] + [len(r["probe"]) for r in results])
    dw = max([8] + [len(r["decision"] or "-") for r in results])
    lines = [f"{'probe':<{width}}  {'decision':<{dw}}  {'score':>7}  top-{k} (identity score)"]
    for r in results:
        if r.get("error"):
            lines.append(f"{r['probe']:<{width}}  {'-':<{dw}}  {'-':>7}  {r['error']}")
            continue
        score = f"{r['score']:.4f}" if r["score"] is not None else "-"
        top = ", ".join(f"{m['identity']} {m['score']:.3f}" for m in r["matches"])
        lines.append(f"{r['probe']:<{width}}  {r['decision']:<{dw}}  {score:>7}  {top}")
    return "\n".join(lines)


def search(args) -> int:
    from eval.gallery import Gallery
    from sphereface_plus.utils import atomic_write_json

    g = Gallery.open(args.gallery)
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    x, _, names, model, failed = _inputs(args, g.manifest.get("model"), probes=True)
    results = g.search(x, args.top_k, threshold=args.threshold, names=names, model=model)
    if failed:  # every probe keeps its place in the input order
        from eval import gallery_inputs as G

        by_name = {r["probe"]: r for r in results}
        why = dict(failed)
        results = [by_name.get(name) or {"probe": name, "decision": None, "score": None, "matches": [],
                                         "error": why[name]}
                   for name, _, _ in G.list_images(args.images, identities=False)]
    print(_table(results, args.top_k))
    t = args.threshold if args.threshold is not None else g.threshold
    known = sum(r["decision"] not in (None, "unknown") for r in results)
    print(f"{len(results)} probes: {known} identified, {sum(r['decision'] == 'unknown' for r in results)} unknown"
          + (f", {len(failed)} without a face" if failed else "")
          + (f" (threshold {t:.4f})" if t is not None else " (no threshold)"))
    if args.json:
        cal = g.manifest["calibration"]
        atomic_write_json(args.json, {"gallery": str(g.folder), "version": g.manifest["version"],
                                      "index": g.manifest["index"]["kind"], "top_k": args.top_k, "threshold": t,
                                      "threshold_source": "given" if args.threshold is not None else "calibrated",
                                      "fpir": cal.get("fpir"), "results": results})
        print(f"results: {args.json}")
    return 0


def info(args) -> int:
    import json

    from eval.gallery import Gallery, describe_model
    from sphereface_plus.utils import atomic_write_json

    g = Gallery.open(args.gallery)
    data = g.info()
    print(_summary(g))
    model = data["model"]
    print("model: " + (describe_model(model) if model else "not recorded (built from embeddings without --checkpoint)"))
    print(f"vectors per identity: {data['vectors_per_identity']['min']} to {data['vectors_per_identity']['max']}; "
          f"{data['segments']} segment(s), {data['bytes_on_disk'] / 2**20:.1f} MiB on disk; last change: "
          f"{(data['last_write'] or {}).get('summary', '-')} ({data['updated']})")
    print("index settings: " + (json.dumps(data["index"]["params"]) if data["index"]["params"] else "none (exact)"))
    if args.json:
        atomic_write_json(args.json, data)
        print(f"information: {args.json}")
    return 0


def run(args) -> int:
    # input mistakes raise ToolkitErrors: the command line prints them as one 'error:' line, exit 2
    return {"build": build, "add": add, "remove": remove, "search": search, "info": info}[args.action](args)

"""Aligning a whole identity-folder tree (CASIA-WebFace or LFW layout): :func:`align_tree`, the library of
``sphereface-plus align`` (:mod:`sphereface_plus.commands.align`).

For every file under ``--input`` (``<identity>/<image>``) the command finds five landmarks, from a
landmark file (``--landmarks``, sphereface format: ``relative/path`` then x1 y1 ... x5 y5, tab or
space separated, 0-based pixels unless ``--landmark-base 1`` says MATLAB 1-based) or with a detector (``--detector mtcnn|retinaface``), warps the
image to the --template (:mod:`data_prep.geometry`, docs/theory.md#five-point-alignment) and writes the crop to
the same relative path under ``--output`` (extension from ``--format``). It also writes:

- ``<output>/manifest.jsonl``: one JSON object per input, ``{"path", "status", "reason"}``, status
  ``aligned`` | ``skipped`` (no face / no landmarks) | ``failed`` (unreadable file, bad landmark
  line, landmark entry without an image), in path order;
- the training list (``--list``, default ``<output>/list.txt``): ``relative/crop/path label`` for
  every aligned crop, paths relative to ``<output>``, labels 0..C-1 in sorted identity-folder order
  (Python string order; a folder without any aligned crop gets no label, with a warning);
- with ``--pack``: ``<output>/packed.npy`` + ``packed.json`` (:mod:`data_prep.packed`).

Exit status: 0 when every input was aligned, 3 when the run finished but something was skipped or
failed (see the manifest), 2 for a usage error (bad option, missing folder, missing weights).

Resuming: a crop is written to a temporary name and renamed when complete, so a crop that exists
is finished; rerunning the same command keeps finished crops (checked for a complete JPEG/PNG
trailer), removes stray temporary files of an interrupted run and does only the rest. The settings
that change the crops (template, format, quality, landmark source) are recorded in
``<output>/.align_config.json``; resuming with different ones is refused (use a new ``--output``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from data_prep.align_worker import init_worker, process, release_worker
from data_prep.file_tree import output_complete, scan_tree
from data_prep.image_files import IMAGE_EXTENSIONS
from data_prep.landmarks import LandmarkEntry, parse_landmark_file
from sphereface_plus.errors import UsageError  # noqa: F401  (re-exported: data_prep.prepare.UsageError)

logger = logging.getLogger(__name__)

#: CASIA-WebFace identities that also appear in LFW (docs/theory.md#sphereface-recipe); removed by --exclude-lfw-overlap.
LFW_OVERLAP_CASIA = ("0166921", "1056413", "1193098")

MANIFEST = "manifest.jsonl"
CONFIG = ".align_config.json"
JOURNAL = ".align_journal.jsonl"
DEFAULT_LIST = "list.txt"

# a file at the top of --input counts as an input only with an image extension (others, e.g. AT&T's README,
# are ignored with a note); inside identity folders every file is an input and a non-image fails


# ------------------------------------------------------------------------------------ the command
@dataclass
class AlignSummary:
    total: int
    counts: Dict[str, int]
    resumed: int
    seconds: float
    rate: float
    manifest: Path
    list_path: Path
    num_listed: int
    num_classes: int
    pack_index: Optional[Path]
    unused_landmarks: int = 0  # landmark entries naming no image under --input (not failures)
    landmarks_name: str = ""
    ignored: List[str] = None  # non-image files at the top of --input, not inputs

    def __post_init__(self) -> None:
        if self.ignored is None:
            self.ignored = []


def _out_rel(rel: str, ext: str) -> str:
    base, _ = os.path.splitext(rel)
    return base + ext


def _load_journal(path: Path) -> Dict[str, Tuple[str, str]]:
    """path -> (status, reason) from a JSON-lines manifest or journal (bad or cut lines are skipped)."""
    out: Dict[str, Tuple[str, str]] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            obj = json.loads(line)
            out[obj["path"]] = (obj["status"], obj["reason"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the interruption
    return out


def _clean_stray_temps(output: Path) -> int:
    """Remove temporary files (``.<name>.<pid>.tmp``) that an interrupted run left in ``output``."""
    n = 0
    for dirpath, _dirs, files in os.walk(output):
        for f in files:
            if f.startswith(".") and f.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(dirpath, f))
                    n += 1
                except FileNotFoundError:
                    pass
    return n


def align_tree(
    input_dir,
    output_dir,
    landmarks=None,
    template: str = "112x96",
    detector: str = "mtcnn",
    landmark_base: int = 0,
    device: str = "cpu",
    face_policy: str = "center",
    fallback: bool = False,
    workers: int = 0,
    image_format: str = "jpg",
    quality: int = 95,
    list_path=None,
    exclude_lfw_overlap: bool = False,
    pack: bool = False,
) -> AlignSummary:
    """The ``align`` command as a function (see the module docstring). Raises :class:`UsageError`.

    The steps, each a function below: check the arguments; refuse an output folder that holds crops made
    with other settings; open the detector (unless a landmark file is given); list the inputs; prepare
    the output folder; leave out the LFW-overlap identities; read the landmark file; plan the work
    (what earlier runs already did); align; write the manifest and the list file; pack.
    """
    t0 = time.perf_counter()
    inp, out = Path(input_dir), Path(output_dir)
    height, width, workers = _check_align_arguments(inp, out, template, image_format, quality, landmarks,
                                                    landmark_base, workers)
    ext = "." + image_format
    settings = _crop_settings(template, image_format, quality, landmarks, landmark_base, detector, face_policy,
                              fallback)
    _refuse_other_crop_settings(out, settings)
    det_name, det_obj = (None, None) if landmarks is not None else (detector, _open_detector(detector, device))
    files, ignored = _list_inputs(inp, out)
    _prepare_output_folder(out, settings)
    if exclude_lfw_overlap:
        files = _leave_out_lfw_overlap(files, inp)
    inputs = set(files)
    entries, unused = _read_landmark_file(landmarks, inputs, inp, files) if landmarks is not None else ({}, 0)
    records, tasks, resumed = _plan_work(files, out, ext, entries, landmarks is not None, landmark_base, fallback)

    cfg = {
        "input": str(inp), "output": str(out), "template": template, "ext": ext, "quality": int(quality),
        "detector": det_name, "device": device, "policy": face_policy, "fallback": bool(fallback),
        "landmarks_name": Path(landmarks).name if landmarks else "",
    }
    counts, new_seconds = _align_planned(tasks, records, cfg, out, workers, det_obj)
    manifest, lp, listed, classes = _write_manifest_and_list(out, records, inputs, files, ext, list_path)

    pack_index = None
    if pack:
        from data_prep.packed import pack_folder

        pack_index = pack_folder(out, listed, classes, template, height, width, workers=workers)

    n_new = len(tasks)
    return AlignSummary(
        total=len(records), counts=counts, resumed=resumed, seconds=time.perf_counter() - t0,
        rate=n_new / new_seconds if new_seconds > 0 else math.nan, manifest=manifest, list_path=lp,
        num_listed=len(listed), num_classes=len(classes), pack_index=pack_index,
        unused_landmarks=unused, landmarks_name=Path(landmarks).name if landmarks else "", ignored=ignored,
    )


def _check_align_arguments(inp: Path, out: Path, template: str, image_format: str, quality: int, landmarks,
                           landmark_base: int, workers: int) -> Tuple[int, int, int]:
    """Every argument checked before anything is written; returns the template's (height, width) and the
    number of worker processes (0 = all cores)."""
    from data_prep.geometry import template_size

    if not inp.is_dir():
        raise UsageError(f"--input {inp} is not a folder (expected <identity>/<image> folders)")
    if image_format not in ("jpg", "png"):
        raise UsageError(f"--format {image_format!r}: choose jpg or png")
    if not 1 <= int(quality) <= 100:
        raise UsageError(f"--quality {quality}: must be 1..100")
    try:
        height, width = template_size(template)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    inp_real, out_real = os.path.realpath(inp), os.path.realpath(out)
    if out_real == inp_real:
        raise UsageError("--output must differ from --input (the crops would overwrite the originals)")
    if inp_real.startswith(out_real + os.sep):
        raise UsageError(f"--input {inp} lies inside --output {out}; choose an output folder outside the input")
    if landmarks is not None and not Path(landmarks).is_file():
        raise UsageError(f"--landmarks {landmarks} does not exist")
    if landmark_base not in (0, 1):
        raise UsageError(f"--landmark-base {landmark_base}: must be 0 (OpenCV) or 1 (MATLAB)")
    if workers <= 0:
        workers = os.cpu_count() or 1
    return height, width, workers


def _crop_settings(template: str, image_format: str, quality: int, landmarks, landmark_base: int, detector: str,
                   face_policy: str, fallback: bool) -> Dict[str, object]:
    """The settings that determine the crops (stored in the output folder's config file)."""
    return {
        "template": template,
        "format": image_format,
        "quality": int(quality) if image_format == "jpg" else None,
        "source": (f"landmarks:{os.path.realpath(landmarks)}:base{int(landmark_base)}" if landmarks
                   else f"detector:{detector}:{face_policy}"),
        "fallback": bool(fallback),
    }


def _refuse_other_crop_settings(out: Path, settings: Dict[str, object]) -> None:
    """Resuming with different settings would mix two kinds of crops in one folder: refused."""
    cfg_path = out / CONFIG
    if not cfg_path.is_file():
        return
    try:
        prev = json.loads(cfg_path.read_text())
    except ValueError:
        prev = None
    if prev is not None and prev != settings:
        diff = ", ".join(f"{k}: {prev.get(k)!r} -> {v!r}" for k, v in settings.items() if prev.get(k) != v)
        raise UsageError(
            f"{out} holds crops made with other settings ({diff}); use a new --output folder "
            f"(or delete {cfg_path} and the old crops)"
        )


def _open_detector(detector: str, device: str):
    """Create the detector in this process, so that a missing weight file etc. fails early with the
    detector's own message."""
    try:
        from data_prep.detectors import create_detector

        return create_detector(detector, device=device)
    except ImportError as exc:
        raise UsageError(f"detector {detector!r} is not available: {exc}") from None
    except (FileNotFoundError, RuntimeError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot create the {detector} detector: {exc}") from None


def _list_inputs(inp: Path, out: Path) -> Tuple[List[str], List[str]]:
    """``(files, ignored)``: the input files under ``inp`` (relative paths), and the non-image files at the
    top of the tree that are not inputs (AT&T's README, a LICENSE)."""
    files = scan_tree(inp, skip=[out])
    ignored = [f for f in files if "/" not in f and os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS]
    if ignored:
        logger.info("ignoring %d non-image files at the top of %s (not in an identity folder): %s", len(ignored),
                    inp, ", ".join(ignored[:5]) + (", ..." if len(ignored) > 5 else ""))
        files = [f for f in files if f not in set(ignored)]
    if not files:
        raise UsageError(f"no files under --input {inp} (expected <identity>/<image> folders)")
    return files, ignored


def _prepare_output_folder(out: Path, settings: Dict[str, object]) -> None:
    """Create the folder, record the crop settings, remove the temporary files of an interrupted run."""
    from sphereface_plus.utils import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG, settings)
    stray = _clean_stray_temps(out)
    if stray:
        logger.info("removed %d temporary files left by an interrupted run", stray)


def _leave_out_lfw_overlap(files: List[str], inp: Path) -> List[str]:
    """``--exclude-lfw-overlap``: the CASIA-WebFace identities that are also LFW people are left out."""
    excluded = set(LFW_OVERLAP_CASIA)
    present = {f.split("/", 1)[0] for f in files if "/" in f}
    found = sorted(excluded & present)
    n_ex = sum(1 for f in files if f.split("/", 1)[0] in excluded)
    files = [f for f in files if f.split("/", 1)[0] not in excluded]
    logger.info("--exclude-lfw-overlap: left out %d images of %s", n_ex, ", ".join(found) or "no identity (none present)")
    if len(found) < len(excluded):
        logger.warning("--exclude-lfw-overlap: %s not found in %s (is this CASIA-WebFace?)",
                       ", ".join(sorted(excluded - set(found))), inp)
    return files


def _read_landmark_file(landmarks, inputs: set, inp: Path, files: List[str]) -> Tuple[Dict[str, LandmarkEntry], int]:
    """``(entries, unused)``: the landmark file's entries by relative path, and how many name no image under
    ``--input`` (the whole lfw_landmark.txt over a subset: unused, not failures of this run)."""
    entries, problems = parse_landmark_file(landmarks)
    for rel, line, reason in problems:
        logger.warning("%s", reason)
    orphans = [r for r in entries if r not in inputs]
    unused = len(orphans)
    if unused:
        logger.info("%d of %d entries in %s name no image under %s (unused)", unused, len(entries),
                    Path(landmarks).name, inp)
    if entries and len(orphans) == len(entries):
        logger.warning(
            "none of the %d paths in %s names a file under %s: paths must be relative to --input (e.g. %s)",
            len(entries), landmarks, inp, files[0] if files else "Name/Name_0001.jpg",
        )
    return entries, unused


def _plan_work(files: List[str], out: Path, ext: str, entries: Dict[str, LandmarkEntry], from_landmarks: bool,
               landmark_base: int, fallback: bool) -> Tuple[Dict[str, Tuple[str, str]], List[Tuple], int]:
    """``(records, tasks, resumed)``: the manifest entries already known (inputs that cannot work, crops an
    earlier run finished), the ``(rel, out_rel, points, line)`` tasks left to do, and how many were resumed."""
    # what earlier runs said about the crops that are already there (the journal of an interrupted
    # run is newer than the manifest of a finished one)
    journal = _load_journal(out / MANIFEST)
    journal.update(_load_journal(out / JOURNAL))
    records: Dict[str, Tuple[str, str]] = {}  # path -> (status, reason): the manifest
    tasks: List[Tuple] = []
    claimed: Dict[str, str] = {}  # out_rel -> rel, to catch a.jpg + a.png both mapping to a.jpg
    resumed = 0
    out_s = str(out)
    existing: Dict[str, set] = {}  # output folder -> names in it (one listing per folder, not a probe per crop)

    def already_done(out_rel: str) -> bool:
        d, name = os.path.split(out_rel)
        names = existing.get(d)
        if names is None:
            try:
                names = set(os.listdir(os.path.join(out_s, d)))
            except OSError:
                names = set()
            existing[d] = names
        return name in names and output_complete(os.path.join(out_s, out_rel))

    for rel in files:
        if "/" not in rel:
            records[rel] = ("failed", "not inside an identity folder (expected <input>/<identity>/<image>)")
            continue
        out_rel = _out_rel(rel, ext)
        if out_rel in claimed:
            records[rel] = ("failed", f"output name {out_rel} is already used by {claimed[out_rel]}")
            continue
        claimed[out_rel] = rel
        pts, line = None, 0
        if from_landmarks:
            e = entries.get(rel)
            if e is not None and e.points is None:
                records[rel] = ("failed", e.error)
                continue
            if e is not None:
                pts, line = e.points, e.line
                if landmark_base:  # MATLAB 1-based points -> the 0-based convention of align_face
                    pts = tuple(v - landmark_base for v in pts)
            # without an entry the worker still reads the file: an unreadable one is 'failed', a
            # readable one 'skipped' (or aligned with --fallback)
        if (pts is not None or fallback or not from_landmarks) and already_done(out_rel):
            prev = journal.get(rel)
            reason = prev[1] if prev and prev[0] == "aligned" else ""
            if not reason.endswith("done in an earlier run"):
                reason = (reason + "; " if reason else "") + "done in an earlier run"
            records[rel] = ("aligned", reason)
            resumed += 1
            continue
        tasks.append((rel, out_rel, pts, line))
    return records, tasks, resumed


def _align_planned(tasks: List[Tuple], records: Dict[str, Tuple[str, str]], cfg: Dict[str, object], out: Path,
                   workers: int, det_obj) -> Tuple[Dict[str, int], float]:
    """Run the tasks (in worker processes), journal each result as it comes and add it to ``records``;
    returns the status counts and the seconds the new work took."""
    from sphereface_plus.utils import progress

    counts = {"aligned": 0, "skipped": 0, "failed": 0}
    for st, _ in records.values():
        counts[st] += 1
    total = len(records) + len(tasks)
    t_work = time.perf_counter()
    bar = progress(total=total, initial=total - len(tasks), desc="align", unit="img", smoothing=0.05)
    bar.set_postfix(counts, refresh=False)
    with open(out / JOURNAL, "a", encoding="utf-8") as jf:
        last_post = 0.0
        cuda = cfg["detector"] is not None and str(cfg["device"]).startswith("cuda")
        for rel, status, reason in _run_tasks(tasks, cfg, workers, cuda=cuda, detector=det_obj):
            records[rel] = (status, reason)
            counts[status] += 1
            jf.write(json.dumps({"path": rel, "status": status, "reason": reason}) + "\n")
            bar.update(1)
            now = time.perf_counter()
            if now - last_post > 0.5:
                bar.set_postfix(counts, refresh=False)
                jf.flush()
                last_post = now
        bar.set_postfix(counts, refresh=False)
    bar.close()
    new_seconds = time.perf_counter() - t_work
    if hasattr(os, "sync"):
        os.sync()  # make the renamed crops durable before the manifest says they are done
    return counts, new_seconds


def _write_manifest_and_list(out: Path, records: Dict[str, Tuple[str, str]], inputs: set, files: List[str],
                             ext: str, list_path) -> Tuple[Path, Path, List[Tuple[str, int]], List[str]]:
    """The manifest (every input's status), the training list of the aligned crops with their labels (one
    per identity folder that has an aligned image), and the journal's removal; returns
    ``(manifest, list path, listed (crop, label) pairs, class names)``."""
    from sphereface_plus.utils import atomic_write_text

    manifest = out / MANIFEST
    atomic_write_text(
        manifest,
        "".join(json.dumps({"path": p, "status": s, "reason": r}) + "\n" for p, (s, r) in sorted(records.items())),
    )
    aligned = sorted(p for p, (s, _) in records.items() if s == "aligned" and p in inputs)
    classes = sorted({p.split("/", 1)[0] for p in aligned})
    label_of = {c: i for i, c in enumerate(classes)}
    all_ids = sorted({p.split("/", 1)[0] for p in files if "/" in p})
    if len(classes) < len(all_ids):
        logger.warning("%d identity folders have no aligned image and get no label: %s", len(all_ids) - len(classes),
                       ", ".join(sorted(set(all_ids) - set(classes))[:10]))
    listed = [(_out_rel(p, ext), label_of[p.split("/", 1)[0]]) for p in aligned]
    lp = Path(list_path) if list_path else out / DEFAULT_LIST
    atomic_write_text(lp, "".join(f"{r} {lab}\n" for r, lab in listed))
    (out / JOURNAL).unlink(missing_ok=True)  # everything it held is in the manifest now
    return manifest, lp, listed, classes


def _run_tasks(
    tasks: List[Tuple], cfg: Dict[str, object], workers: int, cuda: bool, detector=None
) -> Iterable[Tuple[str, str, str]]:
    """Yield (rel, status, reason) for every task, in completion order.

    ``detector``: an already created detector, reused when the work runs in this process.
    """
    if not tasks:
        return
    if cuda and workers > 1:
        logger.info("detector on %s: one process feeds the GPU (--workers ignored)", cfg["device"])
        workers = 1
    if workers == 1 or len(tasks) < 64:
        init_worker(cfg, detector)
        try:
            for t in tasks:
                yield process(t)
        finally:
            release_worker()
        return
    import multiprocessing as mp

    # fork is cheapest for the landmark path (numpy + cv2 only); a detector holds torch / onnxruntime
    # thread pools that must not be forked, so its workers start fresh
    method = "fork" if cfg["detector"] is None and "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    chunk = max(1, min(64, len(tasks) // (workers * 8)))
    pool = ctx.Pool(workers, initializer=init_worker, initargs=({**cfg, "one_thread": True},))
    try:
        for res in pool.imap_unordered(process, tasks, chunksize=chunk):
            yield res
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()

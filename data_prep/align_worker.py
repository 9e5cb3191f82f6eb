"""One image of ``sphereface-plus align``, in a worker process: read it, find its five points (landmark file,
detector, or the mean face as a fallback), warp it to the template and write the crop atomically.

:func:`init_worker` sets the process's state once (the detector, the encoder settings); :func:`process` aligns
one task and returns ``(path, status, reason)`` for the manifest (:mod:`data_prep.prepare`, which plans the
run and collects the results).
"""
from __future__ import annotations

import os
from typing import Dict, Tuple

import numpy as np

from data_prep.image_files import read_image

__all__ = ["MEAN_LANDMARKS_UNIT", "init_worker", "release_worker", "process"]

#: --fallback landmarks for a W x H image: the mean of lfw_landmark.txt over all 13,233 LFW images,
#: divided by the 250 px image side, scaled to the image. Suits loosely cropped, roughly centred faces
#: (LFW, CASIA-WebFace); every image aligned this way is marked in the manifest.
MEAN_LANDMARKS_UNIT = np.array(
    [
        [104.669, 112.486],
        [145.090, 111.726],
        [124.850, 136.512],
        [107.596, 157.144],
        [143.560, 156.729],
    ]
) / 250.0

_W: Dict[str, object] = {}  # per-process worker state (set by init_worker)


def init_worker(cfg: Dict[str, object], detector: object = None) -> None:
    """This process's state for :func:`process`: ``cfg`` (the run's settings) and the detector named by
    ``cfg["detector"]``, created here, or ``detector``, one already created (the work runs in the caller)."""
    import cv2

    cv2.setNumThreads(1)  # one image per process; OpenCV's own threads would only contend
    _W.clear()
    _W.update(cfg)
    ext = cfg["ext"]
    _W["encode_params"] = [cv2.IMWRITE_JPEG_QUALITY, int(cfg["quality"])] if ext == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    _W["detector_obj"] = detector
    if detector is None and cfg.get("detector"):
        from data_prep.detectors import create_detector

        if cfg.get("one_thread"):  # several worker processes: one thread each, no oversubscription
            import torch

            torch.set_num_threads(1)

        _W["detector_obj"] = create_detector(str(cfg["detector"]), device=str(cfg["device"]))


def release_worker() -> None:
    """Drop the state :func:`init_worker` set (the detector with it)."""
    _W.clear()


def _write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path`` and rename it into place.

    Deliberately without the per-file fsync of ``sphereface_plus.utils.atomic_write_bytes``: on this
    kind of disk an fsync per crop costs ~5 ms, five times the whole alignment. The rename alone
    guarantees that a killed run never leaves a partial crop under its final name; durability
    against power loss is provided by one ``os.sync()`` at the end of the run, and a crop that did
    not survive (empty or without its trailer) is detected and redone on resume.
    """
    d = os.path.dirname(path)
    made = _W.setdefault("made_dirs", set())
    if d not in made:
        os.makedirs(d, exist_ok=True)
        made.add(d)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def process(task: Tuple) -> Tuple[str, str, str]:
    """Align one image. ``task`` = (rel, out_rel, points or None, landmark line or 0)."""
    import cv2

    from data_prep.geometry import align_face

    rel, out_rel, pts, line = task
    src = os.path.join(str(_W["input"]), rel)
    try:
        with open(src, "rb") as fh:
            data = fh.read()
        img, notes = read_image(data)
    except (OSError, ValueError) as exc:
        return rel, "failed", str(exc)
    h, w = img.shape[:2]
    how = ""
    if pts is not None:
        points = np.asarray(pts, dtype=np.float64).reshape(5, 2)
        how = f"{_W['landmarks_name']} line {line}"
        # landmarks for another image size (wrong file, resized images) land far outside the picture
        if np.any(points < -0.5 * np.array([w, h])) or np.any(points > 1.5 * np.array([w, h])):
            return rel, "failed", f"{how}: landmarks lie outside the {w}x{h} image: {points.round(1).tolist()}"
    elif _W.get("detector_obj") is not None:
        from data_prep.detectors import select_face

        try:
            boxes, cand = _W["detector_obj"].detect(img)
        except Exception as exc:  # a detector crash on one image must not stop the run
            return rel, "failed", f"detector error: {type(exc).__name__}: {exc}"
        n = len(boxes)
        if n == 0:
            if not _W["fallback"]:
                return rel, "skipped", f"no face detected ({_W['detector']})"
            points = MEAN_LANDMARKS_UNIT * np.array([w, h])
            how = f"fallback: no face detected ({_W['detector']}), aligned with the mean landmark set"
        else:
            i, _box, points = select_face(boxes, cand, img.shape, policy=str(_W["policy"]))
            how = f"{_W['detector']}: 1 face" if n == 1 else f"{_W['detector']}: {n} faces, kept #{i} ({_W['policy']})"
    elif _W["fallback"]:
        points = MEAN_LANDMARKS_UNIT * np.array([w, h])
        how = f"fallback: no entry in {_W['landmarks_name']}, aligned with the mean landmark set"
    else:
        return rel, "skipped", f"no entry in the landmark file {_W['landmarks_name']}"
    try:
        crop = align_face(img, points, str(_W["template"]))
    except ValueError as exc:
        return rel, "failed", f"cannot align ({how}): {exc}"
    ok, buf = cv2.imencode(str(_W["ext"]), crop, _W["encode_params"])
    if not ok:
        return rel, "failed", f"could not encode the crop as {_W['ext']}"
    try:
        _write_atomic(os.path.join(str(_W["output"]), out_rel), buf.tobytes())
    except OSError as exc:
        return rel, "failed", f"cannot write {out_rel}: {exc}"
    return rel, "aligned", "; ".join([how] + notes) if how else "; ".join(notes)

"""The synthetic identities' faces: cartoon faces drawn with OpenCV, with exact landmarks.

These are NOT real faces (see :mod:`data_prep.synthetic`, which writes them into a data set). What makes an
identity (fixed per identity, drawn from the seed): skin tone, face shape, hair colour and hairline, ear
size, eye spacing / size / height and iris colour, eyebrow shape, nose length and width, mouth position,
width and lip colour, a few moles, glasses or not. What changes per image (nuisance the model must learn to
ignore): in-plane rotation (+-12 degrees), scale (0.85-1.15), translation (+-12 px), a small yaw and pitch,
expression, background colour and clutter, brightness, a lighting gradient and colour cast, blur and
sensor noise. The five landmarks are the drawing coordinates carried through the same similarity warp
that places the face in the image. Same arguments -> the same pixels (numpy's PCG64 streams keyed by
(seed, identity, image)).
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import numpy as np

__all__ = ["CANVAS", "VERSION", "identity_params", "image_params", "render_image", "identity_name", "image_name", "rng"]

CANVAS = 250  # faces are drawn on a 250 x 250 canonical canvas, then warped to image_size
_SHIFT = 4  # cv2 drawing fractional bits: coordinates are drawn with 1/16 px precision
_ONE = 1 << _SHIFT
#: the version of the drawing: part of every random stream's key, so a change of the drawing changes the data
VERSION = 1


# --------------------------------------------------------------------------------------------------
# identity and image parameters
# --------------------------------------------------------------------------------------------------
def rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, VERSION, *keys]))


def identity_params(seed: int, identity: int) -> Dict[str, object]:
    """The fixed appearance of one identity (a plain dict of floats and small arrays)."""
    r = rng(seed, 1, identity)
    light = r.uniform(0.35, 1.0)
    skin = np.array([r.uniform(0.55, 0.8), r.uniform(0.7, 0.9), 1.0]) * (90 + 150 * light)
    skin += r.normal(0, 6, 3)
    hair_dark = r.uniform(0.1, 1.0)
    hair = np.clip(np.array([r.uniform(0.3, 0.7), r.uniform(0.5, 0.9), 1.0]) * 200 * hair_dark ** 1.5 + 10, 0, 255)
    return {
        "skin": np.clip(skin, 30, 235),
        "hair": hair,
        "face_w": r.uniform(50, 68),  # half axes of the face ellipse
        "face_h": r.uniform(70, 88),
        "hairline": r.uniform(0.35, 0.75),  # how far the fringe comes down (fraction of forehead)
        "hair_volume": r.uniform(4, 18),
        "ear": r.uniform(8, 15),
        "eye_dx": r.uniform(17, 27),  # half distance between pupils
        "eye_y": r.uniform(-24, -10),  # relative to the face centre
        "eye_rx": r.uniform(7, 11),
        "eye_ry": r.uniform(3.8, 6.0),
        "iris": r.uniform(20, 200, 3),
        "brow_gap": r.uniform(8, 15),
        "brow_len": r.uniform(9, 15),
        "brow_thick": r.uniform(2.0, 5.0),
        "brow_tilt": r.uniform(-4, 4),
        "nose_y": r.uniform(8, 20),  # tip below the eye line: eye_y + ... is computed at draw time
        "nose_w": r.uniform(5, 11),
        "mouth_y": r.uniform(16, 28),  # below the nose tip
        "mouth_w": r.uniform(13, 23),
        "lip_u": r.uniform(2.0, 5.0),
        "lip_l": r.uniform(3.0, 7.0),
        "lip": np.clip(np.array([r.uniform(60, 120), r.uniform(50, 100), r.uniform(120, 210)]), 0, 255),
        "moles": r.uniform([-0.8, -0.6, 1.2], [0.8, 0.8, 2.6], size=(int(r.integers(0, 4)), 3)),
        "glasses": bool(r.random() < 0.25),
        "glasses_color": r.uniform(0, 120, 3),
    }


def image_params(seed: int, identity: int, index: int) -> Dict[str, object]:
    """The nuisance of one image (pose, expression, background, lighting, noise)."""
    r = rng(seed, 2, identity, index)
    return {
        "angle": r.uniform(-12, 12),
        "scale": r.uniform(0.85, 1.15),
        "shift": r.uniform(-12, 12, 2),
        "yaw": r.uniform(-1, 1),
        "pitch": r.uniform(-1, 1),
        "smile": r.uniform(-1.5, 4.0),
        "mouth_open": r.uniform(0, 1) ** 3 * 4,
        "mouth_scale": r.uniform(0.92, 1.08),
        "brow_raise": r.uniform(-2, 3),
        "jitter": r.normal(0, 0.6, (5, 2)),
        "bg": r.uniform(20, 235, 3),
        "bg_grad": r.uniform(-60, 60, 3),
        "clutter": [
            (r.uniform(0, CANVAS, 2), r.uniform(10, 60), r.uniform(0, 255, 3)) for _ in range(int(r.integers(0, 5)))
        ],
        "gain": r.uniform(0.7, 1.25),
        "light_dir": r.uniform(0, 2 * np.pi),
        "light_amp": r.uniform(0, 0.35),
        "cast": r.uniform(0.9, 1.1, 3),
        "blur": float(r.choice([0.0, 0.0, 0.0, 0.8, 1.4])),
        "noise": r.uniform(1.0, 7.0),
        "quality": int(r.integers(75, 96)),
        "noise_seed": int(r.integers(0, 2**31 - 1)),
    }


# --------------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------------
def _p(x: float, y: float) -> Tuple[int, int]:
    return int(round(x * _ONE)), int(round(y * _ONE))


def _ax(a: float, b: float) -> Tuple[int, int]:
    return max(1, int(round(a * _ONE))), max(1, int(round(b * _ONE)))


def _col(c) -> Tuple[float, float, float]:
    return tuple(float(v) for v in np.clip(c, 0, 255))


def _highlight(skin: np.ndarray) -> np.ndarray:
    """Colour of the nose-tip highlight: halfway from the skin to white."""
    return skin + (255.0 - skin) * 0.5


def _draw_canonical(idp: Dict, imp: Dict) -> Tuple[np.ndarray, np.ndarray]:
    """Draw the face upright on the canonical canvas; return (BGR uint8 image, 5 x 2 landmarks)."""
    import cv2

    aa = cv2.LINE_AA
    S = CANVAS
    # background: colour + linear gradient + a few blobs of clutter
    ramp = np.linspace(-0.5, 0.5, S, dtype=np.float32)
    bg = imp["bg"].astype(np.float32)[None, None, :] + ramp[:, None, None] * imp["bg_grad"].astype(np.float32)
    img = cv2.resize(np.clip(bg, 0, 255).astype(np.uint8), (S, S), interpolation=cv2.INTER_NEAREST)
    for (c, rad, col) in imp["clutter"]:
        cv2.circle(img, _p(*c), int(rad * _ONE), _col(col), -1, aa, _SHIFT)

    cx, cy = S / 2.0, S / 2.0 + 8
    fw, fh = idp["face_w"], idp["face_h"]
    yaw, pitch = imp["yaw"], imp["pitch"]
    skin, hair = idp["skin"], idp["hair"]
    # hair mass behind the head, ears, face
    hv = idp["hair_volume"]
    cv2.ellipse(img, _p(cx, cy - 12), _ax(fw + hv, fh + hv * 0.6), 0, 180, 360, _col(hair), -1, aa, _SHIFT)
    for side in (-1, 1):
        ex = cx + side * (fw - 2) + yaw * 2
        cv2.ellipse(img, _p(ex, cy - 2), _ax(idp["ear"] * 0.6, idp["ear"]), 0, 0, 360, _col(skin * 0.85), -1, aa, _SHIFT)
    cv2.ellipse(img, _p(cx + yaw * 2, cy), _ax(fw, fh), 0, 0, 360, _col(skin), -1, aa, _SHIFT)
    # fringe: the top of the face covered down to the hairline
    top = cy - fh
    line = top + idp["hairline"] * (fh + idp["eye_y"] - idp["brow_gap"] - 4)
    cv2.ellipse(img, _p(cx + yaw * 2, line), _ax(fw + 1, line - top + 1), 0, 180, 360, _col(hair), -1, aa, _SHIFT)

    # inner features move with yaw (sideways) and pitch (up/down); the nose tip moves most
    fx, fy = cx + yaw * 7, cy + pitch * 5
    jit = imp["jitter"]
    eye_y = fy + idp["eye_y"]
    le = np.array([fx - idp["eye_dx"], eye_y]) + jit[0]
    re = np.array([fx + idp["eye_dx"], eye_y]) + jit[1]
    nose = np.array([fx + yaw * 5, eye_y + idp["nose_y"] + 6]) + jit[2]
    mw = idp["mouth_w"] * imp["mouth_scale"]
    mouth_y = nose[1] + idp["mouth_y"]
    lm_ = np.array([fx - mw + yaw * 2, mouth_y - imp["smile"]]) + jit[3]
    rm_ = np.array([fx + mw + yaw * 2, mouth_y - imp["smile"]]) + jit[4]

    # moles (identity marks) in face-relative coordinates, under the features drawn next
    for mx, my, mr in idp["moles"]:
        cv2.circle(img, _p(fx + mx * fw * 0.8, cy + my * fh * 0.7), int(mr * _ONE), _col(skin * 0.45), -1, aa, _SHIFT)

    # eyes: sclera, iris, pupil (the landmark is the pupil centre)
    rx, ry = idp["eye_rx"], idp["eye_ry"]
    for k, e in enumerate((le, re)):
        cv2.ellipse(img, _p(*e), _ax(rx, ry), 0, 0, 360, (235, 240, 245), -1, aa, _SHIFT)
        cv2.circle(img, _p(*e), int(ry * 0.95 * _ONE), _col(idp["iris"]), -1, aa, _SHIFT)
        cv2.circle(img, _p(*e), int(ry * 0.55 * _ONE), (15, 15, 15), -1, aa, _SHIFT)
        side = -1 if k == 0 else 1
        b0 = e + np.array([-side * idp["brow_len"] * 0.6, -idp["brow_gap"] - imp["brow_raise"]])
        b1 = e + np.array([side * idp["brow_len"], -idp["brow_gap"] - imp["brow_raise"] - idp["brow_tilt"]])
        cv2.line(img, _p(*b0), _p(*b1), _col(hair * 0.7), max(1, int(round(idp["brow_thick"]))), aa, _SHIFT)
    if idp["glasses"]:
        gc = _col(idp["glasses_color"])
        for e in (le, re):
            cv2.ellipse(img, _p(*e), _ax(rx + 5, ry + 6), 0, 0, 360, gc, 2, aa, _SHIFT)
        cv2.line(img, _p(le[0] + rx + 5, le[1]), _p(re[0] - rx - 5, re[1]), gc, 2, aa, _SHIFT)

    # nose: a shaded ridge down to the tip, nostrils beside it
    shade = _col(skin * 0.72)
    ridge_top = np.array([(le[0] + re[0]) / 2, eye_y + 2])
    cv2.line(img, _p(*ridge_top), _p(*nose), shade, 2, aa, _SHIFT)
    nw = idp["nose_w"]
    for side in (-1, 1):
        cv2.ellipse(img, _p(nose[0] + side * nw * 0.6, nose[1] + 2.5), _ax(nw * 0.35, 2.0), 0, 0, 360, shade, -1, aa, _SHIFT)
    cv2.circle(img, _p(*nose), int(2.5 * _ONE), _col(_highlight(skin)), -1, aa, _SHIFT)  # the tip catches the light

    # mouth: lips between the two corners, opening for some images
    t = np.linspace(0, 1, 17)
    base = lm_[None, :] * (1 - t)[:, None] + rm_[None, :] * t[:, None]
    bow = np.sin(np.pi * t)
    smile_curve = imp["smile"] * bow  # corners fixed, the middle sags by the smile
    opening = imp["mouth_open"] * bow
    upper = np.c_[base[:, 0], base[:, 1] + smile_curve - idp["lip_u"] * bow]
    mid_u = np.c_[base[:, 0], base[:, 1] + smile_curve]
    mid_l = np.c_[base[:, 0], base[:, 1] + smile_curve + opening]
    lower = np.c_[base[:, 0], base[:, 1] + smile_curve + opening + idp["lip_l"] * bow]
    lip = _col(idp["lip"])
    to_i = lambda a: np.round(a * _ONE).astype(np.int32)  # noqa: E731
    cv2.fillPoly(img, [to_i(np.vstack([upper, mid_u[::-1]]))], lip, aa, _SHIFT)
    cv2.fillPoly(img, [to_i(np.vstack([mid_l, lower[::-1]]))], lip, aa, _SHIFT)
    if imp["mouth_open"] > 0.3:
        cv2.fillPoly(img, [to_i(np.vstack([mid_u, mid_l[::-1]]))], (40, 30, 60), aa, _SHIFT)
    # the dark line between the lips runs exactly from corner to corner
    cv2.polylines(img, [to_i(mid_u)], False, _col(idp["lip"] * 0.5), 2, aa, _SHIFT)


    landmarks = np.stack([le, re, nose, lm_, rm_]).astype(np.float64)
    return img, landmarks


def render_image(idp: Dict, imp: Dict, image_size: int = 250) -> Tuple[np.ndarray, np.ndarray]:
    """Render one image: ``(BGR uint8 image_size x image_size x 3, 5 x 2 float64 landmarks)``.

    The canonical drawing is placed with one similarity (rotation about the face centre, scale,
    translation, resize to ``image_size``); the landmarks go through the same matrix, so they are
    exact up to the drawing's 1/16 px quantisation. Lighting, blur and noise are photometric only.
    """
    import cv2

    canon, lm = _draw_canonical(idp, imp)
    k = image_size / CANVAS
    m = cv2.getRotationMatrix2D((CANVAS / 2.0, CANVAS / 2.0 + 8), float(imp["angle"]), float(imp["scale"]))
    m[:, 2] += imp["shift"]
    m = m * k  # resize to the output size (both linear part and translation)
    img = cv2.warpAffine(canon, m, (image_size, image_size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    landmarks = lm @ m[:, :2].T + m[:, 2]

    # photometric: directional light * gain * colour cast, blur, noise
    s = image_size
    ramp = np.linspace(-0.5, 0.5, s, dtype=np.float32)
    d = imp["light_dir"]
    field = 1.0 + np.float32(imp["light_amp"]) * (np.float32(math.cos(d)) * ramp[None, :] + np.float32(math.sin(d)) * ramp[:, None])
    gain = (imp["gain"] * imp["cast"]).astype(np.float32)
    out = cv2.multiply(img, cv2.merge([field * gain[0], field * gain[1], field * gain[2]]), dtype=cv2.CV_32F)
    if imp["blur"] > 0:
        out = cv2.GaussianBlur(out, (0, 0), imp["blur"])
    # Sensor noise: a window of a fixed bank of Gaussian noise at an image-specific offset (drawing
    # fresh normals per image was the slowest step); still deterministic per image.
    bank = _noise_bank(s)
    nr = np.random.default_rng(imp["noise_seed"])
    oy, ox = (int(v) for v in nr.integers(0, bank.shape[0] - s + 1, size=2))
    out = cv2.scaleAdd(np.ascontiguousarray(bank[oy : oy + s, ox : ox + s]), float(imp["noise"]), out)
    return cv2.add(out, 0.0, dtype=cv2.CV_8U), landmarks  # saturating round to uint8


_NOISE_BANKS: Dict[int, np.ndarray] = {}


def _noise_bank(size: int) -> np.ndarray:
    """A per-process cache of standard-normal float32 noise, big enough for ``size`` windows."""
    n = max(512, 2 * size)
    bank = _NOISE_BANKS.get(n)
    if bank is None:
        bank = np.random.default_rng(20240521).standard_normal((n, n, 3), dtype=np.float32)
        _NOISE_BANKS[n] = bank
    return bank


def identity_name(identity: int, num_identities: int) -> str:
    return f"id_{identity:0{max(4, len(str(num_identities - 1)))}d}"


def image_name(name: str, index: int) -> str:
    """Relative path of image ``index`` (0-based) of identity ``name``: ``name/name_NNNN.jpg``, 1-based."""
    return f"{name}/{name}_{index + 1:04d}.jpg"

"""What the pixel limit costs a decode: ``data_prep.image_files.decode_image`` (the header read and checked,
OpenCV's and the C libraries' messages kept out of the output) against a bare ``cv2.imdecode``.

    PYTHONPATH=. python bench/image_header_check.py [--rounds 9] [--repeat 400]

One process decodes the same 112x96 aligned crop (JPEG quality 95, PNG) and a 1280x960 photo (JPEG), each way,
in alternating rounds timed in CPU seconds of this thread (``time.thread_time``: other jobs on a shared machine
barely move it; one OpenCV thread, as the training workers run); the ratio is decode_image's best round /
cv2.imdecode's best round for that image. Writes ``bench/results/image_header_check.md``
(docs/fuzzing.md#image-pixel-limit).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import RESULTS, load_average, machine, ratios, write_report  # noqa: E402
from data_prep.image_files import check_image_header, decode_image  # noqa: E402


def images():
    from data_prep import align_face
    from data_prep.synthetic import identity_params, image_params, render_image

    photo, points = render_image(identity_params(7, 0), image_params(7, 0, 1), 250)
    crop = align_face(photo, np.asarray(points, np.float64).reshape(5, 2), template="112x96")
    big = cv2.resize(photo, (1280, 960), interpolation=cv2.INTER_CUBIC)
    return {"112x96 JPEG": cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(),
            "112x96 PNG": cv2.imencode(".png", crop)[1].tobytes(),
            "1280x960 JPEG": cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()}


def thread_time_rounds(variants, rounds: int, repeat: int):
    """CPU seconds of this thread per call of each variant, in alternating rounds (after one warm-up call each)."""
    for fn in variants.values():
        fn()
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.thread_time()
            for _ in range(repeat):
                fn()
            times[name].append((time.thread_time() - t0) / repeat)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--repeat", type=int, default=400)
    args = p.parse_args()
    cv2.setNumThreads(1)
    load_before = load_average()
    lines = ["# The pixel limit's cost per decode", "",
             f"`python bench/image_header_check.py --rounds {args.rounds} --repeat {args.repeat}`: best of "
             f"{args.rounds} alternating rounds of {args.repeat} decodes (1/20 of them for the photo), CPU time of "
             "the thread, one OpenCV thread; ratio = `decode_image` / `cv2.imdecode` (> 1: slower).", "",
             "| image | cv2.imdecode | decode_image | ratio |", "| --- | ---: | ---: | ---: |"]
    for name, data in images().items():
        buf = np.frombuffer(data, np.uint8)
        repeat = args.repeat if "112" in name else max(1, args.repeat // 20)
        times = thread_time_rounds({"cv2.imdecode": lambda: cv2.imdecode(buf, cv2.IMREAD_COLOR),
                                    "decode_image": lambda: decode_image(data)}, args.rounds, repeat)
        r = ratios(times, "cv2.imdecode")
        lines.append(f"| {name} ({len(data)} bytes) | {r['cv2.imdecode']['best_s'] * 1e6:.0f} us | "
                     f"{r['decode_image']['best_s'] * 1e6:.0f} us | {r['decode_image']['ratio']:.3f} |")
    try:  # the training reader's JPEG path: simplejpeg, with only the header check in front
        import simplejpeg

        from data_prep.jpeg import decode_bgr

        data = images()["112x96 JPEG"]
        times = thread_time_rounds({"simplejpeg": lambda: simplejpeg.decode_jpeg(data, colorspace="BGR", fastdct=False,
                                                                                fastupsample=False),
                                    "decode_bgr": lambda: decode_bgr(data, "simplejpeg")}, args.rounds, args.repeat)
        r = ratios(times, "simplejpeg")
        lines.append(f"| 112x96 JPEG, training reader: simplejpeg.decode_jpeg vs data_prep.jpeg.decode_bgr | "
                     f"{r['simplejpeg']['best_s'] * 1e6:.0f} us | {r['decode_bgr']['best_s'] * 1e6:.0f} us | "
                     f"{r['decode_bgr']['ratio']:.3f} |")
    except ImportError:
        pass
    header = thread_time_rounds({"check_image_header": lambda: check_image_header(data)}, args.rounds,
                                args.repeat * 10)["check_image_header"]
    lines += ["", f"The header check alone (`check_image_header` of the 112x96 JPEG): {min(header) * 1e6:.1f} us. The "
              "rest of `decode_image`'s difference is the four system calls that point stderr at /dev/null for the "
              "decode; the rest of `decode_bgr`'s is older (the decoder choice and the end-of-image check).",
              "", f"Machine: {machine()}; load average before {load_before}, after {load_average()}."]
    write_report(RESULTS / "image_header_check.md", lines)


if __name__ == "__main__":
    main()

"""The hardest errors of a verification run, to look at: the false accepts and false rejects scored
furthest on the wrong side of their fold's threshold, drawn as image pairs (``verify --report-dir``).

A pair's *wrongness* (:func:`eval.protocols.pair_outcomes`, docs/theory.md#hardest-errors) is the
distance from its test score to its fold's threshold, signed so that it is positive on the wrong side:
for a different pair that was accepted, how far its similarity lies above the threshold (or its
distance below); for a same pair that was rejected, how far below (above). The ``k`` largest of each
kind are the pairs the model got most wrong, not the ones that happened to sit at the threshold.

The grid (PNG, matplotlib's Agg canvas: no display needed) has one column per kind, one row per rank;
each cell shows the two crops as the network saw them (aligned, before its own normalisation) side by
side, with the score, the threshold, the fold and both image names.
"""
from __future__ import annotations

import io
import logging
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from sphereface_plus.utils import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "hardest_errors", "draw_error_grid", "errors_markdown"]

#: the two kinds of error, as (key, title, label of the pairs)
KINDS = (("false_accepts", "false accepts", False), ("false_rejects", "false rejects", True))


def hardest_errors(outcomes: Mapping[str, np.ndarray], k: int) -> Dict[str, np.ndarray]:
    """``{'false_accepts': idx, 'false_rejects': idx}``: the indices of the ``k`` errors of each kind with
    the largest wrongness, hardest first (ties: the earlier pair first)."""
    out = {}
    for key, _, same in KINDS:
        idx = np.flatnonzero(outcomes["error"] & (outcomes["issame"] == same))
        order = np.argsort(-outcomes["wrongness"][idx], kind="stable")
        out[key] = idx[order[:max(int(k), 0)]]
    return out


def _caption(i: int, outcomes: Mapping[str, np.ndarray], names: Sequence[str], unit: str) -> str:
    return (f"{unit} {outcomes['score'][i]:.4f} (threshold {outcomes['threshold'][i]:.4f}, fold "
            f"{int(outcomes['fold'][i]) + 1})\n{names[0]}\n{names[1]}")


def draw_error_grid(path, picked: Mapping[str, np.ndarray], outcomes: Mapping[str, np.ndarray],
                    pair_names: Callable[[int], Sequence[str]], crops: Callable[[int], Sequence[np.ndarray]],
                    unit: str = "cosine", title: str = "hardest errors") -> None:
    """Write the grid of ``picked`` (:func:`hardest_errors`) to the PNG ``path`` (atomically).
    ``pair_names(i)`` / ``crops(i)``: the two image names / BGR uint8 crops of pair ``i``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = max(1, max(len(v) for v in picked.values()))
    fig = Figure(figsize=(2 * 3.4, 0.6 + rows * 2.1), dpi=100)
    FigureCanvasAgg(fig)
    for col, (key, name, _) in enumerate(KINDS):
        idx = picked[key]
        for r in range(rows):
            ax = fig.add_subplot(rows, 2, r * 2 + col + 1)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(f"{name} ({len(idx)} shown)\n", fontsize=9, fontweight="bold")
            if r >= len(idx):
                if r == 0:
                    ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=9)
                continue
            i = int(idx[r])
            a, b = crops(i)
            gap = np.full((a.shape[0], 4, 3), 255, np.uint8)
            ax.imshow(np.concatenate([a, gap, b], axis=1)[:, :, ::-1])  # BGR -> RGB for display
            ax.text(0.5, -0.02, _caption(i, outcomes, pair_names(i), unit), transform=ax.transAxes, ha="center",
                    va="top", fontsize=6.5)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def errors_markdown(picked: Mapping[str, np.ndarray], outcomes: Mapping[str, np.ndarray],
                    pair_names: Callable[[int], Sequence[str]], unit: str, image: Optional[str]) -> List[str]:
    """The report.md section: the grid ``image`` (None: no images, say so) and, per kind, a table of the
    pairs it shows."""
    k = max(len(v) for v in picked.values())
    lines = ["## Hardest errors", "",
             f"The {k} false accepts and false rejects of the test folds scored furthest on the wrong side of their "
             f"fold's threshold (docs/theory.md#hardest-errors).", ""]
    lines += [f"![hardest errors]({image})" if image else
              "No image grid: the features came from --features without --root (give --root to see the pairs).", ""]
    for key, name, same in KINDS:
        idx = picked[key]
        errors = int((outcomes["error"] & (outcomes["issame"] == same)).sum())
        lines += [f"### {name.capitalize()} ({errors} in all, {len(idx)} shown)", ""]
        if not len(idx):
            lines += ["None.", ""]
            continue
        lines += [f"| rank | image 1 | image 2 | fold | {unit} | threshold |",
                  "| ---: | --- | --- | ---: | ---: | ---: |"]
        for r, i in enumerate(idx, 1):
            a, b = pair_names(int(i))
            lines.append(f"| {r} | `{a}` | `{b}` | {int(outcomes['fold'][i]) + 1} | {outcomes['score'][i]:.4f} | "
                         f"{outcomes['threshold'][i]:.4f} |")
        lines.append("")
    return lines

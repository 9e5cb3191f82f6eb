"""Verification reports: a JSON file, a ROC plot (PNG, matplotlib Agg), the text table and report.md.

All files are written atomically (temporary file + ``os.replace``), so an interrupted run never
leaves a truncated report.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from sphereface_plus.utils import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)


def write_json_report(report: Mapping[str, object], path, include_roc: bool = True) -> None:
    """Write the report dict as JSON (the ROC points under ``roc`` unless ``include_roc=False``)."""
    obj = dict(report)
    if not include_roc:
        obj.pop("roc", None)
    atomic_write_json(path, obj)


def plot_roc(curves: Mapping[str, Mapping[str, object]], path, title: str = "ROC",
             xlim: Tuple[float, float] = (1e-4, 1.0)) -> None:
    """Plot ``{label: report}`` ROC curves (log-scale FAR over ``xlim``) to a PNG at ``path``."""
    # the Agg canvas on a bare Figure: no pyplot, no global backend switch, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, rep in curves.items():
        roc = rep.get("roc")
        if not roc:
            raise ValueError(f"report {label!r} has no ROC points (compute it with roc_points=True)")
        fpr = [max(f, min(xlim[0], 1e-6)) for f in roc["fpr"]]
        acc = f"acc {100 * rep['mean_accuracy']:.2f}%, " if "mean_accuracy" in rep else ""
        text = f"{label} ({acc}AUC {rep['auc']:.4f})"
        ax.plot(fpr, roc["tpr"], label=text)
    ax.set_xscale("log")
    ax.set_xlim(*xlim)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def write_report(report: Mapping[str, object], out_dir, name: str = "verification", label: Optional[str] = None) -> Dict[str, Path]:
    """Write ``out_dir/<name>.json`` and ``out_dir/<name>_roc.png``; returns both paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / f"{name}.json", "plot": out_dir / f"{name}_roc.png"}
    write_json_report(report, paths["json"])
    plot_roc({label or name: report}, paths["plot"], title=name)
    return paths


def format_report(report: Mapping[str, object]) -> str:
    """The report as a short text table: its protocol, fold accuracies in percent, then the summary
    (with VAL@FAR under the insightface protocol, and the oracle-threshold accuracy, labelled)."""
    accs = report["fold_accuracies"]
    lines = []
    if report.get("protocol"):
        from eval.protocols import COMPARABLE_TO

        what = COMPARABLE_TO.get(str(report["protocol"]), "")
        lines.append(f"protocol: {report['protocol']}" + (f" (comparable to {what})" if what else ""))
    unit = "distance" if report.get("protocol") == "insightface" else "threshold"
    lines.append(f"fold  accuracy  {unit:>9}")
    for i, (a, t) in enumerate(zip(accs, report.get("fold_thresholds", [float("nan")] * len(accs))), 1):
        lines.append(f"{i:>4}  {100 * a:7.2f}%  {t:9.4f}")
    lines.append(f"mean  {100 * report['mean_accuracy']:7.2f}% +- {100 * report['std_accuracy']:.2f}"
                 + ("" if report.get("mean_sub", True) or report.get("protocol") == "insightface"
                    else "  (no mean subtraction)"))
    lines.append(f"EER {100 * report['eer']:.2f}%   AUC {report['auc']:.5f}   threshold {report['threshold']:.4f}")
    lines.append("TAR@FAR " + "   ".join(f"{k}: {100 * v:.2f}%" for k, v in report["tar_at_far"].items()))
    val = report.get("val_at_far")
    if val:
        lines.append(f"VAL@FAR={val['far_target']:g} (insightface): {100 * val['val']:.2f}% +- {100 * val['val_std']:.2f}"
                     f", FAR reached {100 * val['far']:.3f}%")
    if report.get("oracle_accuracy") is not None:
        from eval.protocols import ORACLE_LABEL

        lines.append(f"{100 * report['oracle_accuracy']:.2f}%: {ORACLE_LABEL}")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def fold_table_markdown(report: Mapping[str, object]) -> List[str]:
    """The fold accuracies and thresholds as a markdown table, the mean (± population std) last."""
    unit = "distance" if report.get("protocol") == "insightface" else "threshold"
    lines = [f"| fold | accuracy | {unit} |", "| ---: | ---: | ---: |"]
    for i, (a, t) in enumerate(zip(report["fold_accuracies"], report["fold_thresholds"]), 1):
        lines.append(f"| {i} | {_pct(a)} | {t:.4f} |")
    lines.append(f"| **mean** | **{_pct(report['mean_accuracy'])} ± {_pct(report['std_accuracy'])}** | "
                 f"{report['threshold']:.4f} |")
    return lines


def verification_markdown(report: Mapping[str, object], title: str, command: str, roc_image: Optional[str] = None,
                          extra: Sequence[str] = ()) -> str:
    """``report.md`` of a verification run: what ran, the fold table, the summary, the ROC plot, then
    ``extra`` lines (the hardest errors, :mod:`eval.hard_errors`)."""
    from eval.protocols import COMPARABLE_TO, ORACLE_LABEL

    protocol = str(report.get("protocol", "sphereface"))
    lines = [f"# {title}", "", f"Command: `{command}`", "",
             f"- model / features: `{report.get('source')}`",
             f"- {report['num_pairs']} pairs ({report['num_positive']} same) in {report['num_folds']} folds",
             f"- protocol: {protocol} (comparable to {COMPARABLE_TO.get(protocol, 'its own numbers only')})", "",
             "## Accuracy", ""]
    lines += fold_table_markdown(report)
    lines += ["", f"- EER {_pct(report['eer'])}, AUC {report['auc']:.5f}, "
              + ", ".join(f"TAR@FAR={k} {_pct(v)}" for k, v in report["tar_at_far"].items())]
    val = report.get("val_at_far")
    if val:
        lines.append(f"- VAL@FAR={val['far_target']:g} (insightface) {_pct(val['val'])} ± {_pct(val['val_std'])}")
    if report.get("oracle_accuracy") is not None:
        lines.append(f"- {_pct(report['oracle_accuracy'])}: {ORACLE_LABEL}")
    if roc_image:
        lines += ["", f"![ROC]({roc_image})"]
    lines.append("")
    return "\n".join(lines + list(extra)) + "\n"

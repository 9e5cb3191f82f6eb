"""One metrics logger for every trainer: running means, ``metrics.jsonl``, TensorBoard, progress bar.

A trainer adds the quantities of each step to a :class:`RunningMeans` window (values may be 0-dim
tensors: they are summed on their device, so logging costs no host sync per step) and, every so
often, logs one row::

    logger = MetricsLogger(out_dir, jsonl="metrics.jsonl", tb_prefix="train", bar=bar)
    window = RunningMeans()
    for it in range(start, total):
        ...
        window.add(loss=loss.detach(), acc=acc)             # weight=batch size for weighted means
        if (it + 1) % log_every == 0:
            logger.log(it + 1, **window.means(), lr=lr)     # JSONL line + TensorBoard + bar postfix
            window.reset()
    logger.close()

Only rank 0 writes (``enabled`` defaults to :func:`sphereface_plus.utils.is_rank0`); the means of a
window are all-reduced over the processes when asked (``means(distributed=True)``), so every rank
calls the same methods. On resume, ``resume_iteration=k`` keeps the rows of ``metrics.jsonl`` up to
iteration ``k`` (the checkpoint's) and drops any written after it, so a resumed run's file equals the
uninterrupted run's; a fresh run (``None``) starts the file empty.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from sphereface_plus.engine.dist import all_reduce_sum
from sphereface_plus.utils import atomic_write_text, is_rank0

logger = logging.getLogger(__name__)

__all__ = ["RunningMeans", "MetricsLogger", "open_tensorboard", "read_jsonl"]


def _number(v: Any) -> float:
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


class RunningMeans:
    """Weighted running means of named scalars since the last :meth:`reset`.

    ``add(weight, **values)`` adds ``weight * value`` to each sum and ``weight`` to the total; values
    may be Python numbers or 0-dim tensors (kept on their device in float64 until :meth:`means`).
    A quantity missing from some ``add`` calls is averaged over the calls that had it.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: Dict[str, Any] = {}
        self._weights: Dict[str, float] = {}
        self.count = 0  # add() calls since the reset (steps, for rates)

    def add(self, weight: float = 1.0, **values: Any) -> None:
        w = float(weight)
        for k, v in values.items():
            term = v.detach().double() * w if isinstance(v, torch.Tensor) else float(v) * w
            self._sums[k] = self._sums[k] + term if k in self._sums else term
            self._weights[k] = self._weights.get(k, 0.0) + w
        self.count += 1

    def means(self, distributed: bool = False) -> Dict[str, float]:
        """The means as floats (``nan`` for an empty window); summed over processes when ``distributed``."""
        keys = list(self._sums)
        if not keys:
            return {}
        if distributed:
            dev = next((v.device for v in self._sums.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
            sums = torch.stack([torch.as_tensor(self._sums[k], dtype=torch.float64, device=dev) for k in keys])
            weights = torch.tensor([self._weights[k] for k in keys], dtype=torch.float64, device=dev)
            packed = all_reduce_sum(torch.cat([sums, weights]))
            s, w = packed[: len(keys)].tolist(), packed[len(keys):].tolist()
        else:
            s, w = [_number(self._sums[k]) for k in keys], [self._weights[k] for k in keys]
        return {k: (a / b if b else math.nan) for k, a, b in zip(keys, s, w)}

    def state_dict(self) -> Dict[str, Any]:
        """Plain numbers (checkpoint-safe): a resumed run continues the same window."""
        return {"sums": {k: _number(v) for k, v in self._sums.items()}, "weights": dict(self._weights),
                "count": self.count}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.reset()
        self._sums = {k: float(v) for k, v in state["sums"].items()}
        self._weights = {k: float(v) for k, v in state["weights"].items()}
        self.count = int(state["count"])


def open_tensorboard(folder, purge_step: Optional[int] = None):
    """A ``SummaryWriter`` on ``folder`` (None when tensorboard is not importable: training goes on).

    ``purge_step``: on resume, events at and after this step written by the interrupted run are hidden.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
        logger.warning("tensorboard is not importable: no TensorBoard scalars")
        return None
    return SummaryWriter(str(folder), purge_step=purge_step if purge_step else None)


def read_jsonl(path) -> List[Dict[str, Any]]:
    """The rows of a JSONL file (missing file: no rows)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


class MetricsLogger:
    """Writes logged rows to a JSONL file, an optional readable text file, TensorBoard and a progress bar.

    Args:
        out_dir: the run folder; files are relative to it.
        jsonl: name of the JSONL file (one ``{"iteration": ..., **scalars}`` object per :meth:`log`), or None.
        text: name of a readable log (one ``text_format(row)`` line per row, after ``text_header``), or None.
        writer: a TensorBoard writer (:func:`open_tensorboard`), shared between loggers of one run, or None.
        tb_prefix: TensorBoard tag prefix of the row's numeric scalars (``train`` -> ``train/loss``).
        bar: a tqdm bar whose postfix shows ``postfix`` keys of each row (all numeric ones when empty).
        resume_iteration: keep the file's rows up to this iteration (see the module docstring).
        enabled: write anything at all (default: rank 0 only).
    """

    def __init__(self, out_dir, *, jsonl: Optional[str] = "metrics.jsonl", text: Optional[str] = None,
                 text_header: str = "", text_format: Optional[Callable[[Dict[str, Any]], str]] = None,
                 writer=None, tb_prefix: str = "train", bar=None, postfix: Sequence[str] = (),
                 resume_iteration: Optional[int] = None, enabled: Optional[bool] = None):
        self.enabled = is_rank0() if enabled is None else bool(enabled)
        self.out_dir = Path(out_dir)
        self.writer, self.tb_prefix, self.bar, self.postfix = writer, tb_prefix, bar, tuple(postfix)
        self.text_header, self.text_format = text_header, text_format or (lambda row: json.dumps(row))
        self.jsonl = self.out_dir / jsonl if jsonl else None
        self.text = self.out_dir / text if text else None
        self.rows: List[Dict[str, Any]] = []
        if self.enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.jsonl is not None and resume_iteration is not None:
                self.rows = [r for r in read_jsonl(self.jsonl) if r.get("iteration", -1) <= resume_iteration]
            self._rewrite()

    def _rewrite(self) -> None:
        # whole-file atomic rewrites: a kill never leaves a torn line behind (the files stay small)
        if self.jsonl is not None:
            atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        if self.text is not None:
            atomic_write_text(self.text, self.text_header + "".join(self.text_format(r) + "\n" for r in self.rows))

    def log(self, iteration: int, **scalars: Any) -> Dict[str, Any]:
        """Record one row; returns it (tensors converted to floats, nested dicts kept)."""
        row: Dict[str, Any] = {"iteration": int(iteration)}
        for k, v in scalars.items():
            row[k] = _number(v) if isinstance(v, torch.Tensor) else v
        if not self.enabled:
            return row
        self.rows.append(row)
        if self.jsonl is not None or self.text is not None:
            self._rewrite()
        numeric = {k: v for k, v in row.items() if k != "iteration" and isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        self.scalars(iteration, self.tb_prefix, **numeric)
        if self.bar is not None and not getattr(self.bar, "disable", False):
            keys = self.postfix or tuple(numeric)
            self.bar.set_postfix({k: f"{row[k]:.4g}" for k in keys if k in row}, refresh=False)
        return row

    def scalars(self, iteration: int, prefix: Optional[str] = None, **values: Any) -> None:
        """TensorBoard only (e.g. per-update scalars that do not go to the JSONL file)."""
        if not self.enabled or self.writer is None:
            return
        prefix = self.tb_prefix if prefix is None else prefix
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}" if prefix else k, _number(v), int(iteration))

    def state_dict(self) -> Dict[str, Any]:
        """The rows logged so far (plain data, checkpoint-safe): a trainer that keeps them in its
        checkpoint gets its files back exactly as they were at that checkpoint on resume."""
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state["rows"]]
        if self.enabled:
            self._rewrite()

    def flush(self) -> None:
        if self.enabled and self.writer is not None:
            self.writer.flush()

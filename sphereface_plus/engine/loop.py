"""The one training loop of every trainer (faces, CIFAR, MHE-GAN): cadences, guards, checkpoints, resume.

A trainer supplies only what differs, as a :class:`Task`: its batches, one ``step(batch)``, its
evaluation, its log rows and its state. :class:`Loop` does the rest, the same way for all of them::

    for batch in task.batches(start):
        outcome = task.step(batch)               # one update (skipped by the task when the loss is not finite)
        NaN guard                                # stop, or skip and roll back after `patience` in a row
        windows.add(outcome.values)              # running means for the log and for the evaluation
        log      every cadence.log_every         task.log(iteration, means)
        evaluate every cadence.eval_every / end  task.evaluate(iteration, means since the last one)
        save     every cadence.checkpoint_every  checkpoint = task.state_dict() + the loop's own state
        stop     on SIGTERM / SIGINT / SIGUSR1 (after a checkpoint), or after `stop_after` updates

The non-finite guard has two policies: ``"stop"`` (CIFAR, GAN: the run stops with one line) and
``"rollback"`` (faces: a step with a non-finite loss is skipped, ``patience`` of them in a row restore
the newest checkpoint, or the start state, and the task draws a new data order; ``max_rollbacks`` then
stop). Before a checkpoint is written the task may declare its state unhealthy (weights beyond a bound):
nothing is written and the run rolls back at once, so no checkpoint ever holds a diverged state.

The loop's own state (``rollbacks``, ``skipped_steps``, the running means ``windows`` and ``elapsed_s``)
sits beside the task's in every checkpoint, so a resumed run retraces the uninterrupted one: the same
updates, the same logged means. Under ``torch.distributed`` every rank runs the loop; only rank 0 writes.
"""
from __future__ import annotations

import abc
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch

from sphereface_plus.engine import checkpoint as ckpt
from sphereface_plus.engine.dist import DistInfo, Heartbeat
from sphereface_plus.engine.preempt import Preemption, preempted
from sphereface_plus.engine.run_log import RunningMeans
from sphereface_plus.errors import TrainingDiverged
from sphereface_plus.utils import progress, safe_torch_load

logger = logging.getLogger(__name__)

__all__ = ["Cadence", "Loop", "StepOutcome", "Task", "NAN_POLICIES"]

#: what the loop does with a non-finite step: stop the run, or skip it and roll back after a streak
NAN_POLICIES = ("stop", "rollback")


@dataclass
class Cadence:
    """When things happen, in updates. ``log_every`` / ``eval_every`` 0: never (evaluation: only at the
    end when ``eval_at_end``); ``eval_at_start``: an evaluation (and a checkpoint) before the first update;
    ``keep_every``: also keep ``ckpt_<iteration>.pt`` at these multiples (0: only ``last.pt``)."""

    iterations: int
    checkpoint_every: int
    keep_every: int = 0
    log_every: int = 0
    eval_every: int = 0
    eval_at_start: bool = False
    eval_at_end: bool = True


@dataclass
class StepOutcome:
    """What one ``Task.step`` did: ``finite`` (False: the update was skipped), ``values`` for the running
    means (numbers or 0-dim tensors: no host sync per step), their ``weight`` (e.g. the batch size),
    ``message`` (what became non-finite, for the guard's line) and ``detail`` (whatever else the task
    reports about the step to its callers)."""

    finite: bool
    values: Dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    message: str = ""
    detail: Dict[str, Any] = field(default_factory=dict)


class Task(abc.ABC):
    """What a trainer supplies to the :class:`Loop`; the optional methods' defaults do nothing.

    Required: ``iteration`` (updates done, advanced by :meth:`step`), :meth:`batches`, :meth:`step`,
    :meth:`state_dict` and :meth:`load_state_dict`. A checkpoint's ``config`` entry, when the task's state
    has one, is what a resume compares (:func:`sphereface_plus.engine.checkpoint.check_settings`).
    """

    iteration: int = 0
    #: how a stopped run is continued (the command's flag), for the stop message
    resume_hint: str = "rerun the same command with --resume auto"

    @abc.abstractmethod
    def batches(self, start: int, restarts: int) -> Iterable[Any]:
        """The batches of updates ``start, start + 1, ...``; ``restarts``: rollbacks so far (a new data order)."""

    @abc.abstractmethod
    def step(self, batch: Any) -> StepOutcome:
        """One update on ``batch`` (skipped when its loss is not finite); advances :attr:`iteration`."""

    @abc.abstractmethod
    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint's content (collective under torch.distributed when the task needs it)."""

    @abc.abstractmethod
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s content."""

    def local_state_dict(self) -> Dict[str, Any]:
        """This rank's state without collectives (the rollback start state); default :meth:`state_dict`."""
        return self.state_dict()

    def initial_values(self) -> Dict[str, float]:
        """The values of the evaluation before any update (``Cadence.eval_at_start``)."""
        return {}

    def log(self, iteration: int, means: Dict[str, float], steps: int, seconds: float) -> None:
        """A log row: the means of the ``steps`` updates since the last one, ``seconds`` of training."""

    def evaluate(self, iteration: int, means: Dict[str, float]) -> None:
        """An evaluation; ``means``: the running means since the previous evaluation."""

    def healthy(self) -> bool:
        """False when the state must not be saved (weights or optimiser values out of bounds)."""
        return True

    def open(self, bar, start: int) -> None:
        """Open the task's writers (metrics files, TensorBoard) before the first update; ``bar``: the progress bar."""

    def close(self) -> None:
        """Close what :meth:`open` opened (also after an error)."""


class Loop:
    """Runs a :class:`Task` to ``cadence.iterations`` (see the module docstring).

    ``out_dir``: the run folder (checkpoints under ``out_dir/checkpoints``); ``keep``: periodic checkpoints
    kept; ``dist``: the process layout; ``preemption``: the signal handlers of the run (a fresh, inactive
    one by default); ``nan_policy``: :data:`NAN_POLICIES`; ``patience`` / ``max_rollbacks``: the rollback
    policy's limits; ``divergence_fix``: the advice of the line a diverged run ends with; ``desc``: the
    progress bar's label; ``stop_after``: leave after this many updates with a checkpoint (time-sliced jobs).
    """

    def __init__(self, task: Task, cadence: Cadence, out_dir, *, keep: int = 0, dist: Optional[DistInfo] = None,
                 preemption: Optional[Preemption] = None, nan_policy: str = "stop", patience: int = 1,
                 max_rollbacks: int = 0, divergence_fix: str = "", desc: str = "train",
                 stop_after: Optional[int] = None):
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy {nan_policy!r}: choose one of {', '.join(NAN_POLICIES)}")
        self.task, self.cadence, self.out_dir, self.keep = task, cadence, Path(out_dir), int(keep)
        self.dist = dist or DistInfo(device=torch.device("cpu"))
        self.preemption = preemption or Preemption()
        self.nan_policy, self.patience, self.max_rollbacks = nan_policy, int(patience), int(max_rollbacks)
        self.divergence_fix, self.desc, self.stop_after = divergence_fix, desc, stop_after
        self.rollbacks = self.skipped_steps = self.streak = 0
        self.log_window, self.eval_window = RunningMeans(), RunningMeans()
        self.elapsed_before = 0.0
        self.heartbeat = Heartbeat(self.dist.rank, self.dist.world_size)
        self._rollback_pending = False
        self._restored = False  # continued from a checkpoint (its evaluation at the start is in it)
        self._initial_state: Optional[bytes] = None
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The loop's part of a checkpoint (plain numbers)."""
        return {"rollbacks": self.rollbacks, "skipped_steps": self.skipped_steps, "elapsed_s": self.elapsed(),
                "windows": {"log": self.log_window.state_dict(), "eval": self.eval_window.state_dict()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the loop's part of a checkpoint; entries an older checkpoint lacks start afresh (its
        GAN runs kept the evaluation window as ``window``)."""
        self.rollbacks = int(state.get("rollbacks", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self._t0 = time.perf_counter()
        windows = state.get("windows") or {"eval": state.get("window")}
        for window, name in ((self.log_window, "log"), (self.eval_window, "eval")):
            if windows.get(name):
                window.load_state_dict(windows[name])
            else:
                window.reset()

    def checkpoint_state(self) -> Dict[str, Any]:
        """What a checkpoint holds: the task's state and the loop's."""
        return {**self.task.state_dict(), **self.state_dict()}

    def restore(self, state: Dict[str, Any], **task_kwargs: Any) -> None:
        """Continue from a checkpoint (:meth:`checkpoint_state`) or a rank's rollback start state
        (``task_kwargs``: passed to the task's ``load_state_dict``)."""
        self.task.load_state_dict(state, **task_kwargs)
        self.load_state_dict(state)
        self._restored = True

    def elapsed(self) -> float:
        """Seconds of this run so far, earlier sessions of a resumed run included."""
        return self.elapsed_before + time.perf_counter() - self._t0

    def capture_start_state(self) -> None:
        """Remember this rank's state now: a rollback before the first checkpoint returns here."""
        self._initial_state = ckpt.serialize({**self.task.local_state_dict(), **self.state_dict()})

    def start_state(self) -> Optional[Dict[str, Any]]:
        """The state :meth:`capture_start_state` recorded (what a rollback before the first checkpoint restores)."""
        if self._initial_state is None:
            return None
        return safe_torch_load(io.BytesIO(self._initial_state), map_location=self.dist.device)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Optional[Path]:
        """Write the checkpoint (collective); None, writing nothing, when the state is not healthy: a step of
        a non-finite streak, or the task's own check (then :meth:`run` rolls back at once)."""
        if not self._healthy():
            newest = ckpt.checkpoint_dir(self.out_dir) / "last.pt"
            logger.warning("iteration %d: not writing a checkpoint (%s); the newest one stays %s", self.task.iteration,
                           f"{self.streak} skipped step(s) in a row" if self.streak else
                           "weights or optimiser values out of bounds or non-finite",
                           newest if newest.is_file() else "the start state")
            return None
        state = self.checkpoint_state() if (self.dist.is_main or self._collective_state()) else None
        path = ckpt.save_checkpoint(state, self.out_dir, self.cadence.keep_every, self.keep) \
            if self.dist.is_main else None
        if self.dist.distributed:
            torch.distributed.barrier()  # nobody may read (roll back to) a half-written file
        return path

    def _collective_state(self) -> bool:
        return bool(getattr(self.task, "collective_state", False))

    def _healthy(self) -> bool:
        if self.streak:  # the same on every rank: the task all-reduces its finite flag
            return False
        if not self.task.healthy():  # collective in the task when it needs to be
            self._rollback_pending = True
            return False
        return True

    # ------------------------------------------------------------------ the guard
    def guarded_step(self, batch: Any) -> Dict[str, Any]:
        """:meth:`Task.step` under the non-finite guard; returns ``{"finite", "rolled_back", "outcome"}``."""
        outcome = self.task.step(batch)
        rolled_back = False
        if outcome.finite:
            self.streak = 0
        elif self.nan_policy == "stop":
            raise TrainingDiverged(f"{outcome.message or 'the loss became non-finite'} at iteration "
                                   f"{self.task.iteration}; {self.divergence_fix}")
        else:
            self.skipped_steps += 1
            self.streak += 1
            logger.warning("non-finite loss at iteration %d (%s): step skipped", self.task.iteration, outcome.message)
            if self.streak >= self.patience:
                self.rollback()
                rolled_back = True
        return {"finite": outcome.finite, "rolled_back": rolled_back, "outcome": outcome}

    def rollback(self) -> None:
        """Restore the newest checkpoint (or the start state) and change the data order."""
        found = ckpt.load_resume_state(self.out_dir, map_location=self.dist.device)
        path = found[0] if found else None
        if found:
            state = found[1]
        elif self._initial_state is not None:  # no checkpoint yet: the state captured at start-up
            state = self.start_state()
        else:  # capture_start_state runs before the first step of a rollback-policy run
            raise TrainingDiverged(f"the run diverged at iteration {self.task.iteration} before its start state was "
                                   f"recorded; {self.divergence_fix}")
        failed_at, rollbacks = self.task.iteration, self.rollbacks + 1
        why = (f"{self.patience} non-finite losses in a row" if self.streak else
               "weights or optimiser values out of bounds (or non-finite)")
        if rollbacks > self.max_rollbacks:
            raise TrainingDiverged(f"training diverged: {why} at iteration {failed_at} after {self.rollbacks} "
                                   f"rollbacks (the newest checkpoint, {path or 'none'}, is from before the "
                                   f"divergence); {self.divergence_fix}")
        self.restore(state)
        self.rollbacks = rollbacks
        self.streak = 0
        self._rollback_pending = False
        logger.warning("%s at iteration %d: rolled back to %s (iteration %d), rollback %d of at most %d, new data "
                       "order", why, failed_at, path or "the start state", self.task.iteration, rollbacks,
                       self.max_rollbacks)

    # ------------------------------------------------------------------ the loop
    def run(self) -> Dict[str, Any]:
        """Train to ``cadence.iterations``; returns ``{"iterations", "stopped", "elapsed_s", "steps_per_s"}``."""
        c, task = self.cadence, self.task
        total, start = c.iterations, task.iteration
        if self.nan_policy == "rollback" and self._initial_state is None:
            self.capture_start_state()
        bar = progress(total=total, initial=start, desc=self.desc, unit="it",
                       disable=None if self.dist.is_main else True)
        speed = _Throughput()
        stopped = False
        task.open(bar, start)
        at_start = c.eval_at_start and start == 0 and not self._restored
        try:
            if at_start:
                task.evaluate(0, task.initial_values())
                self.save()
            t_window = time.perf_counter()
            while task.iteration < total and not stopped:
                for batch in task.batches(task.iteration, self.rollbacks):
                    result = self.guarded_step(batch)
                    outcome = result["outcome"]
                    speed.step()
                    bar.update(1)
                    if result["rolled_back"]:
                        self.log_window.reset()
                        t_window = time.perf_counter()
                        bar.n = task.iteration
                        break  # restart the batches at the restored iteration with the new data order
                    if outcome.finite:
                        self.log_window.add(outcome.weight, **outcome.values)
                        self.eval_window.add(outcome.weight, **outcome.values)
                    it = task.iteration
                    last = it == total
                    if c.log_every and (it % c.log_every == 0 or last):
                        task.log(it, self.log_window.means(distributed=self.dist.distributed), self.log_window.count,
                                 max(time.perf_counter() - t_window, 1e-9))
                        self.log_window.reset()
                        t_window = time.perf_counter()
                    t_pause = time.perf_counter()
                    evaluated = (c.eval_every and it % c.eval_every == 0) or (last and c.eval_at_end)
                    if evaluated:  # before the save: the checkpoint carries what the evaluation found
                        task.evaluate(it, self.eval_window.means(distributed=self.dist.distributed))
                        self.eval_window.reset()
                    saved = bool(it % c.checkpoint_every == 0 or last)
                    if saved:
                        self.save()
                    if self._rollback_pending:  # out of bounds at a save: roll back now
                        self.rollback()
                        self.log_window.reset()
                        bar.n = task.iteration
                        break
                    paused = time.perf_counter() - t_pause
                    t_window += paused  # images/s counts training time only
                    speed.pause(paused)
                    self.heartbeat.beat(it)
                    signal_name = self.preemption.requested(self.dist.distributed, self.dist.device) if not last \
                        else None
                    if signal_name:  # on any rank: every rank saves this update, then the run stops
                        self._stop(signal_name, saved)
                    if self.stop_after is not None and self.stop_after <= it < total:
                        if not saved:
                            self.save()
                        stopped = True
                        break
            if task.iteration == start and not at_start:
                self.save()  # nothing was left to do (a finished run): make sure last.pt exists
        finally:
            bar.close()
            task.close()
        return {"iterations": task.iteration, "stopped": stopped, "elapsed_s": self.elapsed(),
                "steps_per_s": speed.mean()}

    def _stop(self, signal_name: str, saved: bool) -> None:
        """Write this update's checkpoint (unless just written) and raise :class:`~sphereface_plus.errors.RunStopped`."""
        path = None if saved and self._healthy() else self.save()
        path = path or ckpt.checkpoint_dir(self.out_dir) / "last.pt"
        newest = ckpt.find_resume_checkpoint(self.out_dir) if self.dist.is_main else path
        raise preempted(signal_name, self.task.iteration, newest or path, how=self.task.resume_hint)


class _Throughput:
    """Mean updates/s after the first ``warmup`` ones (allocator, oneDNN and compile warm-up), pauses
    (evaluation, checkpoints) excluded; batch loading counts, as it is part of training."""

    def __init__(self, warmup: int = 3):
        self.warmup, self.steps, self.items, self.start, self.paused = warmup, 0, 0, None, 0.0
        self.t_first = time.perf_counter()

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            self.start = time.perf_counter()
        elif self.steps > self.warmup:
            self.items += 1

    def pause(self, seconds: float) -> None:
        if self.start is not None:
            self.paused += seconds

    def mean(self) -> float:
        """The mean after the warm-up; the whole run's for a run not longer than it."""
        if self.start is None or self.items == 0:
            return self.steps / max(time.perf_counter() - self.t_first, 1e-9)
        return self.items / max(time.perf_counter() - self.start - self.paused, 1e-9)

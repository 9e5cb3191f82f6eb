"""Preemption: SIGTERM, SIGINT and SIGUSR1 end a training run *after* a checkpoint.

Slurm and Kubernetes send SIGTERM some seconds before they kill a job (Slurm's ``--signal=USR1@120``
sends SIGUSR1 earlier; Ctrl-C is SIGINT). While a :class:`Preemption` is active the first of these
signals only sets a flag; the training loop finishes the current step, asks :meth:`Preemption.requested`
(a collective under ``torch.distributed``: if any rank was signalled, every rank learns it at the
same iteration, so all ranks save the same step), writes its checkpoint, prints where to resume, and
the command exits with :data:`EXIT_STATUS`:

- SIGTERM: 143 (128 + 15, what a shell reports for a terminated job),
- SIGINT: 130 (128 + 2, as Ctrl-C),
- SIGUSR1: 0 (a requested checkpoint-and-stop: Slurm requeues the job, ``--resume auto`` continues).

A second signal exits at once (``os._exit`` with the same status, no checkpoint): the escape hatch
when the save itself hangs. Files being written then are temporary files that the next start
removes (:mod:`sphereface_plus.engine.run_folder`).
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Dict, Optional

import torch

__all__ = ["EXIT_STATUS", "SIGNALS", "Preemption", "preempted"]

#: signal name -> exit status of a run stopped by it (after its checkpoint)
EXIT_STATUS: Dict[str, int] = {"SIGTERM": 143, "SIGINT": 130, "SIGUSR1": 0}
SIGNALS = tuple(EXIT_STATUS)


class Preemption:
    """Install the handlers for the ``with`` block (main thread only; elsewhere it does nothing)."""

    def __init__(self, signals=SIGNALS):
        self.signals = [getattr(signal, name) for name in signals if hasattr(signal, name)]
        self.signum: Optional[int] = None
        self._previous: Dict[int, object] = {}
        self._pid = os.getpid()

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process decides
            return
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            # os.write, not logging: a handler may run while the main thread holds the logging lock
            os.write(2, f"\n{name} received: finishing the current step, then writing a checkpoint "
                        f"(send it again to exit at once, without one)\n".encode())
            return
        os.write(2, f"\nsecond signal ({name}): exiting at once, without a checkpoint\n".encode())
        os._exit(EXIT_STATUS.get(signal.Signals(self.signum).name, 128 + signum))

    def requested(self, distributed: bool = False, device: Optional[torch.device] = None) -> Optional[str]:
        """The name of the signal that stops the run (any rank's when ``distributed``), or None.

        Every rank must call it at the same point of each step when ``distributed`` (one all-reduce of
        one integer); the largest signal number wins when ranks got different ones.
        """
        signum = self.signum or 0
        if distributed:
            from sphereface_plus.engine.dist import all_reduce_max

            signum = int(all_reduce_max(torch.tensor([signum], dtype=torch.int64, device=device)).item())
        return signal.Signals(signum).name if signum else None

    @staticmethod
    def exit_status(name: str) -> int:
        return EXIT_STATUS.get(name, 1)


def preempted(signal_name: str, iteration: int, checkpoint, how: str = "rerun the same command with --resume auto"):
    """The :class:`~sphereface_plus.errors.RunStopped` a training loop raises after its checkpoint."""
    from sphereface_plus.errors import RunStopped

    return RunStopped(f"stopped by {signal_name} at iteration {iteration}; checkpoint {checkpoint}; to continue, "
                      f"{how}", EXIT_STATUS.get(signal_name, 1), signal_name, iteration, str(checkpoint))

"""Checkpoint and requeue on a signal (Slurm's SIGUSR1 before the time limit), at an optimizer-step boundary.

Lightning's own auto-requeue (``SLURMEnvironment(auto_requeue=True)``) saves the checkpoint inside the signal
handler, i.e. in the middle of whatever step is running: the batch being trained is counted as consumed by the
loader state but its optimizer step is not in the weights, so that batch is skipped after the resume; and in DDP the
handler's barrier can meet another rank's gradient all-reduce. Here the handler only sets a flag. At the end of each
training batch the ranks agree (one all-reduce of a bool) whether any of them got the signal; if so every rank saves
the same step-boundary checkpoint (to ``<path>.requeue``) and the trainer stops. After ``trainer.fit`` returns,
:meth:`RequeueOnSignal.requeue` moves it to ``path`` (e.g. ``<checkpoint.dir>/last.ckpt``, which ``resume=auto``
picks up) and asks Slurm to requeue the job (global rank 0 only); the requeued job keeps its ``SLURM_JOB_ID`` and
resumes from that checkpoint. The move comes after fit on purpose: once ``should_stop`` ends the epoch early,
Lightning counts that epoch as finished, and a checkpoint written while fit winds down (``ModelCheckpoint``'s
last, an ``on_train_end`` save) would make the resumed run skip the rest of the epoch.

Use with ``SLURMEnvironment(auto_requeue=False)`` so that Lightning installs no handler of its own for the signal.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from m3leo_stream.storage import get_fs

log = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for array tasks, else ``SLURM_JOB_ID``."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


class RequeueOnSignal(pl.Callback):
    """On ``signum``: finish the current step, save ``path`` on every rank at that step boundary, stop training;
    ``requeue()`` after fit then requeues the Slurm job (rank 0). ``requested`` tells the caller it happened."""

    def __init__(self, path: str, signum: int = signal.SIGUSR1, requeue: bool = True, every_n_steps: int = 1,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.path = str(path)
        self.staging = self.path + ".requeue"
        self.storage_options = dict(storage_options or {})
        self.every_n_steps = int(every_n_steps)  # how often the ranks compare flags (one tiny all-reduce each)
        self.signum = signal.Signals(signum)
        self.do_requeue = requeue
        self.requested = False  # a checkpoint was saved because of the signal; the run is not finished
        self._received = False
        self._previous: Any = None
        self._installed = False
        self._step_at_start = -1
        self._exchange: tuple[Any, Any] | None = None  # (host result, CUDA event or None) of the last flag exchange

    # -- signal handling: only a flag, never work inside the handler
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._received = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not self._installed:
            self._previous = signal.signal(self.signum, self._on_signal)
            self._installed = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._installed:
            # a late signal (say, one sent while the final checkpoint or the test run is written) must not kill the
            # process by the default action: ignore it unless someone else had a handler
            keep = self._previous not in (None, signal.SIG_DFL)
            signal.signal(self.signum, self._previous if keep else signal.SIG_IGN)
            self._installed = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # only where an optimizer step just completed (not between accumulated micro-batches, whose gradients a
        # checkpoint would not hold), every every_n_steps steps; global_step is the same on all ranks
        if (self.requested or trainer.global_step == self._step_at_start
                or trainer.global_step % self.every_n_steps):
            return
        if not self._agreed(trainer):
            return
        # At an epoch's last batch too: the M3LEO loader restores a finished epoch as the next one's first batch
        # and Lightning (2.6) resumes such a checkpoint in the next epoch, so the resume is exact there as well
        # (tests/m3leo_stream/test_train.py::test_requeue_signal_resumes_exactly); waiting for a batch that is not
        # an epoch's last would never end with one-batch epochs.
        self._stop(trainer)

    def _agreed(self, trainer: pl.Trainer) -> bool:
        """Whether any rank has had the signal, decided at the same step on every rank without stalling the GPU.

        One process: the flag itself. Several: every check all-reduces the flags (MAX). On CPU tensors (gloo) the
        result is there at once. On CUDA the result is copied to pinned host memory behind an event and read at the
        next check, long since arrived, so the host never waits for the GPU's queued work (a blocking read every
        step would); all ranks read the same reduction at the same step, so they agree, one check late."""
        import torch
        import torch.distributed as dist

        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return self._received
        decided = False
        if self._exchange is not None:
            host, event = self._exchange
            event.synchronize()
            decided = bool(host.item())
            self._exchange = None
        if not decided:
            device = trainer.strategy.root_device
            flag = torch.tensor([int(self._received)], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if device.type != "cuda":  # gloo on CPU tensors: done already, nothing queued to wait for
                return bool(flag.item())
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._exchange = (host, event)
        return decided

    def _stop(self, trainer: pl.Trainer) -> None:
        log.warning("got %s: saving a checkpoint at step %d to %s and stopping, to be requeued",
                    self.signum.name, trainer.global_step, self.path)
        trainer.save_checkpoint(self.staging, weights_only=False)  # all ranks; rank 0 writes, then a barrier
        self.requested = True
        trainer.should_stop = True

    def requeue(self, trainer: pl.Trainer) -> bool:
        """After fit: requeue this Slurm job (global rank 0) if the signal stopped training. True when requested."""
        if not self.requested:
            return False
        if trainer.is_global_zero:
            fs, staging = get_fs(self.staging, self.storage_options)
            fs.mv(staging, get_fs(self.path, self.storage_options)[1])
        job = slurm_job_id()
        if not (self.do_requeue and trainer.is_global_zero and job):
            if trainer.is_global_zero and not job:
                log.warning("stopped on %s outside Slurm: resume from %s", self.signum.name, self.path)
            return True
        if not re.fullmatch(r"[0-9_]+", job):
            raise ValueError(f"unexpected Slurm job id {job!r}")
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if res.returncode == 0:
            log.warning("requeued Slurm job %s; it resumes from %s", job, self.path)
        else:
            log.error("scontrol requeue %s failed (%s): resubmit to resume from %s", job,
                      (res.stderr or res.stdout).strip(), self.path)
        return True

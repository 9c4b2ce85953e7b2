"""Recording a Lightning run: ``Trainer(callbacks=[NormRecorder("runs/mine", probe=(x, y), every=100)])``.

The callback is ``cbnorm.watch`` in Lightning's hooks (the shape of Lightning's own logger callbacks): the
recorder starts when training starts (the module is on its device by then, step 0 is probed), each optimizer
step logs the training loss (kept as a tensor until the next probe step: no host sync) and probes on
schedule, each validation epoch logs the trainer's ``callback_metrics``, and the run is closed when fitting
ends (or fails). Under DDP only global rank 0 records (``cbnorm.watch`` does nothing on the other ranks).
Needs ``lightning`` (``pip install cbnorm[lightning]``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch

from ..record import Recorder, watch

__all__ = ["NormRecorder"]


class NormRecorder(pl.Callback):
    """Record the LightningModule's normalization layers into ``logdir`` (default: ``<trainer.log_dir or
    default_root_dir>/cbnorm``) on the fixed ``probe`` batch every ``every`` optimizer steps; the other
    keywords are :func:`cbnorm.watch`'s (``layers``, ``context``, ``class_names``, ``config``, ``early``,
    ``mode``, ``values_per_channel``, ``resume``). ``recorder`` is the :class:`cbnorm.record.Recorder`."""

    def __init__(self, logdir: Any = None, probe: Any = None, every: int = 100, **watch_kwargs: Any) -> None:
        super().__init__()
        if probe is None:
            raise ValueError("NormRecorder needs probe=: a fixed batch x (N, ...) or (x, y) to record the layers on")
        self.logdir, self.probe, self.every, self.watch_kwargs = logdir, probe, every, watch_kwargs
        self.recorder: Optional[Recorder] = None
        self._last_step = -1

    def _dir(self, trainer: "pl.Trainer") -> Path:
        if self.logdir is not None:
            return Path(self.logdir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "cbnorm"

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        kwargs = dict(self.watch_kwargs)
        kwargs.setdefault("config", {"max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
                                     "module": type(pl_module).__name__, "hparams": dict(pl_module.hparams)})
        self.recorder = watch(pl_module, self._dir(trainer), probe=self.probe, every=self.every, **kwargs)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = int(trainer.global_step)
        if self.recorder is None or step == self._last_step:  # gradient accumulation: no optimizer step yet
            return
        self._last_step = step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        scalars = {"loss": loss.detach()} if isinstance(loss, torch.Tensor) and loss.numel() == 1 else {}
        self.recorder.step(step, **scalars)

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.recorder is None or trainer.sanity_checking:
            return
        scalars = {k: v for k, v in trainer.callback_metrics.items()
                   if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}
        if scalars:
            self.recorder.log(int(trainer.global_step), **scalars)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.recorder is not None:
            self.recorder.close()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if self.recorder is not None:
            self.recorder.flush()  # keep what was logged; the status stays "running" -> shown as stopped later

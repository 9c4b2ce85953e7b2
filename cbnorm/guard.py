"""Skip a training step whose minibatch is not finite, as ``torch.amp.GradScaler`` skips a step with inf
gradients: parameters, optimizer state and buffers stay as they were before the step.

A non-finite minibatch reaches a model in two ways. With the layers' checks done now (``validate="now"``, the
default on CPU) the first cbnorm layer that sees non-finite statistics raises ``NonFiniteError`` in the
forward pass, after the layers before it (torch's BatchNorm too) have already updated their running
statistics with the batch. With deferred checks (``validate="deferred"``, the default on accelerators and while
compiling) nothing is raised: the layer leaves its own buffers unchanged, counts the batch on the device and
its output is NaN, so the loss and the gradients are NaN, and an optimizer step would write NaN into every
parameter before the next ``check_deferred``. ``StepGuard`` covers both::

    guard = cbnorm.StepGuard(model)
    for x, y in loader:
        guard.begin()                               # copies the buffers (running statistics are small)
        try:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(); loss.backward()
        except cbnorm.NonFiniteError:
            guard.skip(optimizer); continue         # an immediate check refused the batch
        if guard.finite(loss):                      # one host read, together with the loss
            optimizer.step()
        else:
            guard.skip(optimizer)                   # buffers put back, gradients dropped, step not taken

``skip`` raises ``NonFiniteError`` after ``max_consecutive`` skipped steps in a row: a run whose every batch
is non-finite has diverged, and skipping would hide it. A trainer that reads the loss anyway (ours) reads
:meth:`bad` with it in the same transfer instead of calling :meth:`finite`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .norms import NonFiniteError, clear_nonfinite, nonfinite_count

__all__ = ["StepGuard"]


class StepGuard:
    """Skips non-finite training steps of ``model`` (module docstring). ``skipped``: the steps skipped so far;
    ``consecutive``: those in a row up to now."""

    def __init__(self, model: nn.Module, *, max_consecutive: int = 10) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (isinstance(max_consecutive, int) and max_consecutive >= 1):
            raise ValueError(f"max_consecutive must be a positive int, got {max_consecutive!r}")
        self.model = model
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._buffers: list[Tensor] = []
        self._saved: list[Tensor] = []
        self._count_before: Optional[Tensor] = None

    def begin(self) -> None:
        """Before the forward pass: copy every floating-point and integer buffer (running statistics, MN's
        queue, ``num_batches_tracked``) and note the layers' deferred non-finite count. No host read."""
        bufs = [b for b in self.model.buffers() if b is not None]
        if len(bufs) != len(self._buffers) or any(a is not b or a.shape != c.shape
                                                  for a, b, c in zip(bufs, self._buffers, self._saved)):
            self._buffers = bufs  # the model's buffers changed (first call, or a buffer was replaced)
            self._saved = [b.detach().clone() for b in bufs]
        elif bufs:
            with torch.no_grad():
                torch._foreach_copy_(self._saved, [b.detach() for b in bufs])
        count = nonfinite_count(self.model)
        self._count_before = None if count is None else count.clone()

    def bad(self, loss: Tensor) -> Tensor:
        """A 0-dim float tensor on the loss's device, 1 when the step must be skipped (the loss is not finite,
        or a layer's deferred check counted a non-finite batch since :meth:`begin`), else 0. No host read."""
        flag = ~torch.isfinite(loss.detach()).all()
        count = nonfinite_count(self.model)
        if count is not None and self._count_before is not None:
            flag = flag | (count.to(flag.device) > self._count_before.to(flag.device))
        return flag.float()

    def finite(self, loss: Tensor) -> bool:
        """Whether the step may be taken (one host read); on False call :meth:`skip`."""
        ok = not bool(self.bad(loss))
        if ok:
            self.stepped()
        return ok

    def stepped(self) -> None:
        """The step was taken (a caller that read :meth:`bad` itself says so): the run of skips ends."""
        self.consecutive = 0

    def skip(self, optimizer: Optional[torch.optim.Optimizer] = None, reason: str = "") -> None:
        """Drop the step: buffers back to their copies from :meth:`begin`, the layers' deferred non-finite
        counts cleared, ``optimizer``'s gradients set to None (its state is untouched, no step is taken).
        Raises ``NonFiniteError`` after ``max_consecutive`` skipped steps in a row."""
        if self._buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._saved)
        clear_nonfinite(self.model)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} training steps in a row had non-finite values (loss, gradients or a layer's "
                f"statistics){': ' + reason if reason else ''}; each was skipped (parameters, optimizer state and "
                f"buffers as before it), but the run has diverged or its data is broken: lower the learning rate, "
                f"check the inputs, or restore from the last good checkpoint")

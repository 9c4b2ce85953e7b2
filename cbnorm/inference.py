"""Honest inference for models whose contexts are derived from labels (superclasses).

Feeding the true context at test time leaks label information (the "oracle" accuracy). Two label-free
ways to classify instead:

* ``"mixed"`` — CN+ (context-normalization.txt eq. 9): ``model(x, context=None)`` in eval mode mixes all
  contexts by their posterior under the layer's per-context Gaussians.
* ``"predicted"`` — the model predicts the context itself: it is run once per context k, and k is scored by
  the probability its own output gives to the classes of context k,
  ``s_k(x) = sum_{y in k} softmax(f(x; k))_y``; the prediction is ``argmax_y f(x; k*)`` with ``k* =
  argmax_k s_k``. This uses the class -> context map (known at design time), never the test label.
  It costs K forward passes.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["predict_context", "logits_with_predicted_context", "INFERENCE_MODES"]

INFERENCE_MODES = ("mixed", "predicted", "oracle")


@torch.no_grad()
def logits_with_predicted_context(model: nn.Module, x: Tensor, label_to_context: Sequence[int],
                                  num_contexts: int) -> tuple[Tensor, Tensor]:
    """(logits (N, num_classes) under the predicted context, predicted context ids (N,)). Model in eval mode."""
    l2c = torch.as_tensor(list(label_to_context), dtype=torch.long, device=x.device)
    if l2c.numel() == 0 or int(l2c.min()) < 0 or int(l2c.max()) >= num_contexts:
        raise ValueError(f"label_to_context must map every class to a context in [0, {num_contexts - 1}]")
    member = torch.nn.functional.one_hot(l2c, num_contexts).to(torch.float32)  # (classes, K)
    n = x.shape[0]
    all_logits, scores = [], []
    for k in range(num_contexts):  # K forward passes (a loop over contexts outside any layer)
        logits = model(x, context=torch.full((n,), k, dtype=torch.long, device=x.device)).float()
        if logits.shape[1] != l2c.numel():
            raise ValueError(f"model has {logits.shape[1]} classes but label_to_context has {l2c.numel()}")
        all_logits.append(logits)
        scores.append(torch.softmax(logits, dim=1) @ member[:, k])
    stacked = torch.stack(all_logits, dim=1)  # (N, K, classes)
    ctx = torch.stack(scores, dim=1).argmax(dim=1)
    return stacked[torch.arange(n, device=x.device), ctx], ctx


def predict_context(model: nn.Module, x: Tensor, label_to_context: Sequence[int], num_contexts: int) -> Tensor:
    """Context ids (N,) the model assigns to x (see the module docstring)."""
    return logits_with_predicted_context(model, x, label_to_context, num_contexts)[1]

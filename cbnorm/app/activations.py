"""The test images the pages run models on, and what one layer sees of them: the shared test sets, seeded
minibatches, forward hooks on a layer (``capture``, serialised per cached model by ``shared.model_lock``)
and the byte-budgeted cache of a layer's input and output on a minibatch (``layer_activations``), used by
the histogram page, the cluster-evolution page (snapshot features) and the compare page's live panel.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import streamlit as st
import torch

from cbnorm import analysis, probe
from cbnorm.runs import Run

from . import shared as S


@st.cache_resource(max_entries=4, ttl=S.TTL, show_spinner="Loading the test set…")
def test_data(name: str):
    """The test split of dataset ``name`` (cbnorm.data.load_dataset), arrays read-only (shared)."""
    from cbnorm.data import load_dataset

    ds = load_dataset(name, "test")
    for arr in (ds.images, ds.labels, ds.contexts):
        if arr is not None:
            arr.flags.writeable = False
    return ds


def sample_indices(n_total: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct indices of ``range(n_total)`` drawn with ``seed`` (sorted); all when size >= n."""
    if n_total < 1:
        raise ValueError("the test set is empty")
    size = int(min(max(1, size), n_total))
    rng = np.random.default_rng(int(seed))
    return np.sort(rng.choice(n_total, size=size, replace=False))


def dataset_name(run: Run) -> str:
    name = (run.config.get("dataset") or {}).get("name")
    if not name:
        raise ValueError(f"run {run.path.name} does not name its dataset in config.json")
    return name


def test_batch(run: Run, size: int, seed: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    if run.config.get("task") == "gan":  # a generator: seeded latent vectors instead of test images
        from .generation import latent_batch

        return latent_batch(run, size, seed)
    ds = test_data(dataset_name(run))
    idx = sample_indices(len(ds), size, seed)
    return run.preprocess(np.asarray(ds.images[idx])), idx, np.asarray(ds.labels[idx])


def true_contexts(run: Run, labels: np.ndarray) -> Optional[np.ndarray]:
    """The label-derived context (superclass) of each label, or None when contexts are not label-derived."""
    if not run.contexts.get("label_derived"):
        return None
    return run.context_of(labels).cpu().numpy()


def capture(run: Run, model: torch.nn.Module, x: torch.Tensor, layer: str, context=None, shared: bool = True):
    """(capture of ``layer``, logits) in one forward pass (a hook on the head gives the logits)."""
    names = [layer] + (["head"] if "head" in dict(model.named_modules()) else [])
    lock = S.model_lock(str(run.path), S.device()) if shared else None
    if lock is not None:
        lock.acquire()
    try:
        caps = probe.capture(model, x, names, context=context)
    finally:
        if lock is not None:
            lock.release()
    if layer not in caps:
        raise ValueError(f"layer {layer!r} did not run on this input (is it used by the model's forward?)")
    logits = caps["head"].output if "head" in caps else None
    return caps[layer], logits


def layer_activations(run_path: str, dev: str, layer: str, size: int, seed: int, context_mode: str = "predicted"
                      ) -> dict:
    """Input, x_hat and output of ``layer`` on a minibatch (cached within ``BUDGET_MB["layer_activations"]``; see
    :func:`_layer_activations`)."""
    args = (run_path, dev, layer, int(size), int(seed), context_mode)
    out = _layer_activations(*args)
    S.BUDGETS["layer_activations"].note(_layer_activations, args, out)
    return out


@st.cache_data(max_entries=32, ttl=S.TTL, show_spinner=False)
def _layer_activations(run_path: str, dev: str, layer: str, size: int, seed: int, context_mode: str = "predicted"
                       ) -> dict:
    """Input, x_hat and output of ``layer`` on a minibatch of ``size`` test images drawn with ``seed``.

    ``context_mode``: "predicted" (honest: the model infers the context — its context predictor, or CN+
    mixing) or "true" (the label-derived superclass, an oracle). Returns numpy arrays: input, x_hat (the
    normalized values before the affine, ``probe``), output (N, C, *S), indices, labels, predictions, contexts (true superclass or None), components (per-sample
    mixture component / context under the layer, or None) and ``layer`` (layer_info)."""
    run = S.get_run(run_path, dev)
    info = S.layer_info(run, layer)
    x, idx, labels = test_batch(run, size, seed)
    ctx_true = true_contexts(run, labels)
    context = None
    if context_mode == "true":
        if not run.uses_context:
            raise ValueError("this run has no context layer; 'true context' does not apply")
        if ctx_true is None:
            raise ValueError("this run's contexts are not derived from the labels; no true context to give")
        context = torch.as_tensor(ctx_true, dtype=torch.long, device=run.device)
    elif context_mode != "predicted":
        raise ValueError(f"context_mode must be 'predicted' or 'true', got {context_mode!r}")
    cap, logits = capture(run, run.model, x, layer, context)
    comps = analysis.sample_components(cap.module, cap.input.to(run.device))
    return {"input": cap.input.numpy(), "x_hat": cap.x_hat.numpy(), "output": cap.output.numpy(), "indices": idx,
            "labels": labels,
            "predictions": None if logits is None else logits.argmax(1).numpy(), "contexts": ctx_true,
            "components": comps, "layer": info}

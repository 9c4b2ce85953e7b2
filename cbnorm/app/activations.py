"""The test images the pages run models on: the shared test sets, seeded minibatches, true contexts and
forward hooks on a layer (``capture``, serialised per cached model by ``shared.model_lock``). The activation
source (``source.activations``) runs a rebuildable run's model through these.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import streamlit as st
import torch

from cbnorm import probe
from cbnorm.data import load_dataset
from cbnorm.runs import Run

from . import shared as S
from .generation import latent_batch


@st.cache_resource(max_entries=4, ttl=S.TTL, show_spinner="Loading the test set…")
def test_data(name: str):
    """The test split of dataset ``name`` (cbnorm.data.load_dataset), arrays read-only (shared)."""
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

"""The one activation source of every page: what a normalization layer saw, x_hat and what it gave, at a step
of a run, whatever wrote the run.

* A step with a recorded summary (``cbnorm.watch``: any model, any loop; our trainer; ``python -m
  cbnorm.record`` for older runs) is read from it: the fixed probe batch, ``values_per_channel`` values per
  channel of each view, per-sample channel means, the layer's mixture, predictions. Nothing is run.
* Otherwise, when the library can rebuild the run's model, the step's snapshot (or the final weights,
  ``FINAL``) runs on ``size`` test images drawn with ``seed``: every value of every position.

Pages and services ask :func:`activations` and read it through :func:`values`, :func:`features` and
:func:`mixture`: they never ask which kind of run they show. What only a rebuildable run can do (another
minibatch size, resampling, the true context) is ``live(run)``; a page offers it where it is true and says
why where it is not (:func:`live_reason`).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
import streamlit as st
import torch

from cbnorm import analysis
from cbnorm.runs import Run, Summary, read_summary

from . import activations as A
from . import shared as S

#: the step of a run's end: its final weights on a sampled minibatch, or its last recorded summary
FINAL = S.FINAL
BUDGET = "source_activations"
S.BUDGET_MB.setdefault(BUDGET, 24)
S.BUDGETS.setdefault(BUDGET, S._ByteBudget(BUDGET))
SUMMARY_BUDGET = "summaries"
S.BUDGET_MB.setdefault(SUMMARY_BUDGET, 24)
S.BUDGETS.setdefault(SUMMARY_BUDGET, S._ByteBudget(SUMMARY_BUDGET))


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor view of a shared read-only array (never written: the functions here only read it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(np.ascontiguousarray(a))


# ============================================================================ what a run offers
#: whether the app can run a run's model on test images, and whether a run recorded a layer (``shared``: the
#: sidebar's step picker needs them too)
live, is_recorded = S.live, S.is_recorded


def live_reason(run: Run) -> str:
    """Why a run's views are limited to what was recorded ('' when they are not)."""
    if live(run):
        return ""
    cls = (run.config.get("model") or {}).get("class") or (run.config.get("model") or {}).get("name", "?")
    return (f"Run {run.path.name} was recorded from a {cls} that the app cannot rebuild, so it shows the "
            f"recorded probe batch ({recorded_probe_size(run)} inputs) at the recorded steps; another minibatch, "
            f"resampling and the true context need a model the app can run.")


def recorded_probe_size(run: Run) -> int:
    return int(((run.config.get("recorder") or {}).get("probe") or {}).get("n", 0))


def steps(run: Run, layer: Optional[str] = None) -> list[int]:
    """The steps whose activations (of ``layer``) can be shown: recorded summaries, else (rebuildable runs)
    snapshots."""
    if is_recorded(run, layer):
        return [s for s, _ in run.summaries]
    return [s for s, _ in run.snapshots] if live(run) else []


def recorded(run: Run, step: int, layer: Optional[str] = None) -> bool:
    """Whether ``step`` of ``layer`` is read from a recorded summary (FINAL: the last one, for a run the app
    cannot rebuild)."""
    if not is_recorded(run, layer):
        return False
    return int(step) in dict(run.summaries) or (int(step) == FINAL and not live(run))


# ============================================================================ reading
def summary(path: str, mtime_ns: int) -> Summary:
    """A recorded summary file (shared, read-only; keyed by its modification time: a resumed run that
    rewrote a step is read again), cached within ``BUDGET_MB["summaries"]``: one step of every layer of a
    ResNet-20 at 2,048 values per channel is ~8 MB."""
    out = _summary(path, int(mtime_ns))
    S.BUDGETS[SUMMARY_BUDGET].note(_summary, (path, int(mtime_ns)), out)
    return out


@st.cache_resource(max_entries=256, ttl=S.TTL, show_spinner=False)
def _summary(path: str, mtime_ns: int) -> Summary:
    return read_summary(path)


def _summary_of(run: Run, step: int) -> Summary:
    paths = dict(run.summaries)
    if int(step) == FINAL:
        step = run.summaries[-1][0]
    p = paths[int(step)]
    try:
        mtime = p.stat().st_mtime_ns
    except OSError:
        raise ValueError(f"the summary of step {step} of run {run.path.name} is gone (was the run resumed "
                         f"and purged?); press Reload runs") from None
    return summary(str(p), mtime)


def activations(run_path: str, dev: str, step: int, layer: str, size: int, seed: int,
                context_mode: str = "predicted", every_position: bool = False) -> dict:
    """What ``layer`` saw and gave at ``step`` (cached within ``BUDGET_MB["source_activations"]``; see
    :func:`_activations`). ``every_position``: the caller needs every value of every position (unpooled
    features), which only a rebuilt model gives."""
    args = (run_path, dev, int(step), layer, int(size), int(seed), context_mode, bool(every_position))
    out = _activations(*args)
    S.BUDGETS[BUDGET].note(_activations, args, out)
    return out


@st.cache_resource(max_entries=128, ttl=S.TTL, show_spinner=False)
def _activations(run_path: str, dev: str, step: int, layer: str, size: int, seed: int,
                 context_mode: str = "predicted", every_position: bool = False) -> dict:
    """A dict read through :func:`values`, :func:`features`, :func:`mixture`, with "labels", "indices",
    "contexts" (true superclass), "predictions", "components" (per sample, or None), "layer" (layer_info),
    "recorded" (bool), "step", "n" (samples), "points" (values per channel), "nonfinite" {view: count} and
    "note" (where the values come from). Arrays are read-only (shared by every session)."""
    run = S.get_run(run_path, dev)
    info = S.layer_info(run, layer)
    if every_position and not live(run):
        raise ValueError("every value of every position needs the model, and " + live_reason(run)[0].lower()
                         + live_reason(run)[1:] + " Recorded steps keep each input's channel means: use those.")
    if recorded(run, step, layer) and context_mode == "predicted" and not every_position:
        s = _summary_of(run, step)
        if layer not in s.layers():
            raise ValueError(f"layer {layer!r} was not recorded at step {s.step} of {run.path.name} (recorded: "
                             f"{s.layers()})")
        vals = {v: s.values(layer, v) for v in analysis.VIEWS}
        feats = {}
        for v in analysis.VIEWS:
            try:
                feats[v] = s.features(layer, v)
            except ValueError:
                feats[v] = None
        labels = s.array("labels")
        ctx = s.array("context")
        out = {"values": vals, "acts": None, "features": feats, "labels": labels,
               "indices": None if labels is None else np.arange(len(labels)),
               "contexts": ctx if ctx is not None else (A.true_contexts(run, labels) if labels is not None
                                                         and run.contexts.get("label_derived") else None),
               "predictions": s.array("predictions"), "components": s.components(layer),
               "mixture": s.mixture(layer), "layer": info, "recorded": True, "step": s.step,
               "n": int(next(iter(feats.values())).shape[0]) if feats.get("output") is not None else 0,
               "points": int(vals["input"].shape[1]), "nonfinite": s.nonfinite(layer),
               "note": f"the recorded probe batch at step {s.step}"}
    else:
        if not live(run):
            have = steps(run)
            raise ValueError(f"run {run.path.name} has no recorded summary at step {step} (recorded steps: "
                             f"{have}) and its model cannot be rebuilt to compute one" if run.summaries else
                             f"run {run.path.name} holds no recorded summaries and its model cannot be rebuilt: "
                             f"nothing to show (record it with cbnorm.watch)")
        out = _live(run, step, layer, size, seed, context_mode, info)
    arrays = [*out["values"].values(), *(out["acts"] or {}).values(), *out["features"].values(),
              *(out["mixture"] or ())]
    arrays += [out[k] for k in ("labels", "indices", "contexts", "predictions", "components")]
    for v in arrays:
        if isinstance(v, np.ndarray):
            v.flags.writeable = False
    return out


def _live(run: Run, step: int, layer: str, size: int, seed: int, context_mode: str, info: dict) -> dict:
    x, idx, labels = A.test_batch(run, size, seed)
    ctx_true = A.true_contexts(run, labels)
    context = None
    if context_mode == "true":
        if not run.uses_context:
            raise ValueError("this run has no context layer; 'true context' does not apply")
        if ctx_true is None:
            raise ValueError("this run's contexts are not derived from the labels; no true context to give")
        context = torch.as_tensor(ctx_true, dtype=torch.long, device=run.device)
    elif context_mode != "predicted":
        raise ValueError(f"context_mode must be 'predicted' or 'true', got {context_mode!r}")
    if int(step) == FINAL:
        model, shared = run.model, True
    else:
        model, shared = run.load_snapshot(int(step)), False
    cap, logits = A.capture(run, model, x, layer, context, shared=shared)
    module = cap.module
    acts = {"input": cap.input.numpy(), "x_hat": cap.x_hat.numpy(), "output": cap.output.numpy()}
    mixture = None
    if info["has_mixture"]:
        mixture = tuple(t.detach().double().cpu().numpy() for t in module.channel_mixture_parameters())
    feats = {v: analysis.flatten_features(torch.from_numpy(a), pool=True, channel_last=info["channel_last"])
             for v, a in acts.items()}
    nonfinite = {v: int((~np.isfinite(a)).sum()) for v, a in acts.items()}
    return {"values": {}, "acts": acts, "features": feats, "labels": np.asarray(labels), "indices": np.asarray(idx),
            "contexts": ctx_true, "predictions": None if logits is None else logits.argmax(1).numpy(),
            "components": analysis.mixture_assignments(module, cap.input.to(run.device)), "mixture": mixture,
            "layer": info, "recorded": False, "step": int(step), "n": int(x.shape[0]),
            "points": int(np.prod(acts["input"].shape) // max(1, info["num_features"])), "nonfinite": nonfinite,
            "note": f"{x.shape[0]} {'latent vectors' if run.config.get('task') == 'gan' else 'test images'} drawn "
                    f"with seed {seed}, run through "
                    f"{'the final weights' if int(step) == FINAL else f'the snapshot of step {step}'}"}


# ============================================================================ reading a source record
def values(rec: dict, view: str, channels: Optional[Sequence[int]] = None) -> np.ndarray:
    """(G, M) float64 values of ``view`` ("input" | "x_hat" | "output") of ``channels`` (default all)."""
    if view not in analysis.VIEWS:
        raise ValueError(f"view must be one of {analysis.VIEWS}, got {view!r}")
    c = rec["layer"]["num_features"]
    chans = list(range(c)) if channels is None else [int(ch) for ch in channels]
    bad = [ch for ch in chans if not 0 <= ch < c]
    if bad:
        raise ValueError(f"channels {bad} out of range [0, {c - 1}]")
    if rec["acts"] is None:
        return rec["values"][view][chans].astype(np.float64)
    return analysis.channel_values(_tensor(rec["acts"][view]), chans,
                                   channel_last=rec["layer"]["channel_last"])


def features(rec: dict, view: str, pool: bool = True) -> np.ndarray:
    """(N, F) per-sample features of ``view``: channel means (``pool``), or every value of every position
    (only where the activations were computed here, not for recorded steps)."""
    if pool:
        f = rec["features"].get(view)
        if f is None:
            raise ValueError(f"the {view} of layer {rec['layer']['name']} was recorded without per-sample means")
        return f
    if rec["acts"] is None:
        raise ValueError("recorded steps keep each sample's channel means, not every position: choose the "
                         "channel means (pool)")
    return analysis.flatten_features(_tensor(rec["acts"][view]), pool=False,
                                     channel_last=rec["layer"]["channel_last"])


def mixture(rec: dict, channels: Sequence[int]) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The layer's own mixture on ``channels``: weights, means, variances (G, K); None without one."""
    if rec["mixture"] is None:
        return None
    ch = np.asarray([int(c) for c in channels])
    return tuple(np.asarray(a)[:, ch].T for a in rec["mixture"])  # type: ignore[return-value]

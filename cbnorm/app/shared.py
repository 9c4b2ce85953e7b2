"""What the Streamlit pages call: bounded caches of runs, data, activations and projections, the shared
sidebar selection, and the error guard. Pages hold widgets and plots only; every number comes from here,
which in turn calls ``cbnorm.runs`` / ``probe`` / ``analysis``.

Caching rules (the app serves several sessions from one process):

* ``st.cache_resource`` (shared objects, never copied): loaded runs (their models), test sets, per-snapshot
  features. Nothing here mutates them: models stay in eval mode and are only run under ``probe.capture``
  (forward hooks, no state change; a per-run lock keeps two sessions' hooks apart), snapshots are loaded
  as NEW models (``Run.load_snapshot``), arrays are made read-only.
* ``st.cache_data`` (copied per call): activations, histogram panels, projections, tables — keyed by every
  parameter that changes them, so moving a slider or changing a colour never recomputes a projection.
* Every cache has ``max_entries`` and ``ttl``; the sidebar's "Reload runs" button clears them all.
* The three caches whose entries can be large (snapshot features, layer activations, histogram panels) also
  have a budget in bytes (``BUDGET_MB``): one entry of snapshot features is 4 MB for conv3 of the committed
  runs at 1,000 test images but 48 MB for conv1 (240 MB at 5,000), so ``max_entries`` alone bounds nothing
  useful. Least recently used entries beyond the budget are dropped. What the cluster-evolution page needs
  on every rerun (predictions, components) is cached apart, so dropped features cost only new projections.

The runs directory is ``$CBNORM_RUNS`` (default: ``checkpoints/`` next to ``app.py``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import streamlit as st
import torch

from cbnorm import analysis, probe
from cbnorm.runs import Run, load_run

log = logging.getLogger("cbnorm.app")

RUNS_ENV = "CBNORM_RUNS"
_APP_DIR = [Path(__file__).resolve().parents[2]]
TTL = 3600  # seconds
#: cap on the values of one channel kept for histograms / stats (a notice says when it applies)
MAX_VALUES = 50_000
#: byte budgets of the caches whose entries can be large (see the module docstring)
BUDGET_MB = {"snapshot_features": 64, "layer_activations": 48, "histogram_panel": 24}


def _nbytes(obj: Any) -> int:
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim; nothing elsewhere). Arrays of a few
    MB to a few tens of MB live on the heap once glibc has raised its mmap threshold, and without a trim
    the memory of dropped cache entries stays in the process."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


@st.cache_resource(max_entries=1, ttl=7 * 24 * 3600, show_spinner=False)
def heap_janitor(every_s: float = 15.0) -> threading.Thread:
    """A daemon thread that gives the heap memory freed by finished script runs back to the system every
    ``every_s`` seconds (:func:`_trim_heap`). Each session's runs allocate and free arrays of many sizes in
    their own threads, and glibc keeps what they free in per-thread arenas: a server that has served 10
    sessions for 5 minutes held ~70-150 MB of such free memory (bench/load.py measures it with gdb)."""
    def work():
        while True:
            time.sleep(every_s)
            _trim_heap()

    t = threading.Thread(target=work, name="cbnorm-heap-janitor", daemon=True)
    t.start()
    return t


class _ByteBudget:
    """Least-recently-used byte accounting of one cached function: after each call, the entries beyond
    ``BUDGET_MB[name]`` are cleared from the function's cache (``func.clear(*args)``), oldest first; the newest
    entry and pinned entries (the snapshots of a projection being computed, :meth:`pinned`) always stay, so
    the budget can be exceeded while a projection needs more. Entries Streamlit dropped itself (max_entries,
    ttl) may still be counted, which only makes the budget stricter."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.entries: OrderedDict[tuple, int] = OrderedDict()
        self.pins: dict[tuple, int] = {}
        self.func = None
        self.lock = threading.Lock()

    def note(self, func, args: tuple, value: Any) -> None:
        self.func = func
        with self.lock:
            self.entries[args] = _nbytes(value)
            self.entries.move_to_end(args)
        self._shrink(keep=args)

    def _shrink(self, keep: Optional[tuple] = None) -> None:
        limit = BUDGET_MB[self.name] * 2 ** 20
        drop = []
        with self.lock:
            total = sum(self.entries.values())
            for key in list(self.entries):
                if total <= limit:
                    break
                if key == keep or self.pins.get(key):
                    continue
                total -= self.entries.pop(key)
                drop.append(key)
        for key in drop:
            self.func.clear(*key)
        if drop:
            _trim_heap()

    @contextmanager
    def pinned(self, keys: Sequence[tuple]):
        keys = list(keys)
        with self.lock:
            for k in keys:
                self.pins[k] = self.pins.get(k, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                for k in keys:
                    self.pins[k] -= 1
                    if not self.pins[k]:
                        del self.pins[k]
            if self.func is not None:
                self._shrink()

    def total(self) -> int:
        with self.lock:
            return sum(self.entries.values())

    def reset(self) -> None:
        with self.lock:
            self.entries.clear()


_BUDGETS = {name: _ByteBudget(name) for name in BUDGET_MB}
#: projections (EvolutionParams key, steps) computed in this process: their reruns skip the feature passes
_PROJECTED: OrderedDict[tuple, None] = OrderedDict()
_PROJECTED_LOCK = threading.Lock()


def cache_bytes() -> dict[str, int]:
    """Bytes held (as counted) by each budgeted cache."""
    return {name: b.total() for name, b in _BUDGETS.items()}


# ============================================================================ where, on what
def set_app_dir(path: os.PathLike | str) -> None:
    """The folder of app.py: default runs directory ``<app dir>/checkpoints``, benchmarks in
    ``<app dir>/bench/results``."""
    _APP_DIR[0] = Path(path)


def runs_root() -> Path:
    """``$CBNORM_RUNS`` when set, else ``checkpoints/`` next to app.py."""
    env = os.environ.get(RUNS_ENV)
    return Path(env).expanduser() if env else _APP_DIR[0] / "checkpoints"


def bench_dir() -> Path:
    return _APP_DIR[0] / "bench" / "results"


def device() -> str:
    """"cuda" when a CUDA device is available, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_label() -> str:
    if device() == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(0)})"
    return f"CPU ({torch.get_num_threads()} torch threads)"


# ============================================================================ page frame
def page_setup() -> None:
    """Call first in every page script. With a ``pages/`` folder next to app.py, Streamlit starts each server
    process in its legacy multipage mode and runs a deep-linked page (e.g. a browser tab reloading
    /Cluster_Evolution after a restart) on its own, without app.py's frame (page config, sidebar, selection),
    until some session has run app.py's ``st.navigation``. Switch the process to app.py's navigation and
    rerun, so the page runs inside the frame."""
    from streamlit.runtime.pages_manager import PagesManager

    heap_janitor()
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


# ============================================================================ errors
@contextmanager
def guard(what: str = ""):
    """Show any exception raised inside as ``st.error`` with its message (never a traceback); Streamlit's
    own control flow (st.stop, st.rerun) passes through. The traceback goes to the server log.
    Also puts a page opened on its own back into app.py's frame (:func:`page_setup`)."""
    page_setup()
    try:
        yield
    except Exception as err:  # noqa: BLE001 - the app must stay up and say what went wrong
        log.warning("%s failed", what or "page", exc_info=True)
        prefix = f"{what}: " if what else ""
        st.error(f"{prefix}{err}" if str(err) else f"{prefix}{type(err).__name__}")


def clear_caches() -> None:
    """Forget every cached run, dataset, activation and projection (the "Reload runs" button)."""
    st.cache_data.clear()
    st.cache_resource.clear()
    for b in _BUDGETS.values():
        b.reset()
    with _PROJECTED_LOCK:
        _PROJECTED.clear()


# ============================================================================ runs
def _run_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.json").exists())


@st.cache_resource(max_entries=32, ttl=TTL, show_spinner="Loading run…")
def get_run(path: str, dev: str) -> Run:
    """A loaded run (model in eval mode on ``dev``), shared by every session: read-only."""
    return load_run(path, device=dev)


@st.cache_resource(max_entries=64, ttl=TTL, show_spinner=False)
def _model_lock(path: str, dev: str) -> threading.Lock:
    return threading.Lock()


def _mean(values: Sequence[Any]) -> Optional[float]:
    v = [float(x) for x in values if isinstance(x, (int, float)) and math.isfinite(float(x))]
    return sum(v) / len(v) if v else None


def _summary(path: Path, run: Optional[Run], error: Optional[str]) -> dict:
    out: dict[str, Any] = {"name": path.name, "path": str(path), "ok": run is not None, "error": error}
    if run is None:
        return out
    cfg, m = run.config, run.metrics
    epochs = [e for e in m.get("epochs", []) if isinstance(e, dict)]
    out.update(
        task=cfg.get("task", "classify"), norm=run.norm, model=cfg["model"]["name"],
        dataset=(cfg.get("dataset") or {}).get("name", "?"), layers=list(cfg.get("layers") or []),
        contexts=(cfg.get("contexts") or {}).get("spec", "none"), uses_context=run.uses_context,
        test_acc=m.get("test_acc"), test_acc_oracle=m.get("test_acc_oracle"), test_acc_mixed=m.get("test_acc_mixed"),
        best_test_acc=m.get("best_test_acc"), params=m.get("params"), epochs=m.get("epochs_done", len(epochs)),
        steps=m.get("steps_done"), snapshots=len(run.snapshots),
        time_per_step_s=_mean([e.get("time_per_step_s") for e in epochs]))
    return out


@st.cache_data(max_entries=8, ttl=600, show_spinner="Reading runs…")
def inventory(root: str, dev: str) -> list[dict]:
    """One summary per run directory under ``root`` (those holding config.json): loaded runs with their
    norm, dataset and accuracies; damaged ones with ``ok`` False and the loader's message in ``error``."""
    out = []
    for p in _run_dirs(Path(root)):
        try:
            out.append(_summary(p, get_run(str(p), dev), None))
        except Exception as err:  # noqa: BLE001 - a damaged run is listed with its message
            out.append(_summary(p, None, str(err) or type(err).__name__))
    return out


def runs_overview() -> list[dict]:
    return inventory(str(runs_root()), device())


def classify_runs() -> list[dict]:
    """Runs the classification pages can show: loadable with task "classify", plus damaged ones (so that
    choosing one shows its error)."""
    return [r for r in runs_overview() if not r["ok"] or r.get("task") == "classify"]


def run_by_name(name: str) -> Run:
    """The cached run named ``name`` in the runs directory; ``ValueError`` with the loader's message."""
    path = runs_root() / name
    if not (path / "config.json").exists():
        raise ValueError(f"run {name!r} not found in {runs_root()}")
    return get_run(str(path), device())


def _is_studied(run: Run, name: str) -> bool:
    """A layer is studied when config "layers" names it (e.g. "conv3" for "blocks.conv3.norm")."""
    parts = name.split(".")
    return any(l == name or l in parts for l in run.config.get("layers") or [])


def layer_choices(run: Run) -> list[str]:
    """The run's normalization layers, the studied one(s) (config "layers") first."""
    names = probe.layer_names(run.model)
    studied = [n for n in names if _is_studied(run, n)]
    if not studied:  # fall back on the layers of the run's norm type
        modules = dict(run.model.named_modules())
        studied = [n for n in names if run.norm in getattr(type(modules[n]), "names", ())]
    return studied + [n for n in names if n not in studied]


def layer_label(run: Run, name: str) -> str:
    """Short label for the layer picker: "conv3 · acn (studied)"."""
    m = dict(run.model.named_modules())[name]
    kind = getattr(type(m), "names", ("?",))[0]
    short = name[len("blocks."):] if name.startswith("blocks.") else name
    short = short[:-len(".norm")] if short.endswith(".norm") else short
    return f"{short} · {kind}" + (" (studied)" if _is_studied(run, name) else "")


def studied_layer(run: Run) -> str:
    choices = layer_choices(run)
    if not choices:
        raise ValueError(f"run {run.path.name} has no cbnorm normalization layer to probe")
    return choices[0]


def layer_info(run: Run, name: str) -> dict:
    m = dict(run.model.named_modules()).get(name)
    if m is None:
        raise ValueError(f"run {run.path.name} has no layer {name!r}; layers: {layer_choices(run)}")
    kind = getattr(type(m), "names", ("?",))[0]
    k = getattr(m, "num_components", None) or getattr(m, "num_contexts", None)
    return {"name": name, "kind": kind, "class": type(m).__name__, "has_mixture": bool(getattr(m, "has_mixture", False)),
            "uses_context": bool(getattr(m, "uses_context", False)), "num_components": k,
            "channel_last": bool(getattr(m, "channel_last", False)), "num_features": int(m.num_features),
            "has_components": hasattr(m, "posteriors") or hasattr(m, "gates")}


def set_flag(name: str) -> None:
    """Button callback: set ``st.session_state[name] = True`` (read, and cleared, by the page)."""
    st.session_state[name] = True


def next_seed() -> None:
    """Button callback: draw a new minibatch (seed + 1)."""
    st.session_state["seed"] = int(st.session_state.get("seed", 0) or 0) + 1


def selection() -> dict:
    """The shared sidebar selection (run name, layer, seed) from ``st.session_state``."""
    ss = st.session_state
    return {"run": ss.get("run"), "layer": ss.get("layer"), "seed": int(ss.get("seed", 0) or 0)}


def selected_layer(sel: dict) -> tuple[Run, str, dict]:
    """(run, layer name, layer info) of the sidebar selection; warns and stops the page when no run exists."""
    if not sel["run"]:
        st.warning("No run to show: see the Home page.")
        st.stop()
    run = run_by_name(sel["run"])
    layer = sel["layer"] or studied_layer(run)
    return run, layer, layer_info(run, layer)


# ============================================================================ data
@st.cache_resource(max_entries=4, ttl=TTL, show_spinner="Loading the test set…")
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


def pick_channels(num_channels: int, count: int, seed: int) -> list[int]:
    """A random subset of ``count`` channels (sorted), drawn with ``seed``."""
    count = int(min(max(1, count), num_channels))
    rng = np.random.default_rng(int(seed) + 7919)
    return sorted(int(c) for c in rng.choice(num_channels, size=count, replace=False))


def _dataset_name(run: Run) -> str:
    name = (run.config.get("dataset") or {}).get("name")
    if not name:
        raise ValueError(f"run {run.path.name} does not name its dataset in config.json")
    return name


def _batch(run: Run, size: int, seed: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    ds = test_data(_dataset_name(run))
    idx = sample_indices(len(ds), size, seed)
    return run.preprocess(np.asarray(ds.images[idx])), idx, np.asarray(ds.labels[idx])


def true_contexts(run: Run, labels: np.ndarray) -> Optional[np.ndarray]:
    """The label-derived context (superclass) of each label, or None when contexts are not label-derived."""
    if not run.contexts.get("label_derived"):
        return None
    return run.context_of(labels).cpu().numpy()


def _capture(run: Run, model: torch.nn.Module, x: torch.Tensor, layer: str, context=None, shared: bool = True):
    """(capture of ``layer``, logits) in one forward pass (a hook on the head gives the logits)."""
    names = [layer] + (["head"] if "head" in dict(model.named_modules()) else [])
    lock = _model_lock(str(run.path), device()) if shared else None
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
    """Input and output of ``layer`` on a minibatch (cached within ``BUDGET_MB["layer_activations"]``; see
    :func:`_layer_activations`)."""
    args = (run_path, dev, layer, int(size), int(seed), context_mode)
    out = _layer_activations(*args)
    _BUDGETS["layer_activations"].note(_layer_activations, args, out)
    return out


@st.cache_data(max_entries=32, ttl=TTL, show_spinner=False)
def _layer_activations(run_path: str, dev: str, layer: str, size: int, seed: int, context_mode: str = "predicted"
                       ) -> dict:
    """Input and output of ``layer`` on a minibatch of ``size`` test images drawn with ``seed``.

    ``context_mode``: "predicted" (honest: the model infers the context — its context predictor, or CN+
    mixing) or "true" (the label-derived superclass, an oracle). Returns numpy arrays: input, output
    (N, C, *S), indices, labels, predictions, contexts (true superclass or None), components (per-sample
    mixture component / context under the layer, or None) and ``layer`` (layer_info)."""
    run = get_run(run_path, dev)
    info = layer_info(run, layer)
    x, idx, labels = _batch(run, size, seed)
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
    cap, logits = _capture(run, run.model, x, layer, context)
    comps = analysis.sample_components(cap.module, cap.input.to(run.device))
    return {"input": cap.input.numpy(), "output": cap.output.numpy(), "indices": idx, "labels": labels,
            "predictions": None if logits is None else logits.argmax(1).numpy(), "contexts": ctx_true,
            "components": comps, "layer": info}


def _channel_values(acts: np.ndarray, channels: Sequence[int], channel_last: bool, seed: int) -> tuple[np.ndarray, bool]:
    v = analysis.channel_values(torch.from_numpy(np.ascontiguousarray(acts)), channels, channel_last=channel_last)
    if v.shape[1] > MAX_VALUES:
        keep = np.sort(np.random.default_rng(seed).choice(v.shape[1], MAX_VALUES, replace=False))
        return v[:, keep], True
    return v, False


def component_names(run: Run, info: dict, k: int) -> list[str]:
    if info["uses_context"] and len(run.context_names) == k:
        return [f"context {n}" for n in run.context_names]
    return [f"component {i + 1}" for i in range(k)]


def histogram_panel(run_path: str, dev: str, layer: str, size: int, seed: int, context_mode: str,
                    channels: tuple[int, ...], k: int) -> dict:
    """The histogram page's panel (cached within ``BUDGET_MB["histogram_panel"]``; see :func:`_histogram_panel`)."""
    args = (run_path, dev, layer, int(size), int(seed), context_mode, tuple(int(c) for c in channels), int(k))
    out = _histogram_panel(*args)
    _BUDGETS["histogram_panel"].note(_histogram_panel, args, out)
    return out


@st.cache_data(max_entries=64, ttl=TTL, show_spinner=False)
def _histogram_panel(run_path: str, dev: str, layer: str, size: int, seed: int, context_mode: str,
                     channels: tuple[int, ...], k: int) -> dict:
    """Everything the histogram page draws for the chosen channels: input and output values (G, M), the
    input mixture (the layer's own parameters when it has a mixture, else a K-component fit with
    cbnorm.gmm), a K-component fit of the output, and normality statistics of input and output."""
    run = get_run(run_path, dev)
    acts = layer_activations(run_path, dev, layer, size, seed, context_mode)
    info = acts["layer"]
    vin, sub_in = _channel_values(acts["input"], channels, info["channel_last"], seed)
    vout, sub_out = _channel_values(acts["output"], channels, info["channel_last"], seed)
    if info["has_mixture"]:
        module = dict(run.model.named_modules())[layer]
        w, m, v = analysis.layer_channel_mixtures(module, channels)
        source = f"the layer's own {info['class']} parameters"
        names = component_names(run, info, w.shape[1])
        if info["kind"] == "mn":
            module_k = int(info["num_components"] or 1)
            names = [f"fit {i // module_k + 1} · component {i % module_k + 1}" for i in range(w.shape[1])]
            source += (f" — the inference mixture of eq. 38 over the {w.shape[1] // module_k} queued minibatch "
                       f"fits of {module_k} components each")
    else:
        kk = int(min(k, vin.shape[1]))
        w, m, v = analysis.fit_channel_mixtures(vin, kk, seed=seed)
        source = f"a {kk}-component GMM fitted per channel with cbnorm.gmm"
        names = [f"component {i + 1}" for i in range(kk)]
    kk = int(min(k, vout.shape[1]))
    wo, mo, vo = analysis.fit_channel_mixtures(vout, kk, seed=seed)
    return {"channels": list(channels), "input": vin, "output": vout, "mix_in": (w, m, v), "names_in": names,
            "source_in": source, "mix_out": (wo, mo, vo), "names_out": [f"component {i + 1}" for i in range(kk)],
            "stats_in": analysis.normality_stats(vin), "stats_out": analysis.normality_stats(vout),
            "subsampled": sub_in or sub_out, "points_per_channel": int(vin.shape[1]), "layer": info}


def stats_table(panel: dict):
    """Per-channel normality statistics of input and output as a DataFrame."""
    import pandas as pd

    si, so = panel["stats_in"], panel["stats_out"]
    return pd.DataFrame({
        "channel": panel["channels"],
        "skew in": si["skewness"], "skew out": so["skewness"],
        "ex. kurt in": si["excess_kurtosis"], "ex. kurt out": so["excess_kurtosis"],
        "KS in": si["ks_to_normal"], "KS out": so["ks_to_normal"], "W1 out": so["w1_to_normal"],
        "mean out": so["mean"], "std out": so["std"]})


STATS_HELP = {
    "skew in": "skewness of the layer's input (0 for a symmetric distribution)",
    "skew out": "skewness of the layer's output",
    "ex. kurt in": "excess kurtosis of the input (0 for a Gaussian; > 0 heavy tails)",
    "ex. kurt out": "excess kurtosis of the output",
    "KS in": "Kolmogorov-Smirnov distance between the input values and N(0, 1)",
    "KS out": "Kolmogorov-Smirnov distance between the output values and N(0, 1)",
    "W1 out": "1-Wasserstein distance between the output values and N(0, 1)",
    "mean out": "mean of the output", "std out": "standard deviation of the output"}


def stats_summary(panel: dict) -> list[dict]:
    """Median over the shown channels of |skewness|, |excess kurtosis| and the KS distance to N(0, 1), for
    the output with the change from the input: [{label, value, delta, help}] for st.metric."""
    si, so = panel["stats_in"], panel["stats_out"]
    med = lambda a: float(np.median(np.abs(a)))  # noqa: E731
    out = []
    for key, label, what in (("skewness", "median |skewness|", "0 for a symmetric distribution"),
                             ("excess_kurtosis", "median |excess kurtosis|", "0 for a Gaussian"),
                             ("ks_to_normal", "median KS distance to N(0,1)", "0 when the values follow N(0, 1)")):
        a, b = med(si[key]), med(so[key])
        out.append({"label": f"{label} (output)", "value": f"{b:.3f}", "delta": f"{b - a:+.3f} vs input",
                    "help": f"Median over the shown channels; {what}. Input: {a:.3f}."})
    return out


def subtitle_stats(panel: dict) -> list[str]:
    so = panel["stats_out"]
    return [f"channel {c}<br><span style='font-size:10px'>skew {s:+.2f} · ex. kurt {k:+.2f} · KS {d:.2f}</span>"
            for c, s, k, d in zip(panel["channels"], so["skewness"], so["excess_kurtosis"], so["ks_to_normal"])]


# ============================================================================ cluster evolution
@dataclass(frozen=True)
class EvolutionParams:
    """What a cluster-evolution projection depends on (its cache key)."""

    run: str  # run directory path
    layer: str
    size: int
    seed: int
    which: str = "output"  # "input" | "output" of the layer
    pool: bool = False  # channel means instead of flattened activations
    method: str = "pca"
    perplexity: float = 30.0
    learning_rate: float | str = "auto"
    n_neighbors: int = 15
    min_dist: float = 0.1
    refine_iters: int = 100
    first_iters: int = 400
    max_snapshots: int = 0  # 0 = every snapshot

    def key(self) -> tuple:
        return tuple(asdict(self).values())


def evolution_steps(run: Run, max_snapshots: int = 0) -> list[int]:
    """The snapshot steps to show: all, or ``max_snapshots`` evenly spread (first and last kept)."""
    steps = [s for s, _ in run.snapshots]
    if not steps:
        raise ValueError(f"run {run.path.name} has no snapshots (train with --snapshot-every to get them)")
    if max_snapshots and 2 <= max_snapshots < len(steps):
        pick = np.unique(np.round(np.linspace(0, len(steps) - 1, max_snapshots)).astype(int))
        steps = [steps[i] for i in pick]
    return steps


@st.cache_data(max_entries=16, ttl=TTL, show_spinner=False)
def evolution_sample(run_path: str, dev: str, size: int, seed: int) -> dict:
    """The fixed sample of the cluster-evolution page: indices, labels, true contexts."""
    run = get_run(run_path, dev)
    ds = test_data(_dataset_name(run))
    idx = sample_indices(len(ds), size, seed)
    labels = np.asarray(ds.labels[idx])
    return {"indices": idx, "labels": labels, "contexts": true_contexts(run, labels), "total": len(ds)}


def _feature_key(run_path: str, dev: str, step: int, layer: str, size: int, seed: int, which: str,
                 pool: bool) -> tuple:
    return (run_path, dev, int(step), layer, int(size), int(seed), which, bool(pool))


def snapshot_features(run_path: str, dev: str, step: int, layer: str, size: int, seed: int, which: str,
                      pool: bool) -> dict:
    """Features of ``layer`` at snapshot ``step`` (cached within ``BUDGET_MB["snapshot_features"]``; see
    :func:`_snapshot_features`)."""
    args = _feature_key(run_path, dev, step, layer, size, seed, which, pool)
    out = _snapshot_features(*args)
    _BUDGETS["snapshot_features"].note(_snapshot_features, args, out)
    return out


@st.cache_data(max_entries=512, ttl=TTL, show_spinner=False)
def snapshot_summary(run_path: str, dev: str, step: int, layer: str, size: int, seed: int, which: str,
                     pool: bool) -> dict:
    """What the evolution page shows of a snapshot besides the projection (small, kept apart from the
    features): predictions, mixture components and the number of features."""
    f = snapshot_features(run_path, dev, step, layer, size, seed, which, pool)
    return {"predictions": f["predictions"], "components": f["components"],
            "feature_dim": int(f["features"].shape[1])}


@st.cache_resource(max_entries=48, ttl=1800, show_spinner=False)
def _snapshot_features(run_path: str, dev: str, step: int, layer: str, size: int, seed: int, which: str,
                       pool: bool) -> dict:
    """Features (N, F) of ``layer`` at snapshot ``step`` on the fixed sample, the predictions and the
    per-sample mixture components at that step. Loads the snapshot as a NEW model (the cached run's model
    is untouched); arrays are read-only (shared)."""
    run = get_run(run_path, dev)
    x, _, _ = _batch(run, size, seed)
    model = run.load_snapshot(step)
    cap, logits = _capture(run, model, x, layer, None, shared=False)
    acts = cap.output if which == "output" else cap.input
    feats = analysis.flatten_features(acts, pool=pool, channel_last=bool(getattr(cap.module, "channel_last", False)))
    comps = analysis.sample_components(cap.module, cap.input.to(run.device))
    out = {"features": feats, "predictions": None if logits is None else logits.argmax(1).numpy(),
           "components": comps}
    for v in out.values():
        if isinstance(v, np.ndarray):
            v.flags.writeable = False
    return out


def _feature_args(p: EvolutionParams) -> tuple:
    return (p.run, device(), p.layer, p.size, p.seed, p.which, p.pool)


@st.cache_resource(max_entries=16, ttl=TTL, show_spinner=False)
def _reducer(run_path: str, dev: str, layer: str, size: int, seed: int, which: str, pool: bool, last_step: int
             ) -> analysis.Reducer:
    """PCA to 50 dimensions fitted on the last snapshot's features (t-SNE / UMAP input)."""
    last = snapshot_features(run_path, dev, last_step, layer, size, seed, which, pool)["features"]
    return analysis.fit_reducer(last, 50, seed)


@st.cache_data(max_entries=256, ttl=TTL, show_spinner=False)
def _embedding_at(key: tuple, steps: tuple[int, ...], i: int) -> tuple[np.ndarray, dict]:
    """Snapshot i's 2-D embedding, warm-started from snapshot i-1's (itself cached)."""
    p = EvolutionParams(*key)
    prev = _embedding_at(key, steps, i - 1)[0] if i > 0 else None
    run_path, dev, layer, size, seed, which, pool = _feature_args(p)
    reduce = _reducer(run_path, dev, layer, size, seed, which, pool, steps[-1])
    x = reduce(snapshot_features(run_path, dev, steps[i], layer, size, seed, which, pool)["features"])
    return analysis.embed_step(x, prev, p.method, perplexity=p.perplexity, learning_rate=p.learning_rate,
                               n_neighbors=p.n_neighbors, min_dist=p.min_dist, seed=p.seed,
                               first_iters=p.first_iters, refine_iters=p.refine_iters)


def _prefetch_features(p: EvolutionParams, steps: Sequence[int]) -> threading.Thread:
    """Compute (and cache) the features of ``steps`` in a background thread, so that the model runs of the
    next snapshots overlap the projection of the current one (torch and openTSNE release the GIL). The main
    thread asks the same cache and waits on its per-key lock when a snapshot is still being computed."""
    from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx

    run_path, dev, layer, size, seed, which, pool = _feature_args(p)

    def work():
        for s in steps:
            try:
                snapshot_features(run_path, dev, s, layer, size, seed, which, pool)
            except Exception:  # noqa: BLE001 - the main thread recomputes and reports it
                return

    t = threading.Thread(target=work, name="cbnorm-prefetch", daemon=True)
    ctx = get_script_run_ctx(suppress_warning=True)
    if ctx is not None:
        add_script_run_ctx(t, ctx)
    t.start()
    return t


@st.cache_data(max_entries=32, ttl=TTL, show_spinner=False)
def _pca_embedding(key: tuple, steps: tuple[int, ...]) -> tuple[list[np.ndarray], dict]:
    p = EvolutionParams(*key)
    run_path, dev, layer, size, seed, which, pool = _feature_args(p)
    feats = [snapshot_features(run_path, dev, s, layer, size, seed, which, pool)["features"] for s in steps]
    emb = analysis.embed_snapshots(feats, "pca", seed=p.seed)
    return emb.coords, emb.info


@st.cache_resource(max_entries=1, ttl=7 * 24 * 3600, show_spinner=False)
def umap_warmup(delay_s: float = 3.0) -> threading.Thread:
    """Compile UMAP's numba code once per process, in a background thread (started on first call, after
    ``delay_s`` so that the first page render does not share the CPU with the compiler)."""
    def work():
        try:
            time.sleep(delay_s)
            import umap

            rng = np.random.default_rng(0)
            umap.UMAP(n_neighbors=5, n_epochs=10, random_state=0, n_jobs=1).fit_transform(
                rng.random((60, 8), dtype=np.float32))
            umap.UMAP(n_neighbors=5, n_epochs=5, random_state=0, n_jobs=1,
                      init=rng.random((60, 2), dtype=np.float32)).fit_transform(rng.random((60, 8), dtype=np.float32))
        except Exception:  # noqa: BLE001 - a failed warm-up only means a slower first UMAP
            log.warning("UMAP warm-up failed", exc_info=True)

    t = threading.Thread(target=work, name="umap-warmup", daemon=True)
    t.start()
    return t


def evolution(p: EvolutionParams, progress: Optional[Callable[[float, str], None]] = None) -> dict:
    """The projection of every (chosen) snapshot, with colourings. Each stage is cached separately (features
    per snapshot; t-SNE/UMAP per snapshot, each warm-started from the previous), so a change of colour or
    snapshot reuses everything and a new perplexity reuses the features. For t-SNE/UMAP the features of the
    next snapshots are computed in the background while the current one is projected.
    ``progress(fraction, text)`` reports each stage."""
    run = get_run(p.run, device())
    steps = tuple(evolution_steps(run, p.max_snapshots))
    sample = evolution_sample(p.run, device(), p.size, p.seed)
    say = progress or (lambda f, t: None)
    n = len(steps)
    fa = _feature_args(p)
    if p.method not in ("pca", "tsne", "umap"):
        raise ValueError(f"method must be pca, tsne or umap, got {p.method!r}")
    done = (p.key(), steps) in _PROJECTED  # computed before: a rerun (colour, snapshot) needs no features
    with _BUDGETS["snapshot_features"].pinned([_feature_key(fa[0], fa[1], s, *fa[2:]) for s in steps]):
        if p.method == "pca":
            if not done:
                for i, s in enumerate(steps):
                    say(0.85 * i / n, f"activations at step {s} ({i + 1}/{n})")
                    snapshot_features(fa[0], fa[1], s, *fa[2:])
                say(0.85, "PCA")
            coords, info = _pca_embedding(p.key(), steps)
        else:
            name = {"tsne": "t-SNE", "umap": "UMAP"}[p.method]
            if p.method == "umap":
                say(0.0, "waiting for UMAP's one-time compilation")
                umap_warmup().join()
            prefetch = None if done else _prefetch_features(p, (steps[-1],) + steps[:-1])
            coords, info = [], {}
            for i, s in enumerate(steps):
                say(i / n, f"{name} at step {s} ({i + 1}/{n}): activations, then projection")
                c, info = _embedding_at(p.key(), steps, i)
                coords.append(c)
            if prefetch is not None:
                prefetch.join()
        feats = [snapshot_summary(fa[0], fa[1], s, *fa[2:]) for s in steps]  # cached apart: no features needed
    with _PROJECTED_LOCK:
        _PROJECTED[(p.key(), steps)] = None
        while len(_PROJECTED) > 512:
            _PROJECTED.popitem(last=False)
    say(1.0, "done")
    xlim, ylim = analysis.embedding_limits(coords)
    return {"steps": list(steps), "coords": coords, "xlim": xlim, "ylim": ylim, "info": info,
            "labels": sample["labels"], "contexts": sample["contexts"], "indices": sample["indices"],
            "total": sample["total"], "predictions": [f["predictions"] for f in feats],
            "components": [f["components"] for f in feats], "feature_dim": feats[0]["feature_dim"],
            "method": p.method}


def colourings(run: Run, ev: dict, info: dict) -> dict[str, tuple[list[np.ndarray], list[str]]]:
    """Colour options of the evolution plots: name -> (groups per snapshot, group names)."""
    s = len(ev["steps"])
    out: dict[str, tuple[list[np.ndarray], list[str]]] = {"class": ([ev["labels"]] * s, run.class_names)}
    if ev["contexts"] is not None:
        out["superclass / context"] = ([ev["contexts"]] * s, run.context_names)
    if all(p is not None for p in ev["predictions"]):
        out["prediction (at that step)"] = (list(ev["predictions"]), run.class_names)
    if info.get("has_components") and all(c is not None for c in ev["components"]):
        k = int(info.get("num_components") or 1 + max(int(c.max()) for c in ev["components"]))
        out["mixture component (argmax posterior)"] = (list(ev["components"]), component_names(run, info, k))
    return out


def hover_text(run: Run, ev: dict) -> np.ndarray:
    names = run.class_names
    return np.asarray([f"test image #{int(i)} · {names[int(l)] if int(l) < len(names) else l}"
                       for i, l in zip(ev["indices"], ev["labels"])])


def evolution_frame(run: Run, ev: dict, colours: dict):
    """The projection data as a long table: step, test index, x, y and every colouring."""
    import pandas as pd

    parts = []
    for i, s in enumerate(ev["steps"]):
        d = {"step": s, "test_index": ev["indices"], "x": ev["coords"][i][:, 0], "y": ev["coords"][i][:, 1]}
        for name, (groups, gnames) in colours.items():
            g = groups[i]
            d[name] = [gnames[int(v)] if int(v) < len(gnames) else int(v) for v in g]
        parts.append(pd.DataFrame(d))
    return pd.concat(parts, ignore_index=True)


# ============================================================================ compare
def metric_curves(run: Run) -> dict:
    """Per-epoch (epoch, step, test_acc, test error, test loss) and per-step training loss of a run."""
    m = run.metrics
    ep = [e for e in m.get("epochs", []) if isinstance(e, dict)]
    loss = [p for p in m.get("loss", []) if isinstance(p, (list, tuple)) and len(p) == 2]
    f = lambda k: np.asarray([e.get(k) if e.get(k) is not None else np.nan for e in ep], dtype=np.float64)  # noqa
    acc = f("test_acc")
    return {"epoch": f("epoch"), "step": f("step"), "test_acc": acc, "test_error": 1.0 - acc,
            "test_loss": f("test_loss"), "loss_step": np.asarray([p[0] for p in loss], dtype=np.float64),
            "loss": np.asarray([p[1] for p in loss], dtype=np.float64)}


def error_series(names: Sequence[str], x_axis: str) -> list[dict]:
    """Test-error curves (one per run) against "epoch" or "step", for figures.curves_figure."""
    out = []
    for i, name in enumerate(names):
        c = metric_curves(run_by_name(name))
        out.append({"name": name, "x": c[x_axis], "y": c["test_error"], "markers": True, "color": i})
    return out


def loss_series(names: Sequence[str], x_axis: str, window: int) -> list[dict]:
    """Loss curves: against steps, the training loss (moving average over ``window`` steps, solid) and the
    test loss at each epoch end (dotted, markers); against epochs, the test loss only."""
    out = []
    for i, name in enumerate(names):
        c = metric_curves(run_by_name(name))
        if x_axis == "step" and c["loss"].size:
            out.append({"name": name, "x": c["loss_step"], "y": analysis.smooth(c["loss"], window),
                        "color": i, "group": name, "width": 1.5})
        out.append({"name": f"{name} (test)", "x": c[x_axis], "y": c["test_loss"], "color": i, "group": name,
                    "dash": "dot", "markers": True, "showlegend": x_axis != "step" or not c["loss"].size})
    return out


def compare_table(names: Sequence[str], reference: Optional[str]):
    """The comparison table: final (honest) and oracle accuracy, best accuracy, steps to reach the
    reference (BatchNorm) run's best accuracy, time per step, parameter count."""
    import pandas as pd

    rows = []
    target = None
    if reference:
        ref = run_by_name(reference)
        target = ref.metrics.get("best_test_acc")
        if target is None:
            target = float(np.nanmax(metric_curves(ref)["test_acc"]))
    for name in names:
        run = run_by_name(name)
        m, c = run.metrics, metric_curves(run)
        ok = np.isfinite(c["test_acc"])
        reach = analysis.steps_to_reach(c["step"][ok], c["test_acc"][ok], target) if target is not None else None
        rows.append({
            "run": name, "norm": run.norm,
            "test acc": m.get("test_acc"),
            "oracle acc": m.get("test_acc_oracle"),
            "best acc": m.get("best_test_acc"),
            "steps to BN best": reach,
            "s / step": _mean([e.get("time_per_step_s") for e in m.get("epochs", []) if isinstance(e, dict)]),
            "params": m.get("params") if m.get("params") is not None else sum(p.numel() for p in run.model.parameters()),
            "steps": m.get("steps_done")})
    return pd.DataFrame(rows), target


COMPARE_HELP = {
    "test acc": "Last-epoch test accuracy, honest: context layers get the context inferred from the image",
    "oracle acc": "Test accuracy with the true superclass given to context layers; it is derived from the label, "
                  "so it leaks the answer (an upper bound, not a result)",
    "best acc": "Best honest test accuracy over the epochs",
    "steps to BN best": "First evaluated step at which the test accuracy reaches the BatchNorm reference's best "
                        "(MN paper's measure); None = never",
    "s / step": "Mean training time per optimizer step, as the trainer measured it on its machine",
    "params": "Number of parameters", "steps": "Optimizer steps trained"}


@st.cache_data(max_entries=16, ttl=TTL, show_spinner=False)
def live_outputs(run_paths: tuple[str, ...], dev: str, size: int, seed: int, which: str = "output") -> list[dict]:
    """The studied layer of each run on the SAME minibatch (same test images): pooled values (capped at
    MAX_VALUES) and normality statistics (pooled, and median |.| over channels)."""
    runs = [get_run(p, dev) for p in run_paths]
    datasets = {_dataset_name(r) for r in runs}
    if len(datasets) > 1:
        raise ValueError(f"the chosen runs use different datasets ({sorted(datasets)}); choose runs of one dataset "
                         f"to run them on the same minibatch")
    out = []
    for path, run in zip(run_paths, runs):
        layer = studied_layer(run)
        acts = layer_activations(path, dev, layer, size, seed, "predicted")
        info = acts["layer"]
        a = acts[which]
        chans = list(range(info["num_features"]))
        per = analysis.channel_values(torch.from_numpy(np.ascontiguousarray(a)), chans, channel_last=info["channel_last"])
        pooled = per.reshape(-1)
        sub = pooled.size > MAX_VALUES
        if sub:
            pooled = pooled[np.random.default_rng(seed).choice(pooled.size, MAX_VALUES, replace=False)]
        st_pool = analysis.normality_stats(pooled[None, :])
        st_ch = analysis.normality_stats(per)
        out.append({"name": run.path.name, "norm": run.norm, "layer": layer, "values": pooled.astype(np.float32),
                    "subsampled": sub, "pooled": {k: float(v[0]) for k, v in st_pool.items()},
                    "channel_median": {k: float(np.median(np.abs(v))) for k, v in st_ch.items()}})
    return out


def live_table(outs: Sequence[dict]):
    import pandas as pd

    return pd.DataFrame([{
        "run": o["name"], "layer": o["layer"], "mean": o["pooled"]["mean"], "std": o["pooled"]["std"],
        "skew": o["pooled"]["skewness"], "ex. kurt": o["pooled"]["excess_kurtosis"],
        "KS": o["pooled"]["ks_to_normal"],
        "med |skew| per ch.": o["channel_median"]["skewness"],
        "med |ex. kurt| per ch.": o["channel_median"]["excess_kurtosis"],
        "med KS per ch.": o["channel_median"]["ks_to_normal"]} for o in outs])


LIVE_HELP = {
    "mean": "Mean of all values (channels pooled)", "std": "Standard deviation of all values",
    "skew": "Skewness of the pooled values (0: symmetric)", "ex. kurt": "Excess kurtosis of the pooled values (0: Gaussian)",
    "KS": "Kolmogorov-Smirnov distance of the pooled values to N(0, 1)",
    "med |skew| per ch.": "Median over channels of |skewness| of each channel's values",
    "med |ex. kurt| per ch.": "Median over channels of |excess kurtosis|",
    "med KS per ch.": "Median over channels of the KS distance to N(0, 1)"}


# ============================================================================ benchmark results
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, list):
            if v and all(isinstance(x, (int, float, str, bool)) or x is None for x in v) and len(v) <= 4:
                out[key] = ", ".join(str(x) for x in v)
            # longer lists (per-repetition timings) are left out of the table
        else:
            out[key] = v
    return out


@st.cache_data(max_entries=8, ttl=300, show_spinner=False)
def bench_json(path: str) -> Optional[dict]:
    """One benchmark result file as a dict; None when it is missing or is not a readable JSON object (the
    generic listing below says why)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def bench_plot_data(bench_dir: str) -> dict:
    """What the benchmark plots need, each entry present only when its file holds it: ``speed_layers``,
    ``speed_goals``, ``speed_machine`` (speed.json) and ``convergence_runs``, ``convergence_budget``
    (convergence.json). Records that lack the fields the figures read are dropped."""
    out: dict = {}
    speed = bench_json(str(Path(bench_dir) / "speed.json")) or {}
    layers = [r for r in speed.get("layers") or [] if isinstance(r, dict)
              and {"layer", "shape", "K", "ratio_to_bn"} <= set(r) and isinstance(r["shape"], list)]
    if layers:
        out["speed_layers"] = layers
        out["speed_goals"] = {k: v for k, v in (speed.get("goals") or {}).items() if isinstance(v, (int, float))}
        out["speed_machine"] = speed.get("machine") if isinstance(speed.get("machine"), dict) else {}
    conv = bench_json(str(Path(bench_dir) / "convergence.json")) or {}
    runs = [r for r in conv.get("runs") or [] if isinstance(r, dict) and "norm" in r and "curve" in r
            and isinstance(r["curve"], list) and r["curve"]]
    if runs:
        out["convergence_runs"] = runs
        out["convergence_budget"] = conv.get("budget") if isinstance(conv.get("budget"), dict) else {}
    return out


@st.cache_data(max_entries=4, ttl=300, show_spinner=False)
def bench_results(bench_dir: str) -> list[dict]:
    """Every ``*.json`` in ``bench_dir``: its tables (lists of records), the machine it ran on
    (a "machine" or "env" object) and its other scalar fields; unreadable files come with ``error``."""
    out = []
    d = Path(bench_dir)
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        entry: dict[str, Any] = {"name": p.name, "tables": [], "machine": None, "fields": {}, "error": None}
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            entry["error"] = f"{p.name} cannot be read: {err}"
            out.append(entry)
            continue
        for k, v in obj.items():
            if k in ("machine", "env") and isinstance(v, dict):
                entry["machine"] = _flat(v)
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                entry["tables"].append((k, [_flat(x) for x in v]))
            elif isinstance(v, dict):
                subt = {kk: vv for kk, vv in v.items() if isinstance(vv, list) and vv and all(isinstance(x, dict) for x in vv)}
                for kk, vv in subt.items():
                    entry["tables"].append((f"{k}.{kk}", [_flat(x) for x in vv]))
                rest = {kk: vv for kk, vv in v.items() if kk not in subt}
                if rest:
                    entry["fields"].update(_flat(rest, k + "."))
            elif not isinstance(v, list):
                entry["fields"][k] = v
        out.append(entry)
    return out


# ============================================================================ widgets shared by pages
def download_figure(fig, file_name: str, key: str, label: str = "Download the figure's data (CSV)") -> None:
    """A download button producing the CSV of ``fig``'s traces on click (lazily)."""
    from .figures import figure_frame, frame_csv

    st.download_button(label, data=lambda: frame_csv(figure_frame(fig)), file_name=file_name, mime="text/csv",
                       key=key, on_click="ignore", icon=":material/download:")


def download_frame(df, file_name: str, key: str, label: str = "Download the data (CSV)") -> None:
    from .figures import frame_csv

    st.download_button(label, data=lambda: frame_csv(df), file_name=file_name, mime="text/csv", key=key,
                       on_click="ignore", icon=":material/download:")

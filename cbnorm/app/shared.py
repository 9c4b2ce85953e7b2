"""What every page uses: the runs directory and the loaded runs, the sidebar selection (run, layer, seed),
layer choices, the device, the error guard, the page frame, the byte-budgeted caches and their janitor, and
the CSV download buttons. The per-page services (``histograms``, ``evolution``, ``compare``, ``daynight``)
and the test-set activations they share (``activations``) build on this module.

Caching rules (the app serves several sessions from one process):

* ``st.cache_resource`` (shared objects, never copied): loaded runs (their models), test sets, per-snapshot
  features. Nothing here mutates them: models stay in eval mode and are only run under ``probe.capture``
  (forward hooks, no state change; a per-run lock keeps two sessions' hooks apart), snapshots are loaded
  as NEW models (``Run.load_snapshot``), arrays are made read-only.
* ``st.cache_data`` (copied per call): activations, histogram panels, projections, tables — keyed by every
  parameter that changes them, so moving a slider or changing a colour never recomputes a projection.
* Every cache has ``max_entries`` and ``ttl``; the sidebar's "Reload runs" button clears them all
  (:func:`clear_caches`, which also runs the page modules' :func:`on_clear` hooks).
* The three caches whose entries can be large (snapshot features, layer activations, histogram panels) also
  have a budget in bytes (``BUDGET_MB``, accounted by :data:`BUDGETS`): one entry of snapshot features is
  4 MB for conv3 of the committed runs at 1,000 test images but 48 MB for conv1 (240 MB at 5,000), so
  ``max_entries`` alone bounds nothing useful. Least recently used entries beyond the budget are dropped.
  What the cluster-evolution page needs on every rerun (predictions, components) is cached apart, so
  dropped features cost only new projections.

The runs directory is ``$CBNORM_RUNS`` (default: ``checkpoints/`` next to ``app.py``).
"""
from __future__ import annotations

import fnmatch
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import streamlit as st
import torch

from cbnorm import probe
from cbnorm.runs import Run, find_runs, load_run, run_status

from .figures import figure_frame, frame_csv

log = logging.getLogger("cbnorm.app")

RUNS_ENV = "CBNORM_RUNS"
BENCH_ENV = "CBNORM_BENCH"
#: where the heap janitor writes :func:`cache_report` (JSON) every time it runs; unset: nowhere
REPORT_ENV = "CBNORM_CACHE_REPORT"
_APP_DIR = [Path(__file__).resolve().parents[2]]
TTL = 3600  # seconds
#: cap on the values of one channel kept for histograms / stats (a notice says when it applies)
MAX_VALUES = 50_000
#: the labels of a layer's three views (``analysis.VIEWS``), the same on every page: only x_hat is aimed at
#: N(0, 1); the output after the affine is compared with nothing
VIEW_LABELS = {"x_hat": "x̂ — normalized, before the affine", "output": "output — γ·x̂ + β, after the affine",
               "input": "input"}
VIEW_HELP = ("x̂: the normalized values before the affine, what a normalizer aims at N(0, 1) (for MN and ACN the "
             "posterior-weighted sum of MN eq. 34 before γ, β; see the README). Output: γ·x̂ + β, which γ and β move "
             "away from N(0, 1) on purpose, so it is shown with its shape statistics only. Input: what enters the "
             "layer.")
#: byte budgets of the caches whose entries can be large (see the module docstring)
BUDGET_MB = {"snapshot_features": 32, "histogram_panel": 8}
#: threads of one t-SNE projection (openTSNE's n_jobs; the coordinates do not depend on it, tested; umap runs
#: one thread whenever its random_state is fixed): the cores there are, at most 4. On the 2 cores here it
#: halves a cold t-SNE evolution.
PROJECTION_JOBS = max(1, min(4, os.cpu_count() or 1))


def _nbytes(obj: Any, _seen: Optional[set] = None, _depth: int = 0) -> int:
    """Bytes of the arrays and tensors held by ``obj`` (dicts, lists, tuples, plain objects' attributes and
    modules' parameters and buffers followed; each object counted once; Python overhead not counted)."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen or _depth > 6:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes) if obj.base is None or id(obj.base) not in seen else 0
    if isinstance(obj, torch.Tensor):
        return int(obj.untyped_storage().nbytes()) if obj.device.type == "cpu" else 0
    if isinstance(obj, (bytes, bytearray, str)):
        return len(obj)
    if isinstance(obj, torch.nn.Module):
        return sum(_nbytes(t, seen, _depth + 1) for t in list(obj.parameters()) + list(obj.buffers()))
    if isinstance(obj, dict):
        return sum(_nbytes(v, seen, _depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(_nbytes(v, seen, _depth + 1) for v in obj)
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict) and not isinstance(obj, type):
        return sum(_nbytes(v, seen, _depth + 1) for v in attrs.values())
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


#: glibc's mallopt parameters (malloc.h): M_MMAP_THRESHOLD, M_ARENA_MAX
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8
MMAP_THRESHOLD = 1 << 20


def _tune_malloc() -> bool:
    """glibc only (else nothing): allocations of 1 MiB and more are served by mmap and given back to the
    system when freed (a fixed M_MMAP_THRESHOLD turns off glibc's dynamic threshold, which otherwise rises to
    32 MB after the first large free, so that the arrays of every cached view are carved from the heap and
    fragment it), and at most 4 malloc arenas serve the server's many script threads. Returns whether both
    were set. ``bench/load.py`` measures the effect."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_ARENA_MAX, 4))
    except (OSError, AttributeError):
        return False


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
            _write_cache_report()

    _tune_malloc()
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


#: the byte accounting of each budgeted cache (name -> _ByteBudget; the names of ``BUDGET_MB``)
BUDGETS = {name: _ByteBudget(name) for name in BUDGET_MB}
_ON_CLEAR: list[Callable[[], None]] = []


def on_clear(hook: Callable[[], None]) -> Callable[[], None]:
    """Register ``hook`` to run when :func:`clear_caches` runs (a page module's own bookkeeping)."""
    _ON_CLEAR.append(hook)
    return hook


def cache_bytes() -> dict[str, int]:
    """Bytes held (as counted) by each budgeted cache."""
    return {name: b.total() for name, b in BUDGETS.items()}


def cache_report() -> list[dict]:
    """Every Streamlit cache of this process: {"cache" (the function), "kind" ("data" | "resource"),
    "entries", "mb"}, largest first. Data caches hold pickled bytes (counted as stored); resource caches hold
    objects, counted by :func:`_nbytes` (arrays, tensors, models; Python overhead not counted). A diagnostic
    of memory under load (``bench/load.py`` asks for it through ``$CBNORM_CACHE_REPORT``); it reads
    Streamlit's private cache tables and returns what it could read."""
    from streamlit.runtime.caching import cache_data_api, cache_resource_api

    out = []
    for kind, caches in (("data", cache_data_api._data_caches), ("resource", cache_resource_api._resource_caches)):
        try:
            with caches._caches_lock:
                funcs = [c for per in caches._function_caches.values() for c in per.values()]
        except AttributeError:
            continue
        for c in funcs:
            try:
                if kind == "data":
                    store = getattr(c.storage, "_mem_cache", None) or getattr(
                        getattr(c.storage, "persist_storage", None), "_mem_cache", {})
                    values = list(store.values())
                    size = sum(len(v) if isinstance(v, (bytes, bytearray)) else _nbytes(v) for v in values)
                else:
                    with c._mem_cache_lock:
                        values = [getattr(v, "value", v) for v in c._mem_cache.values()]
                    size = _nbytes(values)
            except Exception:  # noqa: BLE001 - a diagnostic: a cache it cannot read is left out
                continue
            out.append({"cache": c.display_name, "kind": kind, "entries": len(values),
                        "mb": round(size / 2 ** 20, 2)})
    return sorted(out, key=lambda r: -r["mb"])


def streamlit_memory() -> list[dict]:
    """What Streamlit's own stats providers count in this process, by category (session state, media files,
    uploaded files, ...): {"category", "entries", "mb"}, largest first; [] outside a running server."""
    try:
        from streamlit.runtime import Runtime
        from streamlit.runtime.stats import CACHE_MEMORY_FAMILY

        stats = Runtime.instance().stats_mgr.get_stats(family_names=[CACHE_MEMORY_FAMILY])
    except Exception:  # noqa: BLE001 - a diagnostic: no runtime (tests, bare mode) or another Streamlit
        return []
    out: dict[str, list] = {}
    for st_ in stats.get(CACHE_MEMORY_FAMILY, []):
        if st_.category_name in ("st_cache_data", "st_cache_resource"):
            continue  # counted by cache_report
        row = out.setdefault(st_.category_name, [0, 0])
        row[0] += 1
        row[1] += int(st_.byte_length)
    return sorted(({"category": k, "entries": n, "mb": round(b / 2 ** 20, 2)} for k, (n, b) in out.items()),
                  key=lambda r: -r["mb"])


def _write_cache_report() -> None:
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    import json

    rep = {"t": time.time(), "caches": cache_report(), "budgets_mb": {
        k: round(v / 2 ** 20, 2) for k, v in cache_bytes().items()}, "streamlit": streamlit_memory()}
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(rep, f)
        os.replace(tmp, path)
    except OSError:
        pass


# ============================================================================ where, on what
def set_app_dir(path: os.PathLike | str) -> None:
    """The folder of app.py: default runs directory ``<app dir>/checkpoints``, benchmarks in
    ``<app dir>/bench/results``."""
    _APP_DIR[0] = Path(path)


def runs_root() -> Path:
    """The runs directory: the one chosen in the sidebar (``st.session_state["runs_dir"]``), else
    ``$CBNORM_RUNS`` (``cbnorm-view LOGDIR`` sets it), else ``checkpoints/`` next to app.py."""
    try:
        chosen = st.session_state.get("runs_dir")
    except Exception:  # noqa: BLE001 - outside a script run (benchmarks, tests): no session
        chosen = None
    if chosen:
        return Path(chosen).expanduser()
    env = os.environ.get(RUNS_ENV)
    return Path(env).expanduser() if env else _APP_DIR[0] / "checkpoints"


def bench_dir() -> Path:
    """The benchmark results every page reads: ``$CBNORM_BENCH`` when set (a test's or a screenshot's own
    results), else ``bench/results`` next to app.py."""
    env = os.environ.get(BENCH_ENV)
    return Path(env).expanduser() if env else _APP_DIR[0] / "bench" / "results"


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
class NothingToShow(ValueError):
    """A run holds nothing a view can show (no snapshots and no recorded steps): said as information, not as
    an error of the app."""


@contextmanager
def guard(what: str = ""):
    """Show any exception raised inside as ``st.error`` with its message (never a traceback); Streamlit's
    own control flow (st.stop, st.rerun) passes through. The traceback goes to the server log.
    Also puts a page opened on its own back into app.py's frame (:func:`page_setup`)."""
    page_setup()
    try:
        yield
    except NothingToShow as err:
        st.info(f"{what}: {err}" if what else str(err), icon=":material/info:")
    except Exception as err:  # noqa: BLE001 - the app must stay up and say what went wrong
        log.warning("%s failed", what or "page", exc_info=True)
        prefix = f"{what}: " if what else ""
        st.error(f"{prefix}{err}" if str(err) else f"{prefix}{type(err).__name__}")


def clear_caches() -> None:
    """Forget every cached run, dataset, activation and projection (the "Reload runs" button)."""
    st.cache_data.clear()
    st.cache_resource.clear()
    for b in BUDGETS.values():
        b.reset()
    for hook in _ON_CLEAR:
        hook()


# ============================================================================ runs
def _run_dirs(root: Path) -> list[Path]:
    """Run directories under ``root``, nested folders included (``cbnorm.runs.find_runs``, as
    ``tensorboard --logdir``)."""
    return find_runs(root)


def run_name(root: Path, path: Path) -> str:
    """A run's name in the app: its path relative to the runs directory ``root`` (nested runs: "folder/run");
    the folder's own name for the directory itself or a run outside it."""
    try:
        rel = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name
    return rel if rel not in ("", ".") else path.name


@st.cache_resource(max_entries=32, ttl=TTL, show_spinner="Loading run…")
def get_run(path: str, dev: str) -> Run:
    """A loaded run (model in eval mode on ``dev``), shared by every session: read-only."""
    return load_run(path, device=dev)


@st.cache_resource(max_entries=64, ttl=TTL, show_spinner=False)
def model_lock(path: str, dev: str) -> threading.Lock:
    """The lock that keeps two sessions' forward hooks on one cached model apart."""
    return threading.Lock()


def finite_mean(values: Sequence[Any]) -> Optional[float]:
    """Mean of the finite numbers in ``values``; None when there are none."""
    v = [float(x) for x in values if isinstance(x, (int, float)) and math.isfinite(float(x))]
    return sum(v) / len(v) if v else None


def _summary(path: Path, run: Optional[Run], error: Optional[str], name: Optional[str] = None) -> dict:
    out: dict[str, Any] = {"name": name or path.name, "path": str(path), "ok": run is not None, "error": error}
    if run is None:
        return out
    cfg, m = run.config, run.metrics
    epochs = [e for e in m.get("epochs", []) if isinstance(e, dict)]
    out.update(
        task=cfg.get("task", "classify"), norm=run.norm,
        model=cfg["model"].get("name") or cfg["model"].get("class", "?"), recorded=len(run.summaries),
        rebuildable=run.model is not None, state=run_status(path)["state"] if run.recorded_layers else None,
        dataset=(cfg.get("dataset") or {}).get("name", "?"), layers=studied_patterns(cfg),
        contexts=(cfg.get("contexts") or {}).get("spec", "none"), uses_context=run.uses_context,
        test_acc=m.get("test_acc"), test_acc_oracle=m.get("test_acc_oracle"), test_acc_mixed=m.get("test_acc_mixed"),
        best_test_acc=m.get("best_test_acc"), params=m.get("params"), epochs=m.get("epochs_done", len(epochs)),
        steps=m.get("steps_done"), snapshots=len(run.snapshots),
        time_per_step_s=finite_mean([e.get("time_per_step_s") for e in epochs]))
    return out


@st.cache_data(max_entries=8, ttl=600, show_spinner="Reading runs…")
def inventory(root: str, dev: str) -> list[dict]:
    """One summary per run directory under ``root`` (those holding config.json): loaded runs with their
    norm, dataset and accuracies; damaged ones with ``ok`` False and the loader's message in ``error``."""
    out = []
    root_p = Path(root).expanduser()
    for p in _run_dirs(root_p):
        name = run_name(root_p, p)
        try:
            out.append(_summary(p, get_run(str(p), dev), None, name))
        except Exception as err:  # noqa: BLE001 - a damaged run is listed with its message
            out.append(_summary(p, None, str(err) or type(err).__name__, name))
    return out


def runs_overview() -> list[dict]:
    return inventory(str(runs_root()), device())


def classify_runs() -> list[dict]:
    """Runs the classification pages can show: loadable with task "classify", plus damaged ones (so that
    choosing one shows its error)."""
    return [r for r in runs_overview() if not r["ok"] or r.get("task") in ("classify", "record")]


def probe_runs() -> list[dict]:
    """Runs whose norm layers the histogram and cluster pages can probe (the sidebar's list): the
    classification runs of :func:`classify_runs` and the GAN runs (task "gan": their generator, fed seeded
    latent vectors, cbnorm.app.generation.latent_batch)."""
    return [r for r in runs_overview() if not r["ok"] or r.get("task") in ("classify", "gan", "record")]


def run_label(run: Run) -> str:
    """A loaded run's name in the app (:func:`run_name` in the current runs directory)."""
    return run_name(runs_root(), run.path)


def run_by_name(name: str) -> Run:
    """The cached run named ``name`` (its path relative to the runs directory); ``ValueError`` with the
    loader's message."""
    root = runs_root()
    path = root if (root / "config.json").exists() and name == root.name else root / name
    if ".." in Path(name).parts or not (path / "config.json").exists():
        raise ValueError(f"run {name!r} not found in {root}")
    return get_run(str(path), device())


# ============================================================================ layers
def studied_patterns(config: dict) -> list[str]:
    """The run config's "layers" entry as a list of patterns (a single string is one pattern); for a
    recorded run of a user's model, the layers of cbnorm's kinds it recorded (all when it has none)."""
    if config.get("task") == "record":
        rec = (config.get("recorder") or {}).get("layers") or []
        ours = [li["path"] for li in rec if not li.get("class", "").endswith(("BatchNorm1d", "BatchNorm2d",
                                                                             "BatchNorm3d", "GroupNorm",
                                                                             "LayerNorm", "SyncBatchNorm"))]
        return ours or [li["path"] for li in rec]
    layers = config.get("layers") or []
    return [layers] if isinstance(layers, str) else [str(p) for p in layers]


def matches_layer(name: str, pattern: str) -> bool:
    """Whether the module path ``name`` is named by ``pattern``: an fnmatch pattern on the whole path
    ("layer3.*" names "layer3.0.bn2", "transition*" names "transition1.norm", "final" names "final"), or a
    block name, one component of the path ("conv3" names "blocks.conv3.norm": the shallow CNN's runs)."""
    return fnmatch.fnmatchcase(name, pattern) or pattern in name.split(".")


def is_studied(run: Run, name: str) -> bool:
    """A layer is studied when one of the config's "layers" patterns names it (:func:`matches_layer`)."""
    return any(matches_layer(name, p) for p in studied_patterns(run.config))


def layer_names(run: Run) -> list[str]:
    """The run's normalization layers: its cbnorm layers (``probe.layer_names``) when the model can be
    rebuilt, and the layers recorded in its summaries (``cbnorm.watch``: torch's norms too)."""
    rec = [li["path"] for li in getattr(run, "recorded_layers", [])]
    if run.model is None:
        return rec
    names = probe.layer_names(run.model)
    return names + [n for n in rec if n not in names]


def layer_choices(run: Run) -> list[str]:
    """The run's normalization layers, the studied one(s) (config "layers") first."""
    names = layer_names(run)
    studied = [n for n in names if is_studied(run, n)]
    if not studied and run.model is not None:  # fall back on the layers of the run's norm type
        modules = dict(run.model.named_modules())
        studied = [n for n in names if n in modules and run.norm in getattr(type(modules[n]), "names", ())]
    return studied + [n for n in names if n not in studied]


def short_layer_names(names: Sequence[str]) -> dict[str, str]:
    """A short, still unique label for each module path: the dotted prefix all paths share is dropped
    (when there are several), then a leading "blocks." and a trailing ".norm" ("blocks.conv3.norm" ->
    "conv3", "transition1.norm" -> "transition1", "layer3.0.bn2" and "final" stay). Paths whose short forms
    would coincide keep their full path."""
    names = list(names)
    split = [n.split(".") for n in names]
    common = 0
    if len(split) > 1:
        while all(len(p) > common + 1 and p[common] == split[0][common] for p in split):
            common += 1
    short = []
    for parts in split:
        parts = parts[common:]
        if parts[0] == "blocks" and len(parts) > 1:
            parts = parts[1:]
        if parts[-1] == "norm" and len(parts) > 1:
            parts = parts[:-1]
        short.append(".".join(parts))
    seen: dict[str, int] = {}
    for s in short:
        seen[s] = seen.get(s, 0) + 1
    return {n: s if s and seen[s] == 1 else n for n, s in zip(names, short)}


def layer_label(run: Run, name: str) -> str:
    """Short label for the layer picker: "conv3 · acn (studied)", "layer3.0.bn2 · mn" (any module path)."""
    kind = layer_info(run, name)["kind"]
    short = short_layer_names(layer_names(run)).get(name, name)
    return f"{short} · {kind}" + (" (studied)" if is_studied(run, name) else "")


def studied_layer(run: Run) -> str:
    choices = layer_choices(run)
    if not choices:
        raise ValueError(f"run {run.path.name} has no cbnorm normalization layer to probe")
    return choices[0]


def layer_info(run: Run, name: str) -> dict:
    """What the pages need to know of layer ``name``: its kind and class, the class attributes
    ``has_mixture`` (the layer has its own mixture: ``mixture_parameters()``) and ``uses_context``, the
    number of components (or contexts), ``channel_last`` and ``num_features``: from the module when the run's
    model can be rebuilt, else from the layer's recorded description (``cbnorm.record.describe_layer``)."""
    m = dict(run.model.named_modules()).get(name) if run.model is not None else None
    if m is not None:
        cls = type(m)
        kind = getattr(cls, "names", (cls.__name__.lower(),))[0]
        k = getattr(m, "num_components", None) or getattr(m, "num_contexts", None)
        return {"name": name, "kind": kind, "class": cls.__name__,
                "has_mixture": bool(getattr(m, "has_mixture", False)),
                "uses_context": bool(getattr(m, "uses_context", False)), "num_components": k,
                "channel_last": bool(getattr(m, "channel_last", False)), "num_features": probe.num_features(m)}
    for li in getattr(run, "recorded_layers", []):
        if li["path"] == name:
            return {"name": name, "kind": li["kind"], "class": li["class"], "has_mixture": bool(li.get("has_mixture")),
                    "uses_context": bool(li.get("uses_context")), "num_components": li.get("num_components"),
                    "channel_last": bool(li.get("channel_last")), "num_features": int(li["width"])}
    raise ValueError(f"run {run.path.name} has no layer {name!r}; layers: {layer_choices(run)}")


# ============================================================================ selection
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


def component_names(run: Run, info: dict, k: int) -> list[str]:
    if info["uses_context"] and len(run.context_names) == k:
        return [f"context {n}" for n in run.context_names]
    return [f"component {i + 1}" for i in range(k)]


# ============================================================================ recorded steps, following a run
#: seconds between refreshes of a followed run (``follow_toggle``)
FOLLOW_SECONDS = 3.0
#: the step meaning "the run's end" (``source.FINAL``: final weights, or the last recorded summary)
FINAL = -1


def live(run: Run) -> bool:
    """Whether the app can run this run's model on test images (another minibatch, resampling, snapshots)."""
    return run.model is not None and run.config.get("task") in ("classify", "gan")


def is_recorded(run: Run, layer: Optional[str] = None) -> bool:
    """Whether the run has recorded summaries (of ``layer``, when given)."""
    return bool(run.summaries) and (layer is None or any(li["path"] == layer for li in run.recorded_layers))


def refresh(run: Run) -> Run:
    """Re-read the steps and metrics a run still being written has added (``Run.refresh``)."""
    return run.refresh()


def run_state(run: Run) -> Optional[str]:
    """"running", "finished", "stopped" (a recorder that stopped writing) or None (no recorder)."""
    return run_status(run.path)["state"] if run.recorded_layers else None


def follow_toggle(run: Run, key: str) -> Optional[float]:
    """The 'Follow' toggle of a recorded run (on by default while it is being written): on, the page's
    fragment reruns every ``FOLLOW_SECONDS`` and shows the newest step. Returns the fragment's ``run_every``
    (None when off or not applicable). The run's state is shown inside the fragment (:func:`run_badge`)."""
    if not run.recorded_layers:
        return None
    on = st.toggle("Follow", key=key, value=run_state(run) == "running",
                   help=f"Re-read the run every {FOLLOW_SECONDS:.0f} s and show its newest recorded step")
    return FOLLOW_SECONDS if on else None


def run_badge(run: Run) -> None:
    """Running / finished / stopped, and the recorded steps so far (inside the followed fragment)."""
    if not run.recorded_layers:
        return
    state = run_state(run)
    badge = {"running": ":green-badge[:material/radio_button_checked: running]",
             "finished": ":gray-badge[finished]",
             "stopped": ":orange-badge[stopped: nothing written for 10 min, never closed]"}.get(state or "", "")
    st.markdown(f"{badge} · {len(run.summaries)} recorded steps, last "
                f"{run.summaries[-1][0] if run.summaries else '—'}")


def step_picker(run: Run, key: str, follow: bool = False, layer: Optional[str] = None) -> tuple[int, bool]:
    """(step, live): a recorded step of the run (the newest when following), or the run's final weights on a
    sampled minibatch (``live`` True) for a run the app can rebuild. Steps are offered only where ``layer`` was
    recorded. The choice lives in ``st.session_state``."""
    rec_steps = [s for s, _ in run.summaries] if is_recorded(run, layer) else []
    can_live = live(run)
    if not rec_steps:
        return FINAL, True
    options = rec_steps + ([FINAL] if can_live else [])
    fmt = lambda s: "live minibatch (final weights)" if s == FINAL else f"step {s}"  # noqa: E731
    ss = st.session_state
    if follow or ss.get(key) not in options:
        ss[key] = rec_steps[-1]
    step = st.select_slider("Recorded step" + (" (or a live minibatch)" if can_live else ""), options=options,
                            key=key, format_func=fmt,
                            help="The recorded probe batch at a step of training (cbnorm.watch); for a run the "
                                 "app can rebuild, also a fresh minibatch of test images through the final weights")
    return int(step), int(step) == FINAL


# ============================================================================ widgets shared by pages
def download_figure(fig, file_name: str, key: str, label: str = "Download the figure's data (CSV)") -> None:
    """A download button producing the CSV of ``fig``'s traces on click (lazily)."""
    st.download_button(label, data=lambda: frame_csv(figure_frame(fig)), file_name=file_name, mime="text/csv",
                       key=key, on_click="ignore", icon=":material/download:")


def download_frame(df, file_name: str, key: str, label: str = "Download the data (CSV)") -> None:
    st.download_button(label, data=lambda: frame_csv(df), file_name=file_name, mime="text/csv", key=key,
                       on_click="ignore", icon=":material/download:")

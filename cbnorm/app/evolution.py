"""Page 2, cluster evolution: a fixed sample of test images through one layer at every training snapshot,
projected to 2-D (PCA fitted on the last snapshot, or t-SNE / UMAP warm-started from the previous
snapshot's layout), with its colourings (class, superclass, prediction, mixture component).

Each stage is cached apart: features per snapshot (byte-budgeted, ``shared.BUDGET_MB["snapshot_features"]``),
the small per-snapshot summary (predictions, components), the PCA / reducer fitted on the last snapshot, each
snapshot's embedding; a projection reads one snapshot's features at a time (at most two pinned). The
projections computed in this process are remembered (``_PROJECTED``), so a rerun that only changes the
colour or the snapshot needs no feature pass even when the features were dropped.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import streamlit as st

from cbnorm import analysis
from cbnorm.runs import Run

from . import activations as A
from . import shared as S
from . import source as SRC
from .generation import latent_sample

#: projections (EvolutionParams key, steps) computed in this process: their reruns skip the feature passes
_PROJECTED: OrderedDict[tuple, None] = OrderedDict()
_PROJECTED_LOCK = threading.Lock()


@S.on_clear
def _forget_projections() -> None:
    with _PROJECTED_LOCK:
        _PROJECTED.clear()


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


def evolution_steps(run: Run, max_snapshots: int = 0, layer: Optional[str] = None) -> list[int]:
    """The steps to show (recorded summaries, else snapshots: ``source.steps``): all, or ``max_snapshots``
    evenly spread (first and last kept)."""
    steps = SRC.steps(run, layer)
    if not steps:
        raise S.NothingToShow(f"run {run.path.name} has no snapshots and no recorded steps (train with "
                         f"--snapshot-every, or record it with cbnorm.watch)")
    if max_snapshots and 2 <= max_snapshots < len(steps):
        pick = np.unique(np.round(np.linspace(0, len(steps) - 1, max_snapshots)).astype(int))
        steps = [steps[i] for i in pick]
    return steps


@st.cache_data(max_entries=16, ttl=S.TTL, show_spinner=False)
def evolution_sample(run_path: str, dev: str, size: int, seed: int, recorded: bool = False) -> dict:
    """The fixed sample of the cluster-evolution page: indices, labels, true contexts; with ``recorded``, the
    run's recorded probe batch (the features then come from its summaries)."""
    run = S.get_run(run_path, dev)
    if recorded and run.summaries:  # the recorded probe batch: the same inputs at every recorded step
        first_layer = run.recorded_layers[0]["path"]
        rec = SRC.activations(run_path, dev, SRC.steps(run, first_layer)[-1], first_layer, size, seed)
        n = rec["n"]
        labels = rec["labels"] if rec["labels"] is not None else np.zeros(n, np.int64)
        return {"indices": np.arange(n), "labels": labels, "contexts": rec["contexts"], "total": n}
    if run.config.get("task") == "gan":  # a generator: seeded latent vectors (cbnorm.app.generation)
        return latent_sample(run, size, seed)
    ds = A.test_data(A.dataset_name(run))
    idx = A.sample_indices(len(ds), size, seed)
    labels = np.asarray(ds.labels[idx])
    return {"indices": idx, "labels": labels, "contexts": A.true_contexts(run, labels), "total": len(ds)}


def _feature_key(run_path: str, dev: str, step: int, layer: str, size: int, seed: int, which: str,
                 pool: bool) -> tuple:
    return (run_path, dev, int(step), layer, int(size), int(seed), which, bool(pool))


def snapshot_features(run_path: str, dev: str, step: int, layer: str, size: int, seed: int, which: str,
                      pool: bool) -> dict:
    """Features of ``layer`` at snapshot ``step`` (cached within ``BUDGET_MB["snapshot_features"]``; see
    :func:`_snapshot_features`)."""
    args = _feature_key(run_path, dev, step, layer, size, seed, which, pool)
    out = _snapshot_features(*args)
    S.BUDGETS["snapshot_features"].note(_snapshot_features, args, out)
    return out


@st.cache_data(max_entries=512, ttl=S.TTL, show_spinner=False)
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
    rec = SRC.activations(run_path, dev, step, layer, size, seed, every_position=not pool)
    feats = SRC.features(rec, which, pool)
    out = {"features": feats, "predictions": rec["predictions"], "components": rec["components"]}
    for v in out.values():
        if isinstance(v, np.ndarray):
            v.flags.writeable = False
    return out


def _feature_args(p: EvolutionParams) -> tuple:
    return (p.run, S.device(), p.layer, p.size, p.seed, p.which, p.pool)


@st.cache_resource(max_entries=16, ttl=S.TTL, show_spinner=False)
def _reducer(run_path: str, dev: str, layer: str, size: int, seed: int, which: str, pool: bool, last_step: int
             ) -> analysis.Reducer:
    """PCA to 50 dimensions fitted on the last snapshot's features (t-SNE / UMAP input)."""
    last = snapshot_features(run_path, dev, last_step, layer, size, seed, which, pool)["features"]
    return analysis.fit_reducer(last, 50, seed)


@st.cache_data(max_entries=256, ttl=S.TTL, show_spinner=False)
def _embedding_at(key: tuple, steps: tuple[int, ...], i: int) -> tuple[np.ndarray, dict]:
    """Snapshot i's 2-D embedding, warm-started from snapshot i-1's (itself cached)."""
    p = EvolutionParams(*key)
    prev = _embedding_at(key, steps, i - 1)[0] if i > 0 else None
    run_path, dev, layer, size, seed, which, pool = _feature_args(p)
    reduce = _reducer(run_path, dev, layer, size, seed, which, pool, steps[-1])
    x = reduce(snapshot_features(run_path, dev, steps[i], layer, size, seed, which, pool)["features"])
    return analysis.embed_step(x, prev, p.method, perplexity=p.perplexity, learning_rate=p.learning_rate,
                               n_neighbors=p.n_neighbors, min_dist=p.min_dist, seed=p.seed,
                               first_iters=p.first_iters, refine_iters=p.refine_iters, n_jobs=S.PROJECTION_JOBS)


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


@st.cache_resource(max_entries=16, ttl=S.TTL, show_spinner=False)
def _pca_fit(run_path: str, dev: str, layer: str, size: int, seed: int, which: str, pool: bool, last_step: int
             ) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """The 2-D PCA fitted on the last snapshot's features (``analysis.pca_projection``): project, info."""
    last = snapshot_features(run_path, dev, last_step, layer, size, seed, which, pool)["features"]
    return analysis.pca_projection(last, seed)


@st.cache_data(max_entries=512, ttl=S.TTL, show_spinner=False)
def _pca_at(key: tuple, steps: tuple[int, ...], i: int) -> tuple[np.ndarray, dict]:
    """Snapshot i's (N, 2) PCA coordinates and the PCA's info: one snapshot's features at a time."""
    run_path, dev, layer, size, seed, which, pool = _feature_args(EvolutionParams(*key))
    project, info = _pca_fit(run_path, dev, layer, size, seed, which, pool, steps[-1])
    return project(snapshot_features(run_path, dev, steps[i], layer, size, seed, which, pool)["features"]), info


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
            S.log.warning("UMAP warm-up failed", exc_info=True)

    # UMAP's import pulls in pandas; a page thread that meets pandas half-imported in sys.modules fails
    # (plotly: "partially initialized module 'pandas' has no attribute 'Series'", seen on the histogram
    # page of a fresh server). Import it here, before the thread starts.
    import pandas  # noqa: F401

    t = threading.Thread(target=work, name="umap-warmup", daemon=True)
    t.start()
    return t


def evolution(p: EvolutionParams, progress: Optional[Callable[[float, str], None]] = None) -> dict:
    """The projection of every (chosen) snapshot, with colourings. Each stage is cached separately (features
    per snapshot; PCA, t-SNE or UMAP per snapshot, t-SNE / UMAP each warm-started from the previous), so a
    change of colour or snapshot reuses everything and a new perplexity reuses the features. Features are
    computed and projected one snapshot at a time (with t-SNE / UMAP the next one in the background meanwhile),
    so the memory a projection holds does not grow with the number of snapshots.
    ``progress(fraction, text)`` reports each stage."""
    run = S.get_run(p.run, S.device())
    steps = tuple(evolution_steps(run, p.max_snapshots, p.layer))
    sample = evolution_sample(p.run, S.device(), p.size, p.seed, p.pool and SRC.is_recorded(run, p.layer))
    say = progress or (lambda f, t: None)
    n = len(steps)
    fa = _feature_args(p)
    if p.method not in ("pca", "tsne", "umap"):
        raise ValueError(f"method must be pca, tsne or umap, got {p.method!r}")
    done = (p.key(), steps) in _PROJECTED  # computed before: a rerun (colour, snapshot) needs no features
    budget, fkey = S.BUDGETS["snapshot_features"], (lambda s: _feature_key(fa[0], fa[1], s, *fa[2:]))
    coords: list = [None] * n
    info: dict = {}
    # One snapshot's features at a time (pinned while its projection and summary read them; with t-SNE / UMAP
    # also the next one, computed in the background meanwhile): a run of many snapshots of a wide layer never
    # holds all of them. The last snapshot comes first: the projection is fitted on it.
    order = [n - 1] + list(range(n - 1)) if p.method == "pca" else list(range(n))
    name = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}[p.method]
    if p.method == "umap":
        say(0.0, "waiting for UMAP's one-time compilation")
        umap_warmup().join()
    for j, i in enumerate(order):
        s, nxt = steps[i], (steps[i + 1] if p.method != "pca" and i + 1 < n else None)
        say(j / n, f"{name} at step {s} ({j + 1}/{n}): activations, then projection")
        with budget.pinned([fkey(s)] + ([fkey(nxt)] if nxt is not None else [])):
            prefetch = None if done or nxt is None else _prefetch_features(p, (nxt,))
            coords[i], info = (_pca_at if p.method == "pca" else _embedding_at)(p.key(), steps, i)
            snapshot_summary(fa[0], fa[1], s, *fa[2:])  # predictions, components: while the features are here
            if prefetch is not None:
                prefetch.join()
    feats = [snapshot_summary(fa[0], fa[1], s, *fa[2:]) for s in steps]  # cached above: no features needed
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
    if info.get("has_mixture") and all(c is not None for c in ev["components"]):
        k = int(info.get("num_components") or 1 + max(int(c.max()) for c in ev["components"]))
        out["mixture component (argmax posterior)"] = (list(ev["components"]), S.component_names(run, info, k))
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

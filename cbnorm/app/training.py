"""Page 6, across runs and training: the comparisons the papers draw by hand.

* **Distributions over training** (one run, one layer): the chosen channels' values (pooled) at every
  snapshot on the same test images, as a ridge ("offset") view, one panel per step with the mixture
  components of that step (the layer's own for MN / ACN / ModeNorm / context layers, a K-component fit for
  the others: MN paper Fig. 8), an overlay and TensorBoard's percentile bands over steps.
* **The same histogram across runs**: two or more runs sharing a layer path, the same channels and test
  images at one step (or the final model), overlaid and in aligned small multiples, with normality
  statistics side by side and their differences to a reference run.
* **Embedding grid**: runs as rows, snapshots (at the same fractions of training) as columns, the same
  images everywhere (CB-Norm paper Fig. 3), PCA / t-SNE / UMAP with shared axes per row.
* **Cluster quality over training**: ``cbnorm.analysis.cluster_quality`` of the layer's features at every
  snapshot of every run, one line per run and a mean ± sd band per group of seeds.

Caching: a layer's activations at a snapshot (``snapshot_activations``, shared read-only arrays, within
``shared.BUDGET_MB["training_activations"]``), then cached products on top (a step's panel of values,
mixture and percentiles, within ``BUDGET_MB["training_panels"]``; a row's embedding, one snapshot at a time for t-SNE / UMAP; a snapshot's quality
numbers), so slider moves, colours and range / bin / log-y changes answer from the cache.
"""
from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import streamlit as st

from cbnorm import analysis
from cbnorm.runs import Run

from . import activations as A
from . import figures_training as FT
from . import shared as S
from . import source as SRC
from .compare import group_runs
from .evolution import umap_warmup

#: the step of a run's end (its final weights, or its last recorded summary), next to its other steps
FINAL = SRC.FINAL
PANEL_BUDGET = "training_panels"
for _name, _mb in ((PANEL_BUDGET, 8),):  # registered beside shared's budgets (cleared with them)
    S.BUDGET_MB.setdefault(_name, _mb)
    S.BUDGETS.setdefault(_name, S._ByteBudget(_name))

Progress = Optional[Callable[[float, str], None]]
#: whole grids computed in this process (small: coordinates, components, predictions), by GridParams.key()
_GRIDS: OrderedDict[tuple, dict] = OrderedDict()
_ROWS_LOCK = threading.Lock()


@S.on_clear
def _forget_rows() -> None:
    with _ROWS_LOCK:
        _GRIDS.clear()


def clear_caches() -> None:
    """Forget this page's cached activations, panels, projections and numbers (benchmarks: a cold start)."""
    for f in (SRC._activations, _step_panel, _pca_fit, _pca_step, _row_reducer, _row_step, _cell_summary,
              quality_at, grid_figure, distribution_figures, across_figures):
        f.clear()
    for name in (SRC.BUDGET, PANEL_BUDGET):
        S.BUDGETS[name].reset()
    _forget_rows()


def _say(progress: Progress) -> Callable[[float, str], None]:
    return progress or (lambda f, t: None)


# ============================================================================ runs, layers, steps
def run_names() -> list[str]:
    """The loadable classification runs of the runs directory."""
    return [r["name"] for r in S.classify_runs() if r["ok"]]


def default_runs(names: Sequence[str], current: Optional[str], n: int = 2) -> list[str]:
    """The sidebar's run and a BatchNorm run to compare it with (else the next runs), ``n`` in all."""
    names = list(names)
    first = [current] if current in names else names[:1]
    norms = {r["name"]: r.get("norm") for r in S.classify_runs() if r["ok"]}
    rest = sorted((x for x in names if x not in first), key=lambda x: (norms.get(x) != "bn", x))
    return first + rest[:max(0, n - len(first))]


def runs_of(names: Sequence[str]) -> list[Run]:
    return [S.run_by_name(n) for n in names]


def snapshot_steps(run: Run, layer: Optional[str] = None) -> list[int]:
    """The run's steps with activations (of ``layer``: recorded summaries, else snapshots: ``source.steps``);
    ``ValueError`` naming the run when it has none."""
    steps = SRC.steps(run, layer)
    if not steps:
        raise S.NothingToShow(f"run {run.path.name} has no snapshots and no recorded steps (train with "
                         f"--snapshot-every, or record it with cbnorm.watch)")
    return steps


def step_label(step: int) -> str:
    return "final" if int(step) == FINAL else f"step {int(step)}"


def shared_layers(runs: Sequence[Run]) -> list[str]:
    """Normalization layers (module paths) every run has, in the first run's order (studied first);
    ``ValueError`` saying which runs share none."""
    if not runs:
        raise ValueError("choose at least one run")
    first = S.layer_choices(runs[0])
    common = [n for n in first if all(n in S.layer_choices(r) for r in runs[1:])]
    if not common:
        others = [r.path.name for r in runs[1:] if not set(S.layer_choices(r)) & set(first)]
        culprit = others[0] if others else runs[-1].path.name
        raise ValueError(f"runs {runs[0].path.name} and {culprit} share no normalization layer "
                         f"({runs[0].path.name}: {', '.join(first) or 'none'}; {culprit}: "
                         f"{', '.join(S.layer_choices(S.run_by_name(culprit))) or 'none'}); choose runs of one "
                         "architecture")
    return common


def check_same_test_set(runs: Sequence[Run]) -> str:
    """The test set every run is evaluated on; ``ValueError`` when they differ (the images must be the same)."""
    names = {r.path.name: _inputs_of(r) for r in runs}
    if len(set(names.values())) > 1:
        raise ValueError("the runs use different test sets (" + ", ".join(f"{k}: {v}" for k, v in names.items())
                         + "); the same images are needed in every run")
    return next(iter(names.values()))


def all_recorded(names: Sequence[str], layer: str) -> bool:
    """Whether every named run recorded ``layer``: its views then read the recorded channel means by default."""
    return all(SRC.is_recorded(S.run_by_name(n), layer) for n in names)


def all_rebuildable(names: Sequence[str]) -> bool:
    """Whether every named run's model can be rebuilt: only then are per-position features (not just the
    recorded channel means) available for all of them."""
    return all(SRC.live(S.run_by_name(n)) for n in names)


def _inputs_of(run: Run) -> str:
    """What a run's views are computed on: its test set, or (a recorded run of a model the app cannot
    rebuild) its recorded probe batch, which only that run has."""
    if SRC.live(run):
        return A.dataset_name(run)
    return f"the probe batch recorded with {run.path.name}"


def common_steps(runs: Sequence[Run]) -> list[int]:
    """Steps every run has activations at (possibly none)."""
    sets = [set(SRC.steps(r)) for r in runs]
    return sorted(set.intersection(*sets)) if sets else []


def steps_by_fraction(steps: Sequence[int], columns: int) -> list[int]:
    """``columns`` snapshot steps at evenly spaced fractions of training (0, 1/(n-1), ..., 1 of the last
    step), each the nearest snapshot; a run with fewer snapshots gives fewer (distinct) steps."""
    steps = sorted(int(s) for s in steps)
    if not steps:
        return []
    columns = max(1, int(columns))
    if columns == 1:
        return [steps[-1]]
    targets = np.linspace(steps[0], steps[-1], columns)
    out: list[int] = []
    for t in targets:
        s = min(steps, key=lambda x: (abs(x - t), x))
        if s not in out:
            out.append(s)
    return sorted(out)


def groups_of(names: Sequence[str]) -> list[dict]:
    """The runs grouped by recipe (everything but the seed): the compare page's
    ``cbnorm.app.compare.group_runs`` when it is there; each group ``{"label", "members": [run names]}``.
    Runs it leaves out (no test curve) are groups of their own."""
    runs = runs_of(names)
    groups: list[dict] = []
    try:
        for g in group_runs([(r.path.name, r.config, r.metrics) for r in runs]):
            members = [m[0] if isinstance(m, (list, tuple)) else m for m in g.get("members", [])]
            members = [m for m in members if m in names]
            if members:
                groups.append({"label": str(g.get("label") or members[0]), "members": members})
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        S.log.warning("grouping runs by recipe failed; one group per run", exc_info=True)
        groups = []
    grouped = {m for g in groups for m in g["members"]}
    groups += [{"label": n, "members": [n]} for n in names if n not in grouped]
    return groups


def with_seeds(names: Sequence[str]) -> list[str]:
    """``names`` and the other seeds of their recipes (every loadable run of the same group)."""
    chosen = list(names)
    out = list(chosen)
    for g in groups_of(run_names()):
        if any(n in g["members"] for n in chosen):
            out += [m for m in g["members"] if m not in out]
    return out


# ============================================================================ activations per step
def snapshot_activations(run_path: str, dev: str, step: int, layer: str, size: int, seed: int, which: str,
                         every_position: bool = False) -> dict:
    """``layer`` at ``step`` (FINAL: the run's end) from the one activation source (``source.activations``:
    the recorded summary, or the snapshot run on ``size`` test images drawn with ``seed``; ``every_position``
    for unpooled features)."""
    if which not in analysis.VIEWS:
        raise ValueError(f"which must be one of {analysis.VIEWS}, got {which!r}")
    return SRC.activations(run_path, dev, int(step), layer, int(size), int(seed), every_position=every_position)


def mixture_names(run: Run, info: dict, k: int) -> list[str]:
    if info["kind"] == "mn":
        kk = int(info["num_components"] or 1)
        return [f"fit {i // kk + 1} · component {i % kk + 1}" for i in range(k)]
    return S.component_names(run, info, k)


# ============================================================================ one step's panel
def step_panel(run_path: str, dev: str, step: int, layer: str, size: int, seed: int, which: str,
               channels: tuple[int, ...], k: int) -> dict:
    """:func:`_step_panel`, cached within ``BUDGET_MB["training_panels"]`` (a panel holds up to
    ``shared.MAX_VALUES`` values: 400 kB)."""
    args = (run_path, dev, int(step), layer, int(size), int(seed), which, tuple(int(c) for c in channels), int(k))
    out = _step_panel(*args)
    S.BUDGETS[PANEL_BUDGET].note(_step_panel, args, out)
    return out


@st.cache_data(max_entries=512, ttl=S.TTL, show_spinner=False)
def _step_panel(run_path: str, dev: str, step: int, layer: str, size: int, seed: int, which: str,
                channels: tuple[int, ...], k: int) -> dict:
    """What a histogram of the chosen ``channels`` (() = every channel) at one step needs: their values
    pooled (at most ``shared.MAX_VALUES``, subsampled with ``seed``), the mixture over them (the layer's own
    per-channel components on its input, else a ``k``-component fit with cbnorm.gmm of the pooled values:
    weights, means, variances (G, K)), TensorBoard's percentiles and the statistics of ``which``, like with
    like (``analysis.view_stats``): x_hat against N(0, 1); the input on its values standardized per channel
    before pooling (raw mean and std); the output after the affine its shape only (no distance to N(0, 1))."""
    run = S.get_run(run_path, dev)
    acts = snapshot_activations(run_path, dev, step, layer, size, seed, which)
    info = acts["layer"]
    c = info["num_features"]
    chans = list(channels) if channels else list(range(c))
    v = SRC.values(acts, which, chans)
    pooled = v.reshape(-1)
    total = int(pooled.size)
    finite = np.isfinite(pooled)
    pooled = pooled[finite]
    # the input's distances to N(0, 1) are measured on each channel standardized by its own finite values
    shape_of = pooled
    if which == "input":
        z = np.where(np.isfinite(v), v, np.nan)
        z = (z - np.nanmean(z, axis=1, keepdims=True)) / np.maximum(np.nanstd(z, axis=1, keepdims=True), 1e-12)
        shape_of = z.reshape(-1)[finite]
    sub = pooled.size > S.MAX_VALUES
    if sub:
        keep = np.sort(np.random.default_rng(seed).choice(pooled.size, S.MAX_VALUES, replace=False))
        pooled, shape_of = pooled[keep], shape_of[keep]
    if pooled.size < 2:
        raise ValueError(f"{run.path.name} {step_label(step)}: fewer than 2 finite values in the chosen channels")
    if which == "input" and acts["mixture"] is not None:
        w, m, var = SRC.mixture(acts, chans)
        names = mixture_names(run, info, w.shape[1])
        source = f"the layer's own {info['class']} components"
    else:
        kk = int(min(max(1, k), pooled.size))
        w, m, var = analysis.fit_channel_mixtures(pooled[None, :], kk, seed=seed)
        names = [f"component {i + 1}" for i in range(kk)]
        source = f"a {kk}-component GMM fitted with cbnorm.gmm"
    stats = {key: float(val[0]) for key, val in
             analysis.view_stats(shape_of[None, :], "x_hat" if which == "input" else which).items()}
    if which == "input":
        stats.update(mean=float(pooled.mean()), std=float(pooled.std()))
    return {"step": int(step), "values": pooled, "n_values": total, "subsampled": bool(sub),
            "mixture": (np.asarray(w), np.asarray(m), np.asarray(var)), "names": names, "source": source,
            "percentiles": analysis.distribution_percentiles(pooled), "stats": stats, "channels": chans,
            "layer": info}


def binning(values: Sequence[np.ndarray], tail: float, bins, *, include_normal: bool = False) -> dict:
    """The range and bins shared by the histograms of ``values``: :func:`analysis.robust_range` (``tail``
    in each end; 0 = everything), bins from the values inside (:func:`analysis.shared_bin_edges`), and
    each sample's density with the numbers of values below / above the range."""
    lo, hi = analysis.robust_range(values, tail, include=(-3.0, 3.0) if include_normal else ())
    edges = analysis.shared_bin_edges(values, lo, hi, bins)
    dens, below, above = [], [], []
    for v in values:
        d, b, a = analysis.histogram_density(v, edges)
        dens.append(d)
        below.append(b)
        above.append(a)
    return {"lo": lo, "hi": hi, "edges": edges, "density": dens, "below": below, "above": above, "tail": tail}


# ============================================================================ 1. distributions over training
def distributions(run_name: str, layer: str, which: str, channels: Sequence[int], k: int, size: int, seed: int,
                  steps: Sequence[int], progress: Progress = None) -> dict:
    """Each chosen snapshot's :func:`step_panel` (same images, same channels)."""
    run = S.run_by_name(run_name)
    all_steps = snapshot_steps(run, layer)
    steps = [int(s) for s in steps if int(s) in all_steps]
    if not steps:
        raise ValueError(f"no snapshot of {run_name} in the chosen step range (its steps: {all_steps})")
    say = _say(progress)
    panels = []
    for i, s in enumerate(steps):
        say(i / len(steps), f"{run_name}: {layer} at step {s} ({i + 1}/{len(steps)})")
        panels.append(step_panel(str(run.path), S.device(), s, layer, int(size), int(seed), which,
                                 tuple(int(c) for c in channels), int(k)))
    say(1.0, "done")
    return {"run": run_name, "norm": run.norm, "layer": layer, "which": which, "steps": steps, "panels": panels}


@st.cache_resource(max_entries=8, ttl=S.TTL, show_spinner=False)
def distribution_figures(run_name: str, layer: str, which: str, channels: tuple[int, ...], k: int, size: int,
                         seed: int, steps: tuple[int, ...], tail: float, bins, log_y: bool, components: bool) -> dict:
    """The four figures of the distributions view ("ridge", "multiples", "overlay", "percentiles") and the
    binning, built once per setting (shared read-only; st.plotly_chart copies a figure)."""
    dist = distributions(run_name, layer, which, channels, k, size, seed, steps)
    b = binning([p["values"] for p in dist["panels"]], tail, bins)
    x = AXIS_TITLES[which]
    return {"bins": b, "ridge": FT.ridge_figure(dist, b, components=components, x_title=x),
            "multiples": FT.step_multiples_figure(dist, b, log_y=log_y, x_title=x),
            "overlay": FT.overlay_figure(dist, b, log_y=log_y, x_title=x),
            "percentiles": FT.percentile_figure(dist, y_title=x)}


def percentile_frame(dist: dict):
    import pandas as pd

    cols = ["min", "p7", "p16", "p31", "median", "p69", "p84", "p93", "max"]
    rows = [{"step": p["step"], **dict(zip(cols, p["percentiles"].tolist())), **{k: p["stats"][k] for k in
            ("mean", "std", "skewness", "excess_kurtosis", "ks_to_normal", "w1_to_normal") if k in p["stats"]}}
            for p in dist["panels"]]
    return pd.DataFrame(rows)


# ============================================================================ 2. the same histogram across runs
def across_runs(run_names_: Sequence[str], layer: str, which: str, channels: Sequence[int], step: int, size: int,
                seed: int, k: int = 2, progress: Progress = None) -> dict:
    """:func:`step_panel` of each run at ``step`` (FINAL = each run's final weights) on the same images."""
    if len(run_names_) < 1:
        raise ValueError("choose at least one run")
    runs = runs_of(run_names_)
    shared_layers(runs)
    if layer not in shared_layers(runs):
        raise ValueError(f"layer {layer!r} is not in every chosen run; shared: {shared_layers(runs)}")
    check_same_test_set(runs)
    if int(step) != FINAL:
        missing = [r.path.name for r in runs if int(step) not in SRC.steps(r)]
        if missing:
            raise ValueError(f"no snapshot at step {step} in {', '.join(missing)}; choose the final weights or a "
                             f"step every run has ({common_steps(runs) or 'none'})")
    width = min(S.layer_info(r, layer)["num_features"] for r in runs)
    bad = [c for c in channels if not 0 <= int(c) < width]
    if bad:
        raise ValueError(f"channels {bad} are not in every run's {layer} (it has {width} channels in the narrowest)")
    say = _say(progress)
    panels = []
    for i, r in enumerate(runs):
        say(i / len(runs), f"{r.path.name}: {layer} ({step_label(step)}, {i + 1}/{len(runs)})")
        panels.append(step_panel(str(r.path), S.device(), int(step), layer, int(size), int(seed), which,
                                 tuple(int(c) for c in channels), int(k)))
    say(1.0, "done")
    return {"runs": list(run_names_), "norms": [r.norm for r in runs], "layer": layer, "which": which,
            "step": int(step), "panels": panels}


@st.cache_resource(max_entries=16, ttl=S.TTL, show_spinner=False)
def across_figures(run_names_: tuple[str, ...], layer: str, which: str, channels: tuple[int, ...], step: int,
                   size: int, seed: int, tail: float, bins, log_y: bool, normal: bool) -> dict:
    """The across-runs view's "overlay" and "multiples" figures and the binning, built once per setting."""
    res = across_runs(run_names_, layer, which, channels, step, size, seed)
    b = binning([p["values"] for p in res["panels"]], tail, bins)
    x = AXIS_TITLES[which]
    normal = normal and which == "x_hat"  # only x_hat is aimed at N(0, 1)
    return {"bins": b, "overlay": FT.runs_overlay_figure(res, b, log_y=log_y, reference_normal=normal, x_title=x),
            "multiples": FT.runs_multiples_figure(res, b, log_y=log_y, reference_normal=normal, x_title=x)}


#: x-axis titles of the three views (``analysis.VIEWS``)
AXIS_TITLES = {"input": "input value", "x_hat": "x̂ (normalized, before the affine)",
               "output": "output value (after the affine)"}
#: the statistics table's columns; the distances to N(0, 1) only where the view has them (``analysis.view_stats``)
STAT_COLUMNS = {"skewness": "skewness", "excess_kurtosis": "excess kurtosis", "ks_to_normal": "KS to N(0,1)",
                "w1_to_normal": "W1 to N(0,1)", "mean": "mean", "std": "std"}


def across_stats(res: dict, reference: Optional[str], bins: Optional[dict] = None):
    """Per run: values, outside the shown range, normality statistics and each one's difference to the
    ``reference`` run (columns "Δ ...")."""
    import pandas as pd

    rows = []
    for i, (name, norm, p) in enumerate(zip(res["runs"], res["norms"], res["panels"])):
        row = {"run": name, "norm": norm, "values": p["values"].size}
        if bins is not None:
            row["outside range"] = bins["below"][i] + bins["above"][i]
        row.update({label: p["stats"][key] for key, label in STAT_COLUMNS.items() if key in p["stats"]})
        rows.append(row)
    df = pd.DataFrame(rows)
    if reference in res["runs"]:
        ref = df[df["run"] == reference].iloc[0]
        for label in ("skewness", "excess kurtosis", "KS to N(0,1)", "W1 to N(0,1)"):
            if label in df:
                df[f"Δ {label}"] = df[label] - ref[label]
    return df


# ============================================================================ 3. embedding grid
@dataclass(frozen=True)
class GridParams:
    """What an embedding grid depends on (its cache key)."""

    runs: tuple[str, ...]  # run directory paths, one row each
    layer: str
    size: int
    seed: int
    which: str = "output"
    pool: bool = False
    method: str = "pca"
    columns: int = 4
    perplexity: float = 30.0
    n_neighbors: int = 15
    min_dist: float = 0.1
    refine_iters: int = 100

    def key(self) -> tuple:
        return tuple(asdict(self).values())


def _features(run_path: str, step: int, layer: str, size: int, seed: int, which: str, pool: bool) -> np.ndarray:
    a = snapshot_activations(run_path, S.device(), step, layer, size, seed, which, every_position=not pool)
    return SRC.features(a, which, pool)


@st.cache_resource(max_entries=32, ttl=S.TTL, show_spinner=False)
def _pca_fit(run_path: str, layer: str, size: int, seed: int, which: str, pool: bool, last: int):
    """A row's 2-D PCA fitted on its last snapshot (``analysis.pca_projection``): project, info."""
    return analysis.pca_projection(_features(run_path, last, layer, size, seed, which, pool), seed)


@st.cache_data(max_entries=512, ttl=S.TTL, show_spinner=False)
def _pca_step(run_path: str, layer: str, size: int, seed: int, which: str, pool: bool, steps: tuple[int, ...],
              i: int) -> tuple[np.ndarray, dict]:
    """Snapshot i of a row by PCA: one snapshot's features at a time, never the whole row's."""
    project, info = _pca_fit(run_path, layer, size, seed, which, pool, steps[-1])
    return project(_features(run_path, steps[i], layer, size, seed, which, pool)), info


@st.cache_resource(max_entries=32, ttl=S.TTL, show_spinner=False)
def _row_reducer(run_path: str, layer: str, size: int, seed: int, which: str, pool: bool, last: int):
    return analysis.fit_reducer(_features(run_path, last, layer, size, seed, which, pool), 50, seed)


@st.cache_data(max_entries=512, ttl=S.TTL, show_spinner=False)
def _row_step(run_path: str, layer: str, size: int, seed: int, which: str, pool: bool, method: str,
              steps: tuple[int, ...], i: int, perplexity: float, n_neighbors: int, min_dist: float,
              refine_iters: int) -> tuple[np.ndarray, dict]:
    """Snapshot i of a row by t-SNE / UMAP, warm-started from snapshot i-1 (itself cached) and rotated onto it."""
    prev = _row_step(run_path, layer, size, seed, which, pool, method, steps, i - 1, perplexity, n_neighbors,
                     min_dist, refine_iters)[0] if i > 0 else None
    reduce = _row_reducer(run_path, layer, size, seed, which, pool, steps[-1])
    x = reduce(_features(run_path, steps[i], layer, size, seed, which, pool))
    return analysis.embed_step(x, prev, method, perplexity=perplexity, n_neighbors=n_neighbors, min_dist=min_dist,
                               seed=seed, refine_iters=refine_iters, n_jobs=S.PROJECTION_JOBS)


@st.cache_data(max_entries=512, ttl=S.TTL, show_spinner=False)
def _cell_summary(run_path: str, dev: str, step: int, layer: str, size: int, seed: int, which: str,
                  pool: bool = False) -> dict:
    a = snapshot_activations(run_path, dev, step, layer, size, seed, which, every_position=not pool)
    return {"components": a["components"], "predictions": a["predictions"], "labels": a["labels"]}


def embedding_grid(p: GridParams, progress: Progress = None) -> dict:
    """One row per run: its snapshots at ``p.columns`` fractions of training, projected to 2-D (PCA fitted
    on the row's last snapshot; t-SNE / UMAP warm-started snapshot to snapshot, each rotated onto the one
    before), with the row's shared axis ranges, and per cell the mixture components and predictions."""
    with _ROWS_LOCK:
        done = _GRIDS.get(p.key())
    if done is not None:  # computed in this process: a colour change or rerun needs no cache lookups
        return done
    if p.method not in analysis.EMBED_METHODS:
        raise ValueError(f"method must be one of {analysis.EMBED_METHODS}, got {p.method!r}")
    if not p.runs:
        raise ValueError("choose at least one run")
    runs = [S.get_run(r, S.device()) for r in p.runs]
    layers = shared_layers(runs)
    if p.layer not in layers:
        raise ValueError(f"layer {p.layer!r} is not in every chosen run; shared: {layers}")
    check_same_test_set(runs)
    say = _say(progress)
    plan = [(r, tuple(steps_by_fraction(snapshot_steps(r, p.layer), p.columns))) for r in runs]
    total = sum(len(s) for _, s in plan)
    if p.method == "umap":
        say(0.0, "waiting for UMAP's one-time compilation")
        umap_warmup().join()
    name = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}[p.method]
    rows, done = [], 0
    first_labels = None
    for r, steps in plan:
        path = str(r.path)
        # one snapshot's activations at a time (pinned while its projection and cell summary read them); PCA
        # takes the last snapshot first: it is fitted on it
        coords, info = [None] * len(steps), {}
        for i in ([len(steps) - 1] + list(range(len(steps) - 1)) if p.method == "pca" else range(len(steps))):
            s = steps[i]
            say(done / total, f"{r.path.name}: {name} at step {s} ({done + 1}/{total})")
            with S.BUDGETS[SRC.BUDGET].pinned([(path, S.device(), int(s), p.layer, int(p.size), int(p.seed),
                                                "predicted", not p.pool)]):
                if p.method == "pca":
                    coords[i], info = _pca_step(path, p.layer, p.size, p.seed, p.which, p.pool, steps, i)
                else:
                    coords[i], info = _row_step(path, p.layer, p.size, p.seed, p.which, p.pool, p.method, steps, i,
                                                float(p.perplexity), int(p.n_neighbors), float(p.min_dist),
                                                int(p.refine_iters))
                _cell_summary(path, S.device(), s, p.layer, p.size, p.seed, p.which, p.pool)
            done += 1
        cells = [_cell_summary(path, S.device(), s, p.layer, p.size, p.seed, p.which, p.pool) for s in steps]
        if rows and not np.array_equal(cells[0]["labels"], first_labels):
            raise ValueError(f"{r.path.name} was shown on other inputs than {rows[0]['run']} (recorded probe "
                             f"batches differ): the grid needs the same images in every cell; choose runs recorded "
                             f"on the same probe, or runs the app can rebuild")
        if not rows:
            first_labels = cells[0]["labels"]
        xlim, ylim = analysis.embedding_limits(coords)
        rows.append({"run": r.path.name, "norm": r.norm, "steps": list(steps), "coords": coords, "xlim": xlim,
                     "ylim": ylim, "info": info, "components": [c["components"] for c in cells],
                     "predictions": [c["predictions"] for c in cells], "layer": S.layer_info(r, p.layer)})
    say(1.0, "done")
    first = snapshot_activations(str(runs[0].path), S.device(), plan[0][1][0], p.layer, int(p.size), int(p.seed),
                                 p.which, every_position=not p.pool)  # labels, indices: the same images in every cell
    out = {"rows": rows, "labels": first["labels"], "indices": first["indices"], "contexts": first["contexts"],
           "class_names": runs[0].class_names, "context_names": runs[0].context_names, "method": p.method,
           "total": len(A.test_data(A.dataset_name(runs[0]))) if SRC.live(runs[0]) else first["n"]}
    with _ROWS_LOCK:
        _GRIDS[p.key()] = out
        while len(_GRIDS) > 16:
            _GRIDS.popitem(last=False)
    return out


@st.cache_resource(max_entries=8, ttl=S.TTL, show_spinner=False)
def grid_figure(key: tuple, colour: str):
    """The embedding grid's figure for ``GridParams(*key)`` coloured by ``colour`` (built once: 0.5 s for 3 x 11
    cells of 1,000 points; shared read-only, st.plotly_chart copies it)."""
    grid = embedding_grid(GridParams(*key))
    groups, names = grid_colourings(grid)[colour]
    return FT.embedding_grid_figure(grid, groups, names, legend_title=colour, hover=grid_hover(grid))


def grid_colourings(grid: dict) -> dict[str, tuple[list[list[Optional[np.ndarray]]], list[str]]]:
    """Colour options: name -> (groups per row per cell (None where a row has none), group names)."""
    rows = grid["rows"]
    out: dict = {"class": ([[grid["labels"]] * len(r["steps"]) for r in rows], list(grid["class_names"]))}
    if grid["contexts"] is not None:
        out["superclass / context"] = ([[grid["contexts"]] * len(r["steps"]) for r in rows],
                                       list(grid["context_names"]))
    comps = [r["components"] for r in rows]
    if any(c is not None for row in comps for c in row):
        k = 1 + max(int(c.max()) for row in comps for c in row if c is not None)
        names = [f"component {i + 1}" for i in range(k)]
        ctx_layers = [r for r in rows if r["layer"]["uses_context"]]
        if ctx_layers and len(grid["context_names"]) >= k and all(r["layer"]["uses_context"] for r in rows
                                                                  if any(c is not None for c in r["components"])):
            names = [f"context {n}" for n in grid["context_names"][:k]]
        out["mixture component"] = (comps, names)
    if all(p is not None for r in rows for p in r["predictions"]):
        out["prediction (at that step)"] = ([r["predictions"] for r in rows], list(grid["class_names"]))
    return out


def grid_hover(grid: dict) -> np.ndarray:
    names = grid["class_names"]
    return np.asarray([f"test image #{int(i)} · {names[int(l)] if int(l) < len(names) else l}"
                       for i, l in zip(grid["indices"], grid["labels"])])


def grid_frame(grid: dict, colours: dict):
    """Every cell's coordinates as one long table: run, step, test index, x, y and every colouring."""
    import pandas as pd

    parts = []
    for ri, r in enumerate(grid["rows"]):
        for ci, s in enumerate(r["steps"]):
            c = r["coords"][ci]
            d = {"run": r["run"], "norm": r["norm"], "step": s, "test_index": grid["indices"], "x": c[:, 0],
                 "y": c[:, 1]}
            for name, (groups, gnames) in colours.items():
                g = groups[ri][ci]
                d[name] = ([gnames[int(v)] if int(v) < len(gnames) else int(v) for v in g] if g is not None
                           else [None] * len(c))
            parts.append(pd.DataFrame(d))
    return pd.concat(parts, ignore_index=True)


# ============================================================================ 4. cluster quality over training
QUALITY_METRICS = {
    "silhouette": ("silhouette by class", "Mean silhouette coefficient of the layer's features grouped by class "
                   "(-1..1; higher = tighter, better separated classes), in the feature space itself"),
    "knn_accuracy": ("k-NN accuracy (held out)", "Accuracy of a k-nearest-neighbour vote in the layer's features: "
                     "half of the images (seeded) classified by their neighbours among the other half"),
    "silhouette_context": ("silhouette by context", "Silhouette of the features grouped by superclass / context"),
    "nmi": ("NMI components ↔ classes", "Normalized mutual information between each image's mixture component "
            "under the layer and its class (0 = unrelated, 1 = the same partition)"),
    "ari": ("ARI components ↔ classes", "Adjusted Rand index between the mixture components and the classes "
            "(0 = chance, 1 = identical)"),
    "nmi_context": ("NMI components ↔ contexts", "Normalized mutual information between the mixture components "
                    "and the superclasses / contexts"),
    "ari_context": ("ARI components ↔ contexts", "Adjusted Rand index between the mixture components and the "
                    "superclasses / contexts"),
}


@st.cache_data(max_entries=4096, ttl=S.TTL, show_spinner=False)
def quality_at(run_path: str, dev: str, step: int, layer: str, size: int, seed: int, which: str, pool: bool,
               k: int) -> dict:
    """``analysis.cluster_quality`` of ``layer``'s features at snapshot ``step`` (classes; contexts when
    they are derived from the labels; the layer's mixture components when it has them)."""
    a = snapshot_activations(run_path, dev, step, layer, size, seed, which, every_position=not pool)
    f = SRC.features(a, which, pool)
    return analysis.cluster_quality(f, a["labels"], components=a["components"], contexts=a["contexts"], seed=seed,
                                    k=k)


def quality_over_training(run_names_: Sequence[str], layer: str, size: int, seed: int, which: str = "output",
                          pool: bool = False, k: int = 5, progress: Progress = None) -> dict:
    """:func:`quality_at` of every snapshot of every run (the same test images), and the runs' groups."""
    if not run_names_:
        raise ValueError("choose at least one run")
    runs = runs_of(run_names_)
    layers = shared_layers(runs)
    if layer not in layers:
        raise ValueError(f"layer {layer!r} is not in every chosen run; shared: {layers}")
    check_same_test_set(runs)
    plan = [(r, snapshot_steps(r, layer)) for r in runs]
    total = sum(len(s) for _, s in plan)
    say = _say(progress)
    out, done = [], 0
    for r, steps in plan:
        per = []
        for s in steps:
            say(done / total, f"{r.path.name}: features and cluster quality at step {s} ({done + 1}/{total})")
            per.append(quality_at(str(r.path), S.device(), s, layer, int(size), int(seed), which, bool(pool), int(k)))
            done += 1
        metrics = {m: np.asarray([q.get(m, np.nan) for q in per], dtype=np.float64) for m in QUALITY_METRICS}
        out.append({"run": r.path.name, "norm": r.norm, "steps": list(steps), "metrics": metrics,
                    "components_used": [q.get("components_used") for q in per],
                    "has_components": "nmi" in per[0], "n": per[0]["n"]})
    say(1.0, "done")
    return {"runs": out, "groups": groups_of(list(run_names_)), "layer": layer, "size": int(size)}


def available_metrics(q: dict) -> list[str]:
    """The metrics with a value for some run and step."""
    return [m for m in QUALITY_METRICS if any(np.isfinite(r["metrics"][m]).any() for r in q["runs"])]


def group_bands(q: dict, metric: str) -> list[dict]:
    """Per group of two or more runs: mean and sd (ddof 1) over its runs on the steps they all have."""
    by_run = {r["run"]: r for r in q["runs"]}
    out = []
    for g in q["groups"]:
        members = [by_run[m] for m in g["members"] if m in by_run]
        if len(members) < 2:
            continue
        steps = sorted(set.intersection(*(set(r["steps"]) for r in members)))
        if not steps:
            continue
        vals = np.stack([[r["metrics"][metric][r["steps"].index(s)] for s in steps] for r in members])
        if not np.isfinite(vals).any():
            continue  # e.g. NMI of a group whose layer has no mixture
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a step where fewer than 2 runs have a value
            mean, sd = np.nanmean(vals, axis=0), np.nanstd(vals, axis=0, ddof=1)
        out.append({"label": g["label"], "members": [r["run"] for r in members], "steps": steps,
                    "mean": mean, "sd": sd})
    return out


def quality_table(q: dict):
    """Per run: its group, snapshots, and each available metric at the first and the last snapshot; per
    group of several runs a row "LABEL (mean ± sd of N)" at the last common step."""
    import pandas as pd

    metrics = available_metrics(q)
    label_of = {m: g["label"] for g in q["groups"] for m in g["members"]}
    rows = []
    for r in q["runs"]:
        row = {"run": r["run"], "group": label_of.get(r["run"], r["run"]), "norm": r["norm"],
               "snapshots": len(r["steps"]), "last step": r["steps"][-1],
               "components used (last)": r["components_used"][-1]}
        for m in metrics:
            row[f"{QUALITY_METRICS[m][0]} · first"] = r["metrics"][m][0]
            row[f"{QUALITY_METRICS[m][0]} · last"] = r["metrics"][m][-1]
        rows.append(row)
    bands = {m: {b["label"]: b for b in group_bands(q, m)} for m in metrics}
    labels = list(dict.fromkeys(lab for per in bands.values() for lab in per))
    for label in labels:
        some = next(per[label] for per in bands.values() if label in per)
        row = {"run": f"{label} (mean of {len(some['members'])})", "group": label, "norm": "",
               "snapshots": len(some["steps"]), "last step": some["steps"][-1]}
        for m in metrics:
            band = bands[m].get(label)
            row[f"{QUALITY_METRICS[m][0]} · first"] = band["mean"][0] if band else np.nan
            row[f"{QUALITY_METRICS[m][0]} · last"] = band["mean"][-1] if band else np.nan
            row[f"{QUALITY_METRICS[m][0]} · last sd"] = band["sd"][-1] if band else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def quality_frame(q: dict):
    """Every run's metrics at every snapshot (long table for the download)."""
    import pandas as pd

    label_of = {m: g["label"] for g in q["groups"] for m in g["members"]}
    parts = []
    for r in q["runs"]:
        d = {"run": r["run"], "group": label_of.get(r["run"], r["run"]), "norm": r["norm"], "step": r["steps"]}
        d.update({m: r["metrics"][m] for m in QUALITY_METRICS})
        parts.append(pd.DataFrame(d))
    return pd.concat(parts, ignore_index=True)

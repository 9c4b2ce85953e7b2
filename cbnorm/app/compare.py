"""Page 4, compare normalizers: learning curves and a summary table of several runs (with the MN paper's
"steps to reach BatchNorm's best"), the runs grouped by recipe (seeds of one recipe: mean ± sd curves and
``cbnorm.curves.summarize_groups``' numbers per setting), a live panel running every chosen run's
studied layer on the same minibatch, the reproduction of the MN paper's claim (bench/results/reproduce_mn.json:
curves and its Table 3 beside the paper's numbers), and the benchmark results in bench/results (the speed
and convergence plots' data, and a generic listing of every result file; ``$CBNORM_BENCH`` reads another
folder)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import streamlit as st

from cbnorm import analysis
from cbnorm.curves import curve_of, summarize_groups
from cbnorm.runs import TRAINING_DEFAULTS, Run

from . import activations as A
from . import shared as S
from . import source as SRC


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
    """Test-error curves (one per run) against "epoch" or "step", for figures.curves_figure. Against steps, a
    run with dense evaluations (``--eval-every``: metrics.json "evals", a fixed test subset) is drawn as that
    curve, with its full-test accuracy at each epoch end as markers in the same legend group; other runs (and
    every run against epochs) as the epoch-end points joined."""
    out = []
    for i, name in enumerate(names):
        run = S.run_by_name(name)
        c = metric_curves(run)
        evals = [e for e in run.metrics.get("evals") or [] if isinstance(e, dict) and e.get("test_acc") is not None]
        if x_axis == "step" and evals:
            out.append({"name": name, "x": np.asarray([e["step"] for e in evals], dtype=np.float64),
                        "y": 1.0 - np.asarray([e["test_acc"] for e in evals], dtype=np.float64), "color": i,
                        "group": name, "width": 1.5})
            out.append({"name": f"{name} (full test, epoch ends)", "x": c["step"], "y": c["test_error"],
                        "mode": "markers", "color": i, "group": name, "showlegend": False})
        else:
            out.append({"name": name, "x": c[x_axis], "y": c["test_error"], "markers": True, "color": i})
    return out


def loss_series(names: Sequence[str], x_axis: str, window: int) -> list[dict]:
    """Loss curves: against steps, the training loss (moving average over ``window`` steps, solid) and the
    test loss at each epoch end (dotted, markers); against epochs, the test loss only."""
    out = []
    for i, name in enumerate(names):
        c = metric_curves(S.run_by_name(name))
        if x_axis == "step" and c["loss"].size:
            out.append({"name": name, "x": c["loss_step"], "y": analysis.smooth(c["loss"], window),
                        "color": i, "group": name, "width": 1.5})
        out.append({"name": f"{name} (test)", "x": c[x_axis], "y": c["test_loss"], "color": i, "group": name,
                    "dash": "dot", "markers": True, "showlegend": x_axis != "step" or not c["loss"].size})
    return out


def bench_variant(config: dict) -> Optional[str]:
    """The name under which ``bench/speed.py``'s whole-network part measured this run's setting, or None when
    it measured none like it: the shallow CNN (width 0.25) with the norm at conv3 only, MN's fit fraction
    0.25 and warm start as the "-fit25" / "-warm" variants."""
    model = config.get("model") or {}
    if not isinstance(model, dict) or model.get("name") != "shallow_cnn" or config.get("layers") != ["conv3"]:
        return None
    if (model.get("kwargs") or {}).get("width") != 0.25 or not isinstance(config.get("norm"), str):
        return None
    kw = config.get("norm_kwargs") or {}
    name = config["norm"]
    if name == "mn":
        frac = kw.get("fit_fraction", 1.0)
        if frac not in (1.0, 0.25):
            return None
        name += ("-fit25" if frac == 0.25 else "") + ("-warm" if kw.get("warm_start") else "")
    return name


def benchmark_cost(config: dict, speed: Optional[dict]) -> Optional[dict]:
    """What ``bench/results/speed.json`` measured for this run's setting, side by side with BatchNorm in one
    benchmark run: {"ratio" (one train step of the network with this norm / with BN, median), "q1", "q3",
    "K", "machine", "date", "clock"}; None when no benchmark covers the run. (A training log's wall time is
    not a cost: it measures whatever else ran on that machine.)"""
    variant = bench_variant(config)
    if variant is None or not isinstance(speed, dict):
        return None
    for rec in speed.get("network") or []:
        if isinstance(rec, dict) and rec.get("layer") == variant and isinstance(rec.get("ratio_to_bn_network"),
                                                                                (int, float)):
            machine = speed.get("machine") if isinstance(speed.get("machine"), dict) else {}
            return {"ratio": float(rec["ratio_to_bn_network"]), "q1": rec.get("ratio_q1"), "q3": rec.get("ratio_q3"),
                    "K": rec.get("K"), "machine": machine, "date": speed.get("date"), "clock": speed.get("clock")}
    return None


def machine_label(machine: dict) -> str:
    """'AMD EPYC, 2 cores, 1 thread, torch 2.13.0+cpu, cpu' from a benchmark's ``machine`` record."""
    parts = [machine.get("cpu")]
    if machine.get("cpu_count"):
        parts.append(f"{machine['cpu_count']} cores")
    if machine.get("torch_threads"):
        parts.append(f"{machine['torch_threads']} thread{'s' if machine['torch_threads'] != 1 else ''}")
    parts += [f"torch {machine['torch']}" if machine.get("torch") else None, machine.get("device")]
    return ", ".join(str(p) for p in parts if p)


def cost_caption(bench_dir: str, names: Sequence[str]) -> str:
    """What the table's cost column is, where and when it was measured, and which runs it does not cover."""
    speed = bench_json(str(Path(bench_dir) / "speed.json"))
    covered = [n for n in names if benchmark_cost(S.run_by_name(n).config, speed) is not None]
    if not covered:
        return ("**Step cost vs BN**: no benchmark covers the chosen runs (bench/results/speed.json measures the "
                "shallow CNN of width 0.25 with the norm at conv3), so no cost is shown. The trainers' wall times "
                "are not shown as a cost: they measure what else ran on their machines.")
    cost = benchmark_cost(S.run_by_name(covered[0]).config, speed) or {}
    when = f" on {cost['date']}" if cost.get("date") else ""
    missing = [n for n in names if n not in covered]
    return ("**Step cost vs BN**: one AdamW training step of the shallow CNN (width 0.25, batch 128, 28×28) with the "
            f"run's norm at conv3 (K={cost.get('K')}), divided by the same step with BatchNorm, measured side by side "
            f"by bench/speed.py on {machine_label(cost.get('machine') or {})}{when} ({cost.get('clock') or 'wall'} "
            "clock; median over repetitions)."
            + (f" Not covered by the benchmark, so left empty: {', '.join(missing)}." if missing else "")
            + " The trainers' wall times are not a cost (they measure what else ran on their machines).")


def compare_table(names: Sequence[str], reference: Optional[str], bench_dir: Optional[str] = None):
    """The comparison table: final (honest) and oracle accuracy, best accuracy, steps to reach the
    reference (BatchNorm) run's best accuracy, the step cost relative to BatchNorm that ``bench/speed.py``
    measured side by side for the run's setting (:func:`benchmark_cost`; empty where no benchmark covers
    it), parameter count. The trainer's own wall time is not shown: it measures the machine's load."""
    import pandas as pd

    speed = bench_json(str(Path(bench_dir) / "speed.json")) if bench_dir else None

    rows = []
    target = None
    if reference:
        ref = S.run_by_name(reference)
        target = ref.metrics.get("best_test_acc")
        if target is None:
            target = float(np.nanmax(metric_curves(ref)["test_acc"]))
    for name in names:
        run = S.run_by_name(name)
        m, c = run.metrics, metric_curves(run)
        ok = np.isfinite(c["test_acc"])
        reach = analysis.steps_to_reach(c["step"][ok], c["test_acc"][ok], target) if target is not None else None
        rows.append({
            "run": name, "norm": run.norm,
            "test acc": m.get("test_acc"),
            "oracle acc": m.get("test_acc_oracle"),
            "best acc": m.get("best_test_acc"),
            "steps to BN best": reach,
            "step cost vs BN (bench)": (benchmark_cost(run.config, speed) or {}).get("ratio"),
            "params": m.get("params") if m.get("params") is not None or run.model is None
            else sum(p.numel() for p in run.model.parameters()),
            "steps": m.get("steps_done")})
    return pd.DataFrame(rows), target


COMPARE_HELP = {
    "test acc": "Last-epoch test accuracy, honest: context layers get the context inferred from the image",
    "oracle acc": "Test accuracy with the true superclass given to context layers; it is derived from the label, "
                  "so it leaks the answer (an upper bound, not a result)",
    "best acc": "Best honest test accuracy over the epochs",
    "steps to BN best": "First evaluated step at which the test accuracy reaches the BatchNorm reference's best "
                        "(MN paper's measure); None = never",
    "step cost vs BN (bench)": "Time of one training step of the network with this norm divided by the same step "
                               "with BatchNorm, measured side by side in one run of bench/speed.py (median over "
                               "repetitions; machine and date below the table). Empty: no benchmark measured this "
                               "run's setting. The trainer's wall time is not a cost: it measures the machine's load",
    "params": "Number of parameters", "steps": "Optimizer steps trained"}


@st.cache_data(max_entries=4, ttl=S.TTL, show_spinner=False)
def live_outputs(run_paths: tuple[str, ...], dev: str, size: int, seed: int, which: str = "x_hat") -> list[dict]:
    """The studied layer of each run on the SAME minibatch (same test images): pooled values of ``which``
    (``analysis.VIEWS``; capped at MAX_VALUES) and their statistics like with like (``analysis.view_stats``:
    pooled, and median |.| over channels): distances to N(0, 1) for x_hat and for the input standardized per
    channel, the shape only for the output after the affine."""
    if which not in analysis.VIEWS:
        raise ValueError(f"which must be one of {analysis.VIEWS}, got {which!r}")
    runs = [S.get_run(p, dev) for p in run_paths]
    datasets = {A.dataset_name(r) for r in runs if SRC.live(r)}  # recorded-only runs: their own probe batch
    if len(datasets) > 1:
        raise ValueError(f"the chosen runs use different datasets ({sorted(datasets)}); choose runs of one dataset "
                         f"to run them on the same minibatch")
    out = []
    for path, run in zip(run_paths, runs):
        layer = S.studied_layer(run)
        acts = SRC.activations(path, dev, SRC.FINAL, layer, size, seed)
        info = acts["layer"]
        chans = list(range(info["num_features"]))
        per = SRC.values(acts, which, chans)
        pooled = per.reshape(-1)
        shape_of = (analysis.standardize_rows(per) if which == "input" else per).reshape(-1)
        sub = pooled.size > S.MAX_VALUES
        if sub:
            keep = np.random.default_rng(seed).choice(pooled.size, S.MAX_VALUES, replace=False)
            pooled, shape_of = pooled[keep], shape_of[keep]
        st_pool = analysis.view_stats(shape_of[None, :], "x_hat" if which == "input" else which)
        st_pool.update(mean=pooled[None].mean(axis=1), std=pooled[None].std(axis=1))
        st_ch = analysis.view_stats(per, which)
        out.append({"name": S.run_label(run), "norm": run.norm, "layer": layer, "note": acts["note"], "values": pooled.astype(np.float32),
                    "subsampled": sub, "pooled": {k: float(v[0]) for k, v in st_pool.items()},
                    "channel_median": {k: float(np.median(np.abs(v))) for k, v in st_ch.items()}})
    return out


def live_table(outs: Sequence[dict]):
    import pandas as pd

    rows = []
    for o in outs:  # the distances to N(0, 1) only where the view has them (not the output after the affine)
        row = {"run": o["name"], "layer": o["layer"], "mean": o["pooled"]["mean"], "std": o["pooled"]["std"],
               "skew": o["pooled"]["skewness"], "ex. kurt": o["pooled"]["excess_kurtosis"]}
        if "ks_to_normal" in o["pooled"]:
            row["KS"] = o["pooled"]["ks_to_normal"]
        row.update({"med |skew| per ch.": o["channel_median"]["skewness"],
                    "med |ex. kurt| per ch.": o["channel_median"]["excess_kurtosis"]})
        if "ks_to_normal" in o["channel_median"]:
            row["med KS per ch."] = o["channel_median"]["ks_to_normal"]
        rows.append(row)
    return pd.DataFrame(rows)


LIVE_HELP = {
    "mean": "Mean of all values (channels pooled)", "std": "Standard deviation of all values",
    "skew": "Skewness of the pooled values (0: symmetric)", "ex. kurt": "Excess kurtosis of the pooled values (0: Gaussian)",
    "KS": "Kolmogorov-Smirnov distance to N(0, 1) of the pooled x̂ (of the input: each channel standardized first)",
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


#: keys of a result file that the page draws above (curves, summaries): the generic listing leaves them out
DRAWN_ABOVE = {"reproduce_mn.json": ("summary", "runs")}


@st.cache_data(max_entries=4, ttl=300, show_spinner=False)
def bench_results(bench_dir: str) -> list[dict]:
    """Every ``*.json`` in ``bench_dir``: its tables (lists of records), the machine it ran on
    (a "machine" or "env" object) and its other scalar fields (without what :data:`DRAWN_ABOVE` names);
    unreadable files come with ``error``."""
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
            if k in DRAWN_ABOVE.get(p.name, ()):
                continue
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


# ============================================================================ runs grouped by recipe (seeds)
#: training options that change nothing a run learns (bookkeeping, environment) and the seed itself: runs
#: that differ only in these are seeds of one recipe
NOT_RECIPE = ("seed", "world_size", "out", "resume", "device", "threads", "quiet", "snapshot_every",
              "snapshot_early", "eval_batch_size")
#: training options stored again at the top of config.json (the top-level value is the one used)
_DUPLICATED = ("dataset", "model", "norm", "layers", "width", "norm_kwargs", "model_kwargs", "limit_train",
               "limit_test", "input_norm")
#: recipe fields that say which normalizer a run has: groups differing only in these share a *setting*
#: (the same model, data and optimisation), and the BatchNorm group of a setting is its reference
#: (``model.predict_contexts``: the context head a context layer's run trains beside it, part of that norm's use)
NORM_FIELDS = ("norm", "components", "contexts", "context_priors", "context_head", "input_norm",
               "model.predict_contexts")
#: fields whose value alone names them in a group label ("rmsprop", not "optimizer rmsprop")
_BARE = ("task", "dataset", "model", "optimizer", "layers", "schedule", "norm")
#: what a setting's caption names first (then whatever else tells the settings apart)
SETTING_SUMMARY = ("dataset", "model", "model.width", "layers", "optimizer", "lr", "batch_size", "epochs",
                   "schedule")
_SEP = " · "


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_value(x) for x in v)
    if v is None:
        return "none"
    return str(v)


def recipe(config: dict) -> dict[str, str]:
    """What makes a run what it is, seed aside, as flat {field: JSON text}: task, dataset (name, training and
    test limits), model name and kwargs, norm and norm_kwargs, studied layers, the context spec and every
    training option except the seed and runtime keys (:data:`NOT_RECIPE`). Training options a run's
    config lacks (written by an older trainer) count as the trainer's defaults."""
    dumps = lambda v: json.dumps(v, sort_keys=True)  # noqa: E731
    ds = config.get("dataset") or {}
    model = config.get("model") or {}
    out = {"task": dumps(config.get("task", "classify")), "dataset": dumps(ds.get("name")),
           "limit_train": dumps(ds.get("limit_train")), "limit_test": dumps(ds.get("limit_test")),
           "model": dumps(model.get("name")), "norm": dumps(config.get("norm")),
           "layers": dumps(config.get("layers")), "input_norm": dumps(config.get("input_norm")),
           "contexts": dumps((config.get("contexts") or {}).get("spec"))}
    for k, v in sorted((model.get("kwargs") or {}).items()):
        out[f"model.{k}"] = dumps(v)
    for k, v in sorted((config.get("norm_kwargs") or {}).items()):
        out[f"norm_kwargs.{k}"] = dumps(v)
    training = {**{k: v for k, v in TRAINING_DEFAULTS.items() if k not in NOT_RECIPE}, **(config.get("training") or {})}
    for k, v in sorted(training.items()):
        if k not in NOT_RECIPE and k not in _DUPLICATED:
            out[k] = dumps(v)
    return out


def _is_norm_field(key: str) -> bool:
    return key in NORM_FIELDS or key.startswith("norm_kwargs.")


def _describe(fields: dict[str, str], keys: Sequence[str]) -> str:
    """" · "-joined ``keys`` of a recipe: "rmsprop", "lr 0.01", "em_iters 1" (norm_kwargs./model. dropped)."""
    parts = []
    for k in keys:
        raw = json.loads(fields[k]) if k in fields else None
        short = k.split(".", 1)[1] if k.startswith(("norm_kwargs.", "model.")) else k
        if raw is None or raw is False:  # absent, null or off: "no context_head", not "context_head —"
            parts.append(f"no {short}")
        elif raw is True:
            parts.append(short)
        else:
            parts.append(_value(raw) if k in _BARE else f"{short} {_value(raw)}")
    return _SEP.join(parts)


def _differing(recipes: Sequence[dict[str, str]]) -> list[str]:
    keys = list(dict.fromkeys(k for r in recipes for k in r))
    return [k for k in keys if len({r.get(k) for r in recipes}) > 1]


def _name_prefix(names: Sequence[str]) -> str:
    """The common prefix of a group's run names without a trailing seed marker ("fmnist-bn", "fmnist-bn-s1"
    -> "fmnist-bn"; "bn-seed0", "bn-seed1" -> "bn"); one run: its name."""
    if len(names) == 1:
        return names[0]
    p = os.path.commonprefix(list(names))
    for marker in ("seed", "s"):
        stripped = p.rstrip("-_. ")
        if stripped.lower().endswith(marker) and len(stripped) > len(marker) and stripped[-len(marker) - 1] in "-_. ":
            p = stripped[:-len(marker)]
    return p.rstrip("-_. ")


def group_runs(runs: Sequence[tuple[str, dict, dict]]) -> list[dict]:
    """Runs ``(name, config.json dict, metrics.json dict)`` grouped by :func:`recipe`: runs of one group differ
    only in ``config["training"]["seed"]``. Groups that differ only in the norm fields (:data:`NORM_FIELDS`,
    norm_kwargs) share a *setting*. Each group::

        {"label": the common prefix of its run names when that is a distinct name (else the recipe text),
         "recipe": norm and whatever else tells it from the other groups ("mn · lr 0.01"),
         "norm", "setting": its setting's label ("" when there is one setting; else what tells the settings
         apart, e.g. "lr 0.01"), "setting_recipe": the setting in words (dataset, model, optimiser, ...),
         "members": [(run name, seed), ...] by seed, "seeds": [...],
         "metrics": [(seed, metrics), ...] (summarize_groups' input), "duplicates": run names left out
         because an earlier run of the group has their seed, "is_reference": the setting's BatchNorm}

    Runs without any test curve (no "evals", no epochs) are left out. Sorted by setting, reference first,
    then label."""
    by_key: dict[str, dict] = {}
    for name, config, metrics in sorted(runs, key=lambda r: r[0]):
        if not curve_of(metrics)[0].size:
            continue
        rec = recipe(config)
        key = json.dumps(rec, sort_keys=True)
        g = by_key.setdefault(key, {"recipe_fields": rec, "norm": str(config.get("norm")), "runs": []})
        g["runs"].append((name, int((config.get("training") or {}).get("seed", 0) or 0), metrics))
    groups = list(by_key.values())
    if not groups:
        return []
    recs = [g["recipe_fields"] for g in groups]
    diff = _differing(recs)
    setting_keys = [k for k in diff if not _is_norm_field(k)]
    # a norm's own options are named only where groups of that norm differ in them ("mn · em_iters 1")
    norm_keys = {norm: [k for k in _differing([g["recipe_fields"] for g in groups if g["norm"] == norm])
                        if _is_norm_field(k)] for norm in {g["norm"] for g in groups}}
    settings = {json.dumps({k: r.get(k) for k in setting_keys}, sort_keys=True) for r in recs}
    for g in groups:
        rec = g["recipe_fields"]
        members, seen, dups = [], set(), []
        for name, seed, m in sorted(g["runs"], key=lambda r: (r[1], r[0])):
            if seed in seen:
                dups.append(name)
                continue
            seen.add(seed)
            members.append((name, seed, m))
        g.update(members=[(n, s) for n, s, _ in members], seeds=[s for _, s, _ in members],
                 metrics=[(s, m) for _, s, m in members], duplicates=dups,
                 setting=_describe(rec, setting_keys) if len(settings) > 1 else "",
                 recipe=_describe(rec, ["norm", *norm_keys[g["norm"]], *setting_keys]))
        g["setting_recipe"] = _describe(rec, [k for k in SETTING_SUMMARY if k in rec]
                                        + [k for k in setting_keys if k not in SETTING_SUMMARY])
        del g["runs"]
    # labels: the run names' common prefix when every group has a distinct, non-trivial one
    prefixes = [_name_prefix([n for n, _ in g["members"]]) for g in groups]
    use_prefix = all(len(p) >= 2 for p in prefixes) and len(set(prefixes)) == len(prefixes)
    for g, p in zip(groups, prefixes):
        g["label"] = p if use_prefix else g["recipe"]
    for setting in {g["setting"] for g in groups}:
        members = [g for g in groups if g["setting"] == setting]
        bn = [g for g in members if g["norm"] == "bn"]
        bn.sort(key=lambda g: (-len(g["seeds"]), g["label"]))
        for g in members:
            g["is_reference"] = bool(bn) and g is bn[0]
    groups.sort(key=lambda g: (g["setting"], not g["is_reference"], g["label"]))
    for g in groups:
        del g["recipe_fields"]
    return groups


NO_REFERENCE = "(no BatchNorm group)"


def summarize_seed_groups(groups: Sequence[dict]) -> dict[str, dict]:
    """``cbnorm.curves.summarize_groups`` of each setting of :func:`group_runs`' groups (keyed by group
    label, the setting's BatchNorm group as the reference): {setting: {"reference": label or None,
    "summary": summarize_groups' entry of that setting ({"norms": {label: ...}, "reference_acc", ...}),
    "skipped": {label: why}}}. A group whose seeds share no evaluated step is skipped."""
    out: dict[str, dict] = {}
    for setting in dict.fromkeys(g["setting"] for g in groups):
        members = [g for g in groups if g["setting"] == setting]
        skipped, ok = {}, {}
        for g in members:
            common = set.intersection(*(set(curve_of(m)[0].tolist()) for _, m in g["metrics"]))
            if not common:
                skipped[g["label"]] = "its seeds share no evaluated step"
            else:
                ok[g["label"]] = list(g["metrics"])
        ref = next((g["label"] for g in members if g["is_reference"] and g["label"] in ok), None)
        res = summarize_groups({"setting": ok}, reference=ref or NO_REFERENCE) if ok else {"settings": {}}
        out[setting] = {"reference": ref, "skipped": skipped,
                        "summary": res["settings"].get("setting", {"norms": {}})}
    return out


def _runs_fingerprint(root: Path, names: Sequence[str]) -> tuple:
    fp = []
    for n in names:
        try:
            fp.append((n, (root / n / "metrics.json").stat().st_mtime_ns, (root / n / "config.json").stat().st_mtime_ns))
        except OSError:
            fp.append((n, None, None))
    return tuple(fp)


@st.cache_data(max_entries=8, ttl=S.TTL, show_spinner=False)
def _seed_groups_cached(root: str, fingerprint: tuple, dev: str) -> tuple[list[dict], dict]:
    runs = []
    for name, *_ in fingerprint:
        run = S.get_run(str(Path(root) / name), dev)
        m = run.metrics  # what summarize_groups reads (not the per-step loss and lr)
        runs.append((name, run.config, {k: m.get(k) for k in ("evals", "epochs", "test_acc", "steps_done")}))
    groups = group_runs(runs)
    return groups, summarize_seed_groups(groups)


def seed_groups(names: Sequence[str]) -> tuple[list[dict], dict]:
    """:func:`group_runs` and :func:`summarize_seed_groups` of the named runs of the runs directory, cached
    until a run's config.json or metrics.json changes."""
    root = S.runs_root()
    return _seed_groups_cached(str(root), _runs_fingerprint(root, sorted(names)), S.device())


def seed_series(groups: Sequence[dict], summary: dict, colors: dict[str, int], each_seed: bool = False) -> list[dict]:
    """Series of figures.seed_band_figure for one setting: test error 1 - accuracy, mean over seeds and
    ±1 sd (error's sd = accuracy's), on the steps every seed has; ``each_seed`` adds every seed's curve."""
    out = []
    norms = summary.get("norms", {})
    for g in groups:
        s = norms.get(g["label"])
        if s is None:
            continue
        n = len(s["seeds"])
        out.append({"name": f"{g['label']} ({n} seed{'s' if n != 1 else ''})", "x": np.asarray(s["steps"]),
                    "mean": 1.0 - np.asarray(s["mean"], dtype=np.float64),
                    "sd": np.asarray(s["sd"], dtype=np.float64) if n > 1 else None,
                    "color": colors.get(g["label"], 0), "reference": bool(g["is_reference"]),
                    "seeds": [(seed, 1.0 - np.asarray(c, dtype=np.float64)) for seed, c in zip(s["seeds"], s["curves"])]
                    if each_seed and n > 1 else []})
    return out


def _numeric(df, columns: Sequence[str]):
    """``columns`` of ``df`` as floats (None -> NaN), also when every value is None."""
    for c in columns:
        if c in df.columns:
            df[c] = df[c].astype("float64")
    return df


def _fmt_steps(v: Optional[float]) -> str:
    return "never" if v is None else f"{v:,.0f}"


def _ci(ci: Optional[Sequence[float]], reached: int, n: int) -> str:
    if ci is None:
        return f"— ({reached} of {n} seed{'s' if n != 1 else ''} reach{'es' if n == 1 else ''} it)" if n else "—"
    return f"[{ci[0]:,.0f}, {ci[1]:,.0f}]"


def _yes_no(v: Optional[bool]) -> str:
    return "—" if v is None else ("yes" if v else "no")


def seeds_table(groups: Sequence[dict], summary: dict):
    """One row per group of a setting from summarize_groups' numbers: seeds, best accuracy (max of each
    seed's curve) mean and sd, steps to reach BN's best on the mean curve and per seed with the bootstrap
    95% interval of their mean, the reduction against BN in %, and whether the best-accuracy difference to
    BN exceeds the seed spread (twice its standard error), with Welch's p."""
    import pandas as pd

    rows = []
    norms = summary.get("norms", {})
    for g in groups:
        s = norms.get(g["label"])
        if s is None:
            continue
        n = len(s["seeds"])
        best = np.asarray(s["best_acc"], dtype=np.float64)
        has_ref = "best_acc_mean" in s
        mean = s["best_acc_mean"] if has_ref else float(best.mean())
        sd = s["best_acc_sd"] if has_ref else (float(best.std(ddof=1)) if n > 1 else 0.0)
        per_seed = s.get("steps_to_reference_per_seed") or []
        rows.append({
            "group": g["label"], "recipe": g["recipe"], "seeds": n, "seed ids": ", ".join(str(x) for x in s["seeds"]),
            "runs": ", ".join(name for name, _ in g["members"]),
            "best acc": f"{mean:.2%} ± {sd:.2%}" if n > 1 else f"{mean:.2%} (1 seed)",
            "best acc mean": mean, "best acc sd": sd if n > 1 else None,
            "steps to BN best": s.get("steps_to_reference"),
            "per seed": ", ".join(_fmt_steps(x) for x in per_seed) if has_ref else "—",
            "95% interval (seeds)": _ci(s.get("steps_to_reference_ci95"), s.get("seeds_reaching_reference", 0), n)
            if has_ref else "—",
            "reduction vs BN %": s.get("reduction_vs_reference_pct"),
            "beyond seed spread": "reference" if g["is_reference"] else _yes_no(s.get("difference_exceeds_seed_spread"))
            + (" (one seed: BN's spread only)" if n == 1 and s.get("difference_exceeds_seed_spread") is not None else ""),
            "Welch p": s.get("welch_p"),
            "curve": f"{s['source']} ({len(s['steps'])} steps)"})
    order = ["group", "seeds", "best acc", "steps to BN best", "per seed", "95% interval (seeds)",
             "reduction vs BN %", "beyond seed spread", "Welch p", "recipe", "runs", "seed ids", "best acc mean",
             "best acc sd", "curve"]
    df = pd.DataFrame(rows, columns=order)
    return _numeric(df, ("best acc mean", "best acc sd", "steps to BN best", "reduction vs BN %", "Welch p"))


SEEDS_HELP = {
    "group": "Runs of one recipe (everything but the seed); the label is their names' common part",
    "recipe": "The norm and whatever else tells this group from the others",
    "seeds": "Number of seeds (runs) in the group",
    "best acc": "Best test accuracy of each seed's curve: mean ± sd over seeds",
    "best acc mean": "Mean over seeds of each seed's best test accuracy",
    "best acc sd": "Standard deviation over seeds of the best test accuracy (none for one seed)",
    "steps to BN best": "First evaluated step where the group's MEAN curve reaches the maximum of BatchNorm's "
                        "mean curve (the MN paper's Table 3 measure); None = never",
    "per seed": "The same step for each seed's own curve",
    "95% interval (seeds)": "Bootstrap 95% interval of the mean over seeds of the per-seed steps (only when every "
                            "seed reaches BN's best)",
    "reduction vs BN %": "1 − steps / BN's steps, in percent (the paper's \"31-47% fewer steps\")",
    "beyond seed spread": "Whether |best-accuracy difference to BN| exceeds twice its standard error over seeds",
    "Welch p": "Welch's t-test p-value of the best accuracies against BN's (two seeds or more on both sides)",
    "curve": "The curve used: dense 'evals' on a fixed test subset, or the full test set at epoch ends"}


# ============================================================================ the MN paper's claim, reproduced
REPRODUCE_FILE = "reproduce_mn.json"
PAPER_DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
SETTING_NAMES = {"small": "small learning rate", "large": "large learning rate"}


def _check_group(where: str, g: Any) -> None:
    if not isinstance(g, dict):
        raise ValueError(f"{where} is not an object")
    for k in ("steps", "mean", "sd", "seeds"):
        if not isinstance(g.get(k), list):
            raise ValueError(f"{where} has no list {k!r}")
    n = len(g["steps"])
    if not n:
        raise ValueError(f"{where} has no steps")
    for k in ("mean", "sd"):
        if len(g[k]) != n:
            raise ValueError(f"{where}: {k!r} has {len(g[k])} values but 'steps' has {n}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in g[k]):
            raise ValueError(f"{where}: {k!r} holds values that are not numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in g["steps"]):
        raise ValueError(f"{where}: 'steps' holds values that are not numbers")


@st.cache_data(max_entries=4, ttl=300, show_spinner=False)
def reproduction(bench_dir: str) -> dict:
    """bench/results/reproduce_mn.json (bench/reproduce_mn.py) checked for what the page draws:
    {"status": "missing" | "malformed" | "ok", "message" (why, when not ok), "path", and when ok
    "settings" {name: summarize_groups' entry}, "reference_norm", "paper", "machine", "protocol",
    "failed" (run folders that failed)}."""
    path = Path(bench_dir) / REPRODUCE_FILE
    out: dict[str, Any] = {"status": "missing", "message": None, "path": str(path)}
    if not path.exists():
        out["message"] = (f"No `{REPRODUCE_FILE}` in `{bench_dir}` yet: `python bench/reproduce_mn.py` runs the "
                          "MN paper's protocol and writes it.")
        return out
    out["status"] = "malformed"
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        out["message"] = f"`{REPRODUCE_FILE}` cannot be read: {err}"
        return out
    try:
        if not isinstance(obj, dict):
            raise ValueError("it is not a JSON object")
        summary = obj.get("summary")
        if not isinstance(summary, dict) or not isinstance(summary.get("settings"), dict) or not summary["settings"]:
            raise ValueError("it has no 'summary' with 'settings' (the output of cbnorm.train.sweep.summarize)")
        for name, entry in summary["settings"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("norms"), dict) or not entry["norms"]:
                raise ValueError(f"summary.settings.{name} has no 'norms'")
            for norm, g in entry["norms"].items():
                _check_group(f"summary.settings.{name}.norms.{norm}", g)
            for k in ("reference_acc", "reference_step"):
                if entry.get(k) is not None and not isinstance(entry[k], (int, float)):
                    raise ValueError(f"summary.settings.{name}.{k} is not a number")
    except ValueError as err:
        out["message"] = f"`{REPRODUCE_FILE}` is not in the expected shape: {err}"
        return out
    paper = obj.get("paper") if isinstance(obj.get("paper"), dict) else {}
    order = sorted(summary["settings"], key=lambda n: (list(SETTING_NAMES).index(n) if n in SETTING_NAMES
                                                        else len(SETTING_NAMES), n))  # small (Table 3) first
    out.update(status="ok", settings={n: summary["settings"][n] for n in order},
               reference_norm=str(summary.get("reference_norm") or "bn"),
               paper=paper, machine=obj.get("machine") if isinstance(obj.get("machine"), dict) else {},
               protocol=obj.get("protocol") if isinstance(obj.get("protocol"), dict) else {},
               failed=[str(f) for f in obj.get("failed") or [] if isinstance(f, str)])
    return out


def reproduction_series(entry: dict, reference: str = "bn") -> list[dict]:
    """Mean ± sd test-error series of each norm of one setting of reproduce_mn.json."""
    out = []
    for i, (norm, g) in enumerate(entry["norms"].items()):
        n = len(g["seeds"])
        out.append({"name": f"{norm} ({n} seed{'s' if n != 1 else ''})", "x": np.asarray(g["steps"]),
                    "mean": 1.0 - np.asarray(g["mean"], dtype=np.float64),
                    "sd": np.asarray(g["sd"], dtype=np.float64) if n > 1 else None,
                    "color": i, "reference": norm == reference})
    return out


def _num(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _paper_entry(paper: dict, dataset: str, setting: str, norm: str) -> dict:
    d = paper.get(dataset)
    s = d.get(setting) if isinstance(d, dict) else None
    e = s.get(norm) if isinstance(s, dict) else None
    return e if isinstance(e, dict) else {}


def reproduction_table(entry: dict, setting: str, paper: dict, reference: str = "bn"):
    """The MN paper's Table 3 in our numbers, one row per norm of one setting: steps to reach BN's best (mean
    curve; each seed's; the bootstrap 95% interval), the reduction against BN in %, the best accuracy mean ±
    sd over seeds (in %, as the paper), whether the difference to BN exceeds the seed spread; beside them the
    paper's steps, maximum accuracy and reduction for each dataset of its "paper" key."""
    import pandas as pd

    datasets = [d for d, v in paper.items() if isinstance(v, dict)]
    rows = []
    for norm, g in entry["norms"].items():
        n = len(g["seeds"])
        mean, sd = _num(g.get("best_acc_mean")), _num(g.get("best_acc_sd"))
        per_seed = g.get("steps_to_reference_per_seed") if isinstance(g.get("steps_to_reference_per_seed"), list) else []
        ci = g.get("steps_to_reference_ci95")
        ci = ci if isinstance(ci, list) and len(ci) == 2 and all(_num(x) is not None for x in ci) else None
        row = {"norm": norm, "seeds": n,
               "steps to BN best": _num(g.get("steps_to_reference")),
               "per seed": ", ".join(_fmt_steps(_num(x)) for x in per_seed) or "—",
               "95% interval (seeds)": _ci(ci, int(_num(g.get("seeds_reaching_reference")) or 0), n),
               "reduction vs BN %": _num(g.get("reduction_vs_reference_pct")),
               "best acc %": (f"{100 * mean:.2f} ± {100 * sd:.2f}" if mean is not None and sd is not None and n > 1
                              else f"{100 * mean:.2f}" if mean is not None else "—"),
               "best acc mean %": 100 * mean if mean is not None else None,
               "best acc sd %": 100 * sd if sd is not None else None,
               "beyond seed spread": "reference" if norm == reference
               else _yes_no(g.get("difference_exceeds_seed_spread")),
               "Welch p": _num(g.get("welch_p"))}
        for d in datasets:
            label = PAPER_DATASETS.get(d, d)
            p, ref = _paper_entry(paper, d, setting, norm), _paper_entry(paper, d, setting, reference)
            steps, ref_steps = _num(p.get("steps_to_bn_best")), _num(ref.get("steps_to_bn_best"))
            row[f"paper {label}: steps to BN best"] = steps
            row[f"paper {label}: reduction %"] = (100.0 * (1 - steps / ref_steps) if steps is not None and ref_steps
                                                  else None)
            row[f"paper {label}: max acc %"] = _num(p.get("max_acc"))
        rows.append(row)
    labels = [PAPER_DATASETS.get(d, d) for d in datasets]
    order = (["norm", "seeds", "steps to BN best"] + [f"paper {x}: steps to BN best" for x in labels]
             + ["reduction vs BN %"] + [f"paper {x}: reduction %" for x in labels]
             + ["best acc %"] + [f"paper {x}: max acc %" for x in labels]
             + ["per seed", "95% interval (seeds)", "beyond seed spread", "Welch p", "best acc mean %", "best acc sd %"])
    df = pd.DataFrame(rows, columns=order)
    return _numeric(df, [c for c in df.columns if c not in ("norm", "seeds", "per seed", "95% interval (seeds)",
                                                            "best acc %", "beyond seed spread")])


REPRO_HELP = {
    "steps to BN best": "First evaluated step where the norm's mean curve over seeds reaches the maximum of "
                        "BatchNorm's mean curve (Table 3's 'steps to reach BN's maximum test accuracy')",
    "per seed": "The same step for each seed's curve (never = that seed does not reach it)",
    "95% interval (seeds)": "Bootstrap 95% interval of the mean of the per-seed steps",
    "reduction vs BN %": "1 − steps / BN's steps, in percent; the paper reports 31-47% for MN",
    "best acc %": "Best test accuracy of each seed's curve, mean ± sd over seeds, in percent",
    "beyond seed spread": "Whether |best-accuracy difference to BN| exceeds twice its standard error",
    "Welch p": "Welch's t-test p-value of the best accuracies against BN's"}


def repro_label(column: str) -> str:
    """Short header of a column of :func:`reproduction_table` (the paper's columns follow ours: "↳ CIFAR-10
    (paper)")."""
    if column.startswith("paper "):
        return f"↳ {column[len('paper '):].split(':')[0]} (paper)"
    return column


def repro_help(column: str) -> Optional[str]:
    if column.startswith("paper "):
        ds, what = column[len("paper "):].split(": ", 1)
        return {"steps to BN best": f"The paper's Table 3 for {ds}: steps to reach BN's maximum test accuracy",
                "reduction %": f"1 − MN's steps / BN's steps from the paper's Table 3 ({ds})",
                "max acc %": f"The paper's maximum test accuracy on {ds} (Table 3; Table 2 at the large learning rate)"
                }.get(what, column)
    return REPRO_HELP.get(column)


def repro_format(column: str) -> str:
    """printf format of a numeric column of :func:`reproduction_table`."""
    if column == "Welch p":
        return "%.3g"
    if "acc" in column:
        return "%.2f"
    if "%" in column:
        return "%.1f"
    return "%d"


def settings_shown(groups: Sequence[dict], seed_summary: dict, shown: Sequence[str]) -> list[tuple]:
    """The settings of :func:`seed_groups` that have a chosen group of two seeds or more, as
    ``(index, setting, summary entry, chosen groups of that setting)``."""
    out = []
    for si, (setting, info) in enumerate(seed_summary.items()):
        members = [g for g in groups if g["setting"] == setting and g["label"] in shown]
        if any(len(g["seeds"]) > 1 for g in members):
            out.append((si, setting, info, members))
    return out


# ============================================================================ column formats of the tables
def compare_columns() -> dict:
    """Formats and help of :func:`compare_table`'s numeric columns."""
    formats = {"test acc": "percent", "oracle acc": "percent", "best acc": "percent", "step cost vs BN (bench)": "%.2f×",
               "params": "%d", "steps to BN best": "%d", "steps": "%d"}
    return {c: st.column_config.NumberColumn(format=f, help=COMPARE_HELP.get(c)) for c, f in formats.items()}


def seeds_columns() -> dict:
    """Formats and help of :func:`seeds_table`'s columns."""
    formats = {"best acc mean": "percent", "best acc sd": "percent", "steps to BN best": "%d",
               "reduction vs BN %": "%.1f", "Welch p": "%.3g"}
    cols = {c: st.column_config.NumberColumn(format=f, help=SEEDS_HELP[c]) for c, f in formats.items()}
    cols.update({c: st.column_config.Column(help=h) for c, h in SEEDS_HELP.items() if c not in cols})
    return cols


def live_columns(table) -> dict:
    """Formats and help of :func:`live_table`'s numeric columns."""
    return {c: st.column_config.NumberColumn(format="%.3f", help=LIVE_HELP.get(c)) for c in table.columns
            if c not in ("run", "layer")}


def reproduction_columns(table) -> dict:
    """Headers, formats and help of :func:`reproduction_table`'s columns."""
    cols = {c: st.column_config.NumberColumn(repro_label(c), format=repro_format(c), help=repro_help(c))
            for c in table.columns if table[c].dtype.kind in "fi" and c != "seeds"}
    cols.update({c: st.column_config.Column(repro_label(c), help=repro_help(c))
                 for c in table.columns if c not in cols and repro_help(c)})
    return cols


def protocol_caption(rep: dict) -> str:
    """The machine and the protocol of reproduce_mn.json in one caption."""
    m, p = rep.get("machine") or {}, rep.get("protocol") or {}
    machine = ", ".join(str(x) for x in (m.get("cpu"), m.get("gpu"), m.get("device") and f"device {m['device']}",
                                         m.get("torch_threads") and f"{m['torch_threads']} torch threads",
                                         m.get("torch") and f"torch {m['torch']}") if x) or "not recorded"
    parts = [f"**Machine**: {machine}."]
    proto = []
    if p.get("common_args"):
        proto.append("`" + " ".join(str(a) for a in p["common_args"]) + "`")
    settings = p.get("settings")
    if isinstance(settings, dict) and settings:
        proto.append("settings " + "; ".join(f"{k} `{' '.join(str(a) for a in v) if isinstance(v, list) else v}`"
                                             for k, v in settings.items()))
    if p.get("seeds"):
        proto.append(f"seeds {', '.join(str(s) for s in p['seeds'])}")
    if proto:
        parts.append("**Protocol**: " + "; ".join(proto) + ".")
    if p.get("why_this_scale"):
        parts.append(str(p["why_this_scale"]).rstrip(".") + ".")
    claim = (rep.get("paper") or {}).get("claim")
    if claim:
        parts.append(f"**The paper's claim**: {claim}.")
    if rep.get("failed"):
        parts.append(f"**Failed runs** (left out): {', '.join(rep['failed'])}.")
    return " ".join(parts)

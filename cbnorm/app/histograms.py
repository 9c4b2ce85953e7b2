"""Page 1, activation histograms: a layer's input and, per channel, x_hat (normalized, before the affine:
what a normalizer aims at N(0, 1)) or its output after the affine; the mixture over the input (the layer's
own, or a fit with cbnorm.gmm), a fit of the view, and statistics computed like with like."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import streamlit as st

from cbnorm import analysis

from . import shared as S
from . import source as SRC


def pick_channels(num_channels: int, count: int, seed: int) -> list[int]:
    """A random subset of ``count`` channels (sorted), drawn with ``seed``."""
    count = int(min(max(1, count), num_channels))
    rng = np.random.default_rng(int(seed) + 7919)
    return sorted(int(c) for c in rng.choice(num_channels, size=count, replace=False))


def _channel_values(rec: dict, view: str, channels: Sequence[int], seed: int) -> tuple[np.ndarray, bool]:
    v = SRC.values(rec, view, channels)
    if v.shape[1] > S.MAX_VALUES:
        keep = np.sort(np.random.default_rng(seed).choice(v.shape[1], S.MAX_VALUES, replace=False))
        return v[:, keep], True
    return v, False


#: the two views of what leaves a layer (labels shared by every page: ``shared.VIEW_LABELS``)
OUT_VIEWS = ("x_hat", "output")


def histogram_panel(run_path: str, dev: str, layer: str, size: int, seed: int, context_mode: str,
                    channels: tuple[int, ...], k: int, view: str = "x_hat", step: int = SRC.FINAL) -> dict:
    """The histogram page's panel (cached within ``BUDGET_MB["histogram_panel"]``; see :func:`_histogram_panel`)."""
    args = (run_path, dev, layer, int(size), int(seed), context_mode, tuple(int(c) for c in channels), int(k), view,
            int(step))
    out = _histogram_panel(*args)
    S.BUDGETS["histogram_panel"].note(_histogram_panel, args, out)
    return out


@st.cache_data(max_entries=64, ttl=S.TTL, show_spinner=False)
def _histogram_panel(run_path: str, dev: str, layer: str, size: int, seed: int, context_mode: str,
                     channels: tuple[int, ...], k: int, view: str = "x_hat", step: int = SRC.FINAL) -> dict:
    """Everything the histogram page draws for the chosen channels: input values and the ``view`` of what
    leaves the layer (``"x_hat"``: normalized, before the affine; ``"output"``: after it), each (G, M); the
    input mixture (the layer's own parameters when it has a mixture, else a K-component fit with
    cbnorm.gmm), a K-component fit of the view, and the statistics of each (``analysis.view_stats``: the
    input's on its standardized values, x_hat's against N(0, 1), the output's shape only). ``step``: a
    recorded step, a snapshot, or FINAL (``source.activations``)."""
    if view not in OUT_VIEWS:
        raise ValueError(f"view must be one of {OUT_VIEWS}, got {view!r}")
    run = S.get_run(run_path, dev)
    acts = SRC.activations(run_path, dev, step, layer, size, seed, context_mode)
    info = acts["layer"]
    vin, sub_in = _channel_values(acts, "input", channels, seed)
    vout, sub_out = _channel_values(acts, view, channels, seed)
    own = SRC.mixture(acts, channels)
    if own is not None:
        w, m, v = own
        source = f"the layer's own {info['class']} parameters"
        names = S.component_names(run, info, w.shape[1])
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
    return {"channels": list(channels), "input": vin, "output": vout, "view": view, "mix_in": (w, m, v),
            "names_in": names, "source_in": source, "mix_out": (wo, mo, vo),
            "names_out": [f"component {i + 1}" for i in range(kk)],
            "stats_in": analysis.view_stats(vin, "input"), "stats_out": analysis.view_stats(vout, view),
            "subsampled": sub_in or sub_out, "points_per_channel": int(vin.shape[1]), "layer": info,
            "recorded": acts["recorded"], "step": acts["step"], "note": acts["note"], "nonfinite": acts["nonfinite"]}


def stats_table(panel: dict):
    """Per-channel statistics of the input and of the shown view as a DataFrame: distances to N(0, 1) for
    the standardized input and x_hat only (``STATS_HELP`` says what each column is)."""
    import pandas as pd

    si, so = panel["stats_in"], panel["stats_out"]
    o = "x̂" if panel["view"] == "x_hat" else "out"
    cols = {"channel": panel["channels"], "skew in": si["skewness"], f"skew {o}": so["skewness"],
            "ex. kurt in": si["excess_kurtosis"], f"ex. kurt {o}": so["excess_kurtosis"]}
    if panel["view"] == "x_hat":
        cols.update({"KS in (std.)": si["ks_to_normal"], "KS x̂": so["ks_to_normal"], "W1 x̂": so["w1_to_normal"]})
    cols.update({f"mean {o}": so["mean"], f"std {o}": so["std"]})
    return pd.DataFrame(cols)


STATS_HELP = {
    "skew in": "skewness of the layer's input (0 for a symmetric distribution)",
    "skew x̂": "skewness of x̂, the normalized values before the affine",
    "skew out": "skewness of the layer's output (after the affine γ·x̂ + β)",
    "ex. kurt in": "excess kurtosis of the input (0 for a Gaussian; > 0 heavy tails)",
    "ex. kurt x̂": "excess kurtosis of x̂", "ex. kurt out": "excess kurtosis of the output",
    "KS in (std.)": "Kolmogorov-Smirnov distance between N(0, 1) and the input standardized per channel (its "
                    "own mean and std): the shape alone, like with like beside x̂",
    "KS x̂": "Kolmogorov-Smirnov distance between x̂ and N(0, 1), the normalizer's target",
    "W1 x̂": "1-Wasserstein distance between x̂ and N(0, 1)",
    "mean x̂": "mean of x̂", "std x̂": "standard deviation of x̂",
    "mean out": "mean of the output (set by β)", "std out": "standard deviation of the output (set by γ)"}


def stats_summary(panel: dict) -> list[dict]:
    """Median over the shown channels of |skewness|, |excess kurtosis| and, for x_hat, the KS distance to
    N(0, 1), with the change from the input computed like with like (the standardized input's KS):
    [{label, value, delta, help}] for st.metric. The output after the affine gets no N(0, 1) distance."""
    si, so = panel["stats_in"], panel["stats_out"]
    med = lambda a: float(np.median(np.abs(a)))  # noqa: E731
    what = "x̂" if panel["view"] == "x_hat" else "output"
    keys = [("skewness", "median |skewness|", "0 for a symmetric distribution"),
            ("excess_kurtosis", "median |excess kurtosis|", "0 for a Gaussian")]
    if panel["view"] == "x_hat":
        keys.append(("ks_to_normal", "median KS distance to N(0,1)",
                     "0 when the values follow N(0, 1); the input's is measured on its standardized values"))
    out = []
    for key, label, note in keys:
        a, b = med(si[key]), med(so[key])
        out.append({"label": f"{label} ({what})", "value": f"{b:.3f}", "delta": f"{b - a:+.3f} vs input",
                    "help": f"Median over the shown channels; {note}. Input: {a:.3f}."})
    return out


def subtitle_stats(panel: dict) -> list[str]:
    so = panel["stats_out"]
    if panel["view"] == "x_hat":
        return [f"channel {c}<br><span style='font-size:10px'>skew {s:+.2f} · ex. kurt {k:+.2f} · KS {d:.2f}</span>"
                for c, s, k, d in zip(panel["channels"], so["skewness"], so["excess_kurtosis"], so["ks_to_normal"])]
    return [f"channel {c}<br><span style='font-size:10px'>skew {s:+.2f} · ex. kurt {k:+.2f} · std {d:.2f}</span>"
            for c, s, k, d in zip(panel["channels"], so["skewness"], so["excess_kurtosis"], so["std"])]

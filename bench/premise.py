"""The premise of the mixture-normalization paper, measured on the committed runs: verdicts P1-P3.

* P1 (MN Fig. 1): are the inputs of BatchNorm layers multi-modal, in which layers, and how does it change over
  training? Every BN layer of the all-BN runs, at every step there is: the share of channels whose input
  values are fitted best (lowest BIC) by 2-4 Gaussians rather than one (``cbnorm.scan``), and the median BIC
  gain. Shallow CNN (4 BN layers; seeds 0-2, re-run here from the snapshots on 256 test images, 2,048 values
  per channel) and ResNet-20 (19 BN layers; seeds 0-1, the scan recorded with the summaries on 1,024 values
  per channel of 64 test images).
* P2 (MN Fig. 1): are MN's x_hat closer to N(0, 1) than BN's on the same images? The studied layers' x_hat
  (conv3 of the shallow CNN; the six layer3.* norms of ResNet-20) at the end of training, on the same 256
  test images: per channel |skewness|, |excess kurtosis|, the KS statistic and W1 to N(0, 1) (on x_hat as it
  is, and on x_hat standardized per channel: MN's x_hat has variance near K by design, README), medians over
  channels, then mean and sd over seeds.
* P3 (MN Fig. 8): do MN's components separate, and does one lambda_k come to dominate, as training goes on?
  The MN layers' own newest minibatch fit (the queue slot written last, read from each snapshot): per channel
  the smallest separation between two components, min |mu_i - mu_j| / sqrt((var_i + var_j) / 2) (Ashman's D;
  above 2 the modes are apart; the largest pairwise D is reported beside it), and the largest weight
  max_k lambda_k; medians over channels and layers, at
  the first fitted step and the last, and Spearman's rho against the step over every snapshot.

Verdict rules (fixed before looking): P1 supported when, at the last step, at least half of the BN layers
have K > 1 winning in at least half of their channels in every seed; not supported when no layer reaches
20 %; else mixed. P2 supported when MN's median is below BN's on all four statistics (x_hat as it is) in
the mean over seeds and on every seed pair; not supported when on none; else mixed. P3 supported when both
separation and the largest weight grow from the first to the last step in every seed; not supported when
neither does in any; else mixed.

Usage: python bench/premise.py [--runs checkpoints] [--extra DIR ...] [--out bench/results/premise.json]
(``--extra``: further run directories, e.g. the ResNet-20 seeds beyond the first, which are not committed.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cbnorm import probe as P  # noqa: E402
from cbnorm import scan as SC  # noqa: E402
from cbnorm.analysis import normality_stats, standardize_rows  # noqa: E402
from cbnorm.data import load_dataset  # noqa: E402
from cbnorm.runs import load_run  # noqa: E402

FAMILIES = {
    "shallow CNN (conv3 studied)": {"bn": ["fmnist-bn", "fmnist-bn-s1", "fmnist-bn-s2"],
                                    "mn": ["fmnist-mn", "fmnist-mn-s1", "fmnist-mn-s2"], "source": "snapshots"},
    "ResNet-20 (layer3.* studied)": {"bn": ["resnet20-fmnist-bn", "resnet20-fmnist-bn-s1"],
                                     "mn": ["resnet20-fmnist-mn", "resnet20-fmnist-mn-s1"], "source": "summaries"},
}
PAPER = {
    "P1": "MN paper Sec. 1 / Fig. 1: after rectifying non-linearities, a layer's input 'very often' has several "
          "modes and is better approximated by a mixture than by one Gaussian",
    "P2": "MN paper Fig. 1: mixture-normalized activations are 'considerably closer to the normal distribution' "
          "and 'less skewed'",
    "P3": "MN paper Fig. 8: as training goes on, the components separate and one lambda_k comes to dominate",
}


def mean_sd(xs) -> dict:
    a = np.asarray([x for x in xs if x is not None], dtype=float)
    return {"mean": float(a.mean()) if a.size else None, "sd": float(a.std(ddof=1)) if a.size > 1 else None,
            "n": int(a.size)}


def probe_images(run, n: int = 256, seed: int = 0) -> torch.Tensor:
    ds = load_dataset(run.config["dataset"]["name"], "test")
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=n, replace=False))
    return run.preprocess(np.asarray(ds.images[idx]))


def layer_views(model, x: torch.Tensor, layers=None) -> dict:
    """{layer: {"input": (C, N*P), "x_hat": (C, N*P)}} of the model on x (eval mode)."""
    model.eval()
    names = layers or P.layer_names(model, torch_layers=True)
    caps = P.capture(model, x, names)
    out = {}
    for n, c in caps.items():
        views = {"input": c.input, "x_hat": c.x_hat if c.x_hat is not None else c.output}
        out[n] = {v: t.movedim(1, 0).reshape(t.shape[1], -1).double().numpy() for v, t in views.items()}
    return out


def subsample(v: np.ndarray, m: int, seed: int = 0) -> np.ndarray:
    if v.shape[1] <= m:
        return v
    idx = np.sort(np.random.default_rng(seed).choice(v.shape[1], m, replace=False))
    return v[:, idx]


# ---------------------------------------------------------------------------------------------------- P1
def p1_run(run, source: str) -> dict:
    """{step: {layer: cell}} of the input view for every step the run has."""
    out: dict = {}
    if source == "summaries" and run.summaries:
        for row in SC.scan_run(run, "input"):
            out.setdefault(row["step"], {})[row["layer"]] = row
        return out
    x = probe_images(run)
    for step, _ in run.snapshots:
        views = layer_views(run.load_snapshot(step), x)
        for layer, v in views.items():
            cell = SC.cell(SC.scan_values(subsample(v["input"], 2048)))
            out.setdefault(step, {})[layer] = {"layer": layer, **cell}
    return out


def p1(families: dict, runs: dict) -> dict:
    res = {}
    for fam, spec in families.items():
        per_seed = {}
        for name in spec["bn"]:
            if name in runs:
                t0 = time.perf_counter()
                per_seed[name] = p1_run(runs[name], spec["source"])
                print(f"P1 {name}: {len(per_seed[name])} steps in {time.perf_counter() - t0:.0f} s", flush=True)
        if not per_seed:
            continue
        layers = list(next(iter(per_seed.values()))[max(next(iter(per_seed.values())))].keys())
        first = {n: min(s) for n, s in per_seed.items()}
        last = {n: max(s) for n, s in per_seed.items()}
        table = []
        for depth, layer in enumerate(layers):
            row = {"layer": layer, "depth": depth}
            for when, steps in (("first", first), ("last", last)):
                cells = [per_seed[n][steps[n]].get(layer) for n in per_seed]
                row[f"share_multimodal_{when}"] = mean_sd(c and c["share_multimodal"] for c in cells)
                row[f"median_bic_gain_{when}"] = mean_sd(c and c["median_bic_gain"] for c in cells)
            table.append(row)
        seed0 = per_seed[spec["bn"][0]] if spec["bn"][0] in per_seed else next(iter(per_seed.values()))
        curve = [{"step": s, "mean_share_multimodal": float(np.mean([c["share_multimodal"] for c in cells.values()
                                                                     if c["share_multimodal"] is not None]))}
                 for s, cells in sorted(seed0.items())]
        # rule: at the last step, >= half the layers with share >= 0.5, in every seed
        per_seed_ok = [np.mean([(c["share_multimodal"] or 0) >= 0.5 for c in s[max(s)].values()]) >= 0.5
                       for s in per_seed.values()]
        none_20 = all((c["share_multimodal"] or 0) < 0.2 for s in per_seed.values() for c in s[max(s)].values())
        res[fam] = {"seeds": list(per_seed), "layers": table, "seed0_curve": curve,
                    "layers_with_majority_multimodal_last": [
                        int(sum((c["share_multimodal"] or 0) >= 0.5 for c in s[max(s)].values()))
                        for s in per_seed.values()],
                    "n_layers": len(layers),
                    "verdict": "supported" if all(per_seed_ok) else "not supported" if none_20 else "mixed"}
    return res


# ---------------------------------------------------------------------------------------------------- P2
def studied(run) -> list[str]:
    """The layers compared in P2: conv3's norm of the shallow CNN, the layer3.* norms of a ResNet (studied in
    the MN runs, BatchNorm in the all-BN runs: the same positions)."""
    names = P.layer_names(run.model, torch_layers=True)
    if run.config["model"]["name"] == "shallow_cnn":
        return [n for n in names if "conv3" in n]
    return [n for n in names if n.startswith("layer3.")]


def p2_run(run, x) -> dict:
    views = layer_views(run.model, x, studied(run))
    xh = np.concatenate([subsample(v["x_hat"], 4096) for v in views.values()])
    raw = normality_stats(xh)
    std = normality_stats(standardize_rows(xh))
    return {"abs_skewness": float(np.median(np.abs(raw["skewness"]))),
            "abs_excess_kurtosis": float(np.median(np.abs(raw["excess_kurtosis"]))),
            "ks": float(np.median(raw["ks_to_normal"])), "w1": float(np.median(raw["w1_to_normal"])),
            "ks_standardized": float(np.median(std["ks_to_normal"])),
            "w1_standardized": float(np.median(std["w1_to_normal"])),
            "std": float(np.median(raw["std"])), "channels": int(xh.shape[0]), "layers": list(views)}


def p2(families: dict, runs: dict) -> dict:
    keys = ("abs_skewness", "abs_excess_kurtosis", "ks", "w1")
    res = {}
    for fam, spec in families.items():
        pairs = [(b, m) for b, m in zip(spec["bn"], spec["mn"]) if b in runs and m in runs]
        if not pairs:
            continue
        x = probe_images(runs[pairs[0][0]])
        per = {n: p2_run(runs[n], x) for pair in pairs for n in pair}
        table = {norm: {k: mean_sd(per[p[i]][k] for p in pairs) for k in per[pairs[0][0]] if k not in
                        ("layers", "channels")} for i, norm in enumerate(("bn", "mn"))}
        lower = {k: table["mn"][k]["mean"] < table["bn"][k]["mean"] and all(per[m][k] < per[b][k] for b, m in pairs)
                 for k in keys}
        res[fam] = {"pairs": pairs, "per_run": per, "table": table, "mn_lower": lower,
                    "verdict": "supported" if all(lower.values()) else "not supported" if not any(lower.values())
                    else "mixed"}
    return res


# ---------------------------------------------------------------------------------------------------- P3
def newest_fit(path: Path, layer: str):
    """(weights (K,) or (K, C), means (K, C), vars (K, C)) of the MN layer's newest queue slot in a snapshot
    file, or None before its first training step."""
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        if f"{layer}.queue_fit_means" not in keys:
            return None
        count = int(f.get_tensor(f"{layer}.queue_count"))
        if count == 0:
            return None
        ptr = int(f.get_tensor(f"{layer}.queue_ptr"))
        t = f.get_tensor(f"{layer}.queue_fit_means").shape[0]
        i = (ptr - 1) % t
        return tuple(f.get_tensor(f"{layer}.queue_fit_{n}")[i].double().numpy() for n in ("weights", "means", "vars"))


def separation(w, m, v) -> tuple[float, float, float, float]:
    """Medians over channels of the smallest and the largest pairwise Ashman's D, the largest weight, and the
    joint separation of the closest pair over all the layer's channels (MN fits its components jointly:
    sqrt(sum_c D_c^2), the diagonal Mahalanobis distance of their means)."""
    k = m.shape[0]
    d = np.full(m.shape[1], np.inf)
    far = np.zeros(m.shape[1])
    joint = np.inf
    for i in range(k):
        for j in range(i + 1, k):
            dij = np.abs(m[i] - m[j]) / np.sqrt((v[i] + v[j]) / 2)
            d, far = np.minimum(d, dij), np.maximum(far, dij)
            joint = min(joint, float(np.sqrt((dij ** 2).sum())))
    wmax = w.max(0) if w.ndim == 2 else np.full(m.shape[1], w.max())
    return float(np.median(d)), float(np.median(far)), float(np.median(wmax)), joint


def p3(families: dict, runs: dict) -> dict:
    res = {}
    for fam, spec in families.items():
        per_seed = {}
        for name in spec["mn"]:
            run = runs.get(name)
            if run is None:
                continue
            layers = [n for n, mod in run.model.named_modules() if type(mod).__name__ == "MixtureNorm"]
            series = []
            for step, path in run.snapshots:
                fits = [newest_fit(path, ly) for ly in layers]
                if any(f is None for f in fits):
                    continue
                seps = [separation(*f) for f in fits]
                series.append({"step": step, "separation": float(np.median([s[0] for s in seps])),
                               "largest_separation": float(np.median([s[1] for s in seps])),
                               "max_weight": float(np.median([s[2] for s in seps])),
                               "joint_separation": float(np.median([s[3] for s in seps]))})
            if len(series) >= 2:
                per_seed[name] = series
        if not per_seed:
            continue
        summary = {}
        for name, s in per_seed.items():
            steps = [r["step"] for r in s]
            summary[name] = {
                "first": s[0], "last": s[-1], "snapshots": len(s),
                "rho_separation": float(sps.spearmanr(steps, [r["separation"] for r in s]).statistic)
                if len(s) > 2 else None,
                "rho_max_weight": float(sps.spearmanr(steps, [r["max_weight"] for r in s]).statistic)
                if len(s) > 2 else None}
        grows = [(v["last"]["separation"] > v["first"]["separation"], v["last"]["max_weight"] > v["first"]["max_weight"])
                 for v in summary.values()]
        verdict = "supported" if all(a and b for a, b in grows) else "not supported" if not any(
            a or b for a, b in grows) else "mixed"
        res[fam] = {"per_seed": summary, "series": per_seed, "verdict": verdict,
                    "separation_first": mean_sd(v["first"]["separation"] for v in summary.values()),
                    "separation_last": mean_sd(v["last"]["separation"] for v in summary.values()),
                    "largest_separation_first": mean_sd(v["first"]["largest_separation"] for v in summary.values()),
                    "largest_separation_last": mean_sd(v["last"]["largest_separation"] for v in summary.values()),
                    "max_weight_first": mean_sd(v["first"]["max_weight"] for v in summary.values()),
                    "joint_separation_first": mean_sd(v["first"]["joint_separation"] for v in summary.values()),
                    "joint_separation_last": mean_sd(v["last"]["joint_separation"] for v in summary.values()),
                    "max_weight_last": mean_sd(v["last"]["max_weight"] for v in summary.values())}
    return res


# ---------------------------------------------------------------------------------------------------- text
def fmt(ms: dict, pct: bool = False) -> str:
    if ms["mean"] is None:
        return "—"
    f = (lambda x: f"{100 * x:.0f}%") if pct else (lambda x: f"{x:.3g}")
    return f(ms["mean"]) + (f" ± {f(ms['sd'])}" if ms["sd"] is not None else "")


def overall(verdicts: list[str]) -> str:
    return verdicts[0] if verdicts and all(v == verdicts[0] for v in verdicts) else "mixed"


def texts(r1: dict, r2: dict, r3: dict) -> dict:
    out = {}
    s = []
    for fam, r in r1.items():
        top = sorted(r["layers"], key=lambda x: -(x["share_multimodal_last"]["mean"] or 0))[:3]
        s.append(f"{fam} ({len(r['seeds'])} seeds, {r['n_layers']} BN layers): {r['verdict']} — at the last step "
                 f"layers with K > 1 in at least half their channels per seed: {r['layers_with_majority_multimodal_last']}"
                 f"; most multi-modal: " + ", ".join(f"{t['layer']} {fmt(t['share_multimodal_last'], True)} of "
                                                     f"channels (first step {fmt(t['share_multimodal_first'], True)})"
                                                     for t in top)
                 + "; mean share over layers, seed 0, first → last step: "
                 f"{r['seed0_curve'][0]['mean_share_multimodal']:.0%} → {r['seed0_curve'][-1]['mean_share_multimodal']:.0%}.")
    out["P1"] = {"claim": PAPER["P1"], "verdict": overall([r["verdict"] for r in r1.values()]), "text": " ".join(s)}
    s = []
    for fam, r in r2.items():
        t = r["table"]
        s.append(f"{fam} ({len(r['pairs'])} seed pairs): {r['verdict']} — median over channels, BN vs MN: "
                 + ", ".join(f"{k.replace('abs_', '|').replace('_', ' ')} {fmt(t['bn'][k])} vs {fmt(t['mn'][k])}"
                             for k in ("abs_skewness", "abs_excess_kurtosis", "ks", "w1"))
                 + f"; standardized per channel, KS {fmt(t['bn']['ks_standardized'])} vs "
                   f"{fmt(t['mn']['ks_standardized'])}, W1 {fmt(t['bn']['w1_standardized'])} vs "
                   f"{fmt(t['mn']['w1_standardized'])}; x_hat std {fmt(t['bn']['std'])} vs {fmt(t['mn']['std'])}.")
    out["P2"] = {"claim": PAPER["P2"], "verdict": overall([r["verdict"] for r in r2.values()]), "text": " ".join(s)}
    s = []
    for fam, r in r3.items():
        s.append(f"{fam} ({len(r['per_seed'])} seeds): {r['verdict']} — separation (median smallest Ashman's D) "
                 f"{fmt(r['separation_first'])} → {fmt(r['separation_last'])} (the farthest pair: "
                 f"{fmt(r['largest_separation_first'])} → {fmt(r['largest_separation_last'])}; jointly over the "
                 f"layer's channels, the closest pair: {fmt(r['joint_separation_first'])} → "
                 f"{fmt(r['joint_separation_last'])}), largest weight "
                 f"{fmt(r['max_weight_first'])} → {fmt(r['max_weight_last'])} (first fitted → last step); Spearman "
                 "rho with the step, per seed: " + ", ".join(
                     f"{n}: D {v['rho_separation']:+.2f}, λmax {v['rho_max_weight']:+.2f}"
                     for n, v in r["per_seed"].items() if v["rho_separation"] is not None) + "."
                 + (" Channel by channel the components overlap at every step (median D below 2 even for the "
                    "farthest pair, where two modes would be apart)." if max(
                        x["largest_separation"] for ser in r["series"].values() for x in ser) < 2 else "")
                 + (f" Seeds without a fitted snapshot before the last: "
                    f"{', '.join(n for n in FAMILIES[fam]['mn'] if n not in r['per_seed'])}."
                    if len(r["per_seed"]) < len(FAMILIES[fam]["mn"]) else ""))
    out["P3"] = {"claim": PAPER["P3"], "verdict": overall([r["verdict"] for r in r3.values()]), "text": " ".join(s)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default=str(Path(__file__).resolve().parents[1] / "checkpoints"))
    ap.add_argument("--extra", nargs="*", default=[], help="further run directories (seeds not committed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "premise.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    runs = {}
    for d in [p for p in Path(a.runs).iterdir() if p.is_dir()] + [Path(e) for e in a.extra]:
        if any(d.name in spec[k] for spec in FAMILIES.values() for k in ("bn", "mn")):
            runs[d.name] = load_run(d)
    print(f"runs: {sorted(runs)}", flush=True)
    r1, r2, r3 = p1(FAMILIES, runs), p2(FAMILIES, runs), p3(FAMILIES, runs)
    out = {"benchmark": "the premise of the mixture-normalization paper, measured (bench/premise.py)",
           "protocol": __doc__.split("\n\n")[1].replace("\n", " ") + " " + __doc__.split("\n\n")[2].replace("\n", " "),
           "runs": {n: str(r.path) for n, r in sorted(runs.items())},
           "verdicts": texts(r1, r2, r3), "P1": r1, "P2": r2, "P3": r3,
           "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count()},
           "seconds": round(time.perf_counter() - t0, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    for k, v in out["verdicts"].items():
        print(f"{k} [{v['verdict']}]: {v['text']}\n")
    print(f"wrote {a.out} in {out['seconds']} s")


if __name__ == "__main__":
    main()

"""The words the views show beside their figures, composed from what was computed (no widgets, no Streamlit):
what was drawn, on which values, and how to read it. Kept apart from the pages so that a page stays a list of
widgets and plots, and so that every label can be tested against the numbers it names."""
from __future__ import annotations

from typing import Optional, Sequence

from .shared import MAX_VALUES, VIEW_LABELS


def channels_text(chans: Sequence[int]) -> str:
    """``"all channels"`` for an empty selection, else ``"channel 3"`` / ``"channels 0, 5"``."""
    return "all channels" if not chans else f"channel{'s' if len(chans) > 1 else ''} {', '.join(map(str, chans))}"


def _range_text(b: dict) -> str:
    return f"{len(b['edges']) - 1} bins on [{b['lo']:.3g}, {b['hi']:.3g}]"


# ---------------------------------------------------------------- page 6: distributions over training
def distributions_source(run_name: str, norm: str, layer: str, layer_class: str, n_steps: int, recorded: bool,
                         seed: int) -> str:
    where = (f"the recorded probe batch at each of its {n_steps} recorded steps" if recorded else
             f"the same test images (seed {seed}) at each of its {n_steps} snapshots")
    return f"Run **{run_name}** ({norm}) and layer `{layer}` ({layer_class}) from the sidebar; {where}."


def distributions_caption(layer: str, which: str, chans: Sequence[int], first_panel: dict, bins: dict) -> str:
    outside = sum(bins["below"]) + sum(bins["above"])
    return (f"{VIEW_LABELS[which]} of `{layer}`, {channels_text(chans)} · {first_panel['n_values']:,} values per step"
            + (f" (subsampled to {MAX_VALUES:,})" if first_panel["subsampled"] else "")
            + f" · components: {first_panel['source']} · {_range_text(bins)}"
            + (f" · {outside:,} values outside the range over all steps" if outside else ""))


RIDGE_NOTE = ("One histogram per snapshot, the first at the top (TensorBoard's offset mode); the step's components "
              "dashed, their sum solid. log y does not apply here.")
MULTIPLES_NOTE = ("As Fig. 8 of the MN paper, at every snapshot: the histogram, each component's weighted density "
                  "dashed and the mixture solid; every panel on the same bins.")
PERCENTILES_NOTE = ("TensorBoard's distributions: bands from min to max and at 7/93, 16/84, 31/69 % (±1.5, ±1, ±0.5 sd "
                    "of a normal), the median as a line.")


# ---------------------------------------------------------------- page 6: the same histogram across runs
def across_caption(layer: str, which: str, chans: Sequence[int], step_text: str, size: int, seed: int,
                   bins: dict) -> str:
    return (f"{VIEW_LABELS[which]} of `{layer}`, {channels_text(chans)}, {step_text} · {size} test images (seed "
            f"{seed}) · {_range_text(bins)}")


def across_stats_note(which: str, reference: str) -> str:
    return ("Skewness and excess kurtosis are 0 for a Gaussian. "
            + {"x_hat": "KS (Kolmogorov-Smirnov) and W1 (1-Wasserstein) are distances of x̂ to N(0, 1). ",
               "input": "KS and W1 are distances to N(0, 1) of the input standardized per channel (the shape "
                        "alone). ",
               "output": "The output after the affine gets no distance to N(0, 1): γ and β move it on purpose. "
               }[which]
            + f"Δ: the run's value minus {reference}'s. Outside range: values beyond the plotted range (still in "
            "the statistics).")


# ---------------------------------------------------------------- page 6: embedding grid, cluster quality
def grid_caption(grid: dict, params, pool: bool) -> str:
    method_text = {"pca": "PCA fitted on each row's last snapshot", "tsne": f"t-SNE, perplexity {params.perplexity:g}",
                   "umap": f"UMAP, {params.n_neighbors} neighbours"}[grid["method"]]
    return (f"{len(grid['indices']):,} of {grid['total']:,} test images (seed {params.seed}), the same in every cell · "
            f"`{params.layer}` {params.which}{' (channel means)' if pool else ''} · {method_text} · axes shared along "
            "each row"
            + (" (early snapshots that vary little along the last one's principal axes sit small in their cell)"
               if grid["method"] == "pca" else ""))


def quality_caption(q: dict, layer: str, which: str, pool: bool, k: int) -> str:
    return (f"`{layer}` {which}{' (channel means)' if pool else ''} of {q['runs'][0]['n']:,} test images at every "
            f"snapshot, in the layer's own feature space (not the 2-D picture) · k-NN: half the images held out "
            f"(seeded), k = {k}" + ("" if any(r["has_components"] for r in q["runs"]) else
                                    " · no chosen layer has mixture components (no NMI / ARI)"))


QUALITY_NOTE = ("Components used: how many distinct mixture components the images fall in (argmax of the layer's "
                "posteriors averaged over each image's positions); with one, NMI and ARI are 0. "
                "Groups of several seeds: the band is ±1 sd over the seeds on the steps they all have (the mean line "
                "carries the same as error bars); where they share fewer than 3 steps (extra seeds keep their first "
                "and last snapshot only), the mean ± sd is drawn as diamonds with error bars at those steps. A "
                "normalizer forms clusters faster than another when its curve rises earlier by more than the bands' "
                "width.")


# ---------------------------------------------------------------- page 4: compare normalizers
def steps_to_bn_note(reference: str, target: float) -> str:
    return (f"**Steps to reach BN best**: the first evaluated step at which a run's test accuracy reaches "
            f"{reference}'s best ({target:.2%}) — the MN paper's measure of faster training; None = never reached. "
            "This table uses the full test set at epoch ends, so its steps are multiples of an epoch; the figure above "
            "draws the dense evaluations (`--eval-every`, a fixed test subset) where a run has them, and the Seeds "
            "section below compares on those. Test accuracy is honest (context inferred from the image); the oracle "
            "column feeds the true superclass and leaks the label.")


NO_SEEDS_NOTE = ("Every recipe here has one run (one seed), so there is no spread over seeds to show: the per-run "
                 "curves above are the whole story. Runs that differ only in `--seed` are grouped here, with their "
                 "mean ± sd.")
SEEDS_NOTE = ("Runs that differ only in their seed form a group (same task, data, model, norm and its options, studied "
              "layers and training options). Test error on the dense evaluation steps (`--eval-every`; else the epoch "
              "ends), mean over seeds with a ±1 sd band, as the MN paper's Fig. 2; groups of one seed are plain lines. "
              "The table's numbers are `cbnorm.curves.summarize_groups` of each setting, BatchNorm's group as the "
              "reference.")


def bn_best_note(reference: Optional[str], acc: float, step) -> str:
    return (f"BN's best: {acc:.2%}, the maximum of {reference}'s mean curve, reached at step {step:,}. Curves are "
            "compared on the steps all seeds of a group have.")


NO_BN_GROUP_NOTE = ("This setting has no BatchNorm group, so 'steps to BN best' and the comparison to BN cannot be "
                    "computed.")


def duplicates_note(members: Sequence[dict]) -> str:
    """The seeds left out of a group because the group already has them ('' when none)."""
    dups = [(g["label"], d) for g in members for d in g["duplicates"]]
    return ("Left out, a seed already in the group: " + ", ".join(f"{d} ({lab})" for lab, d in dups)) if dups else ""


def live_notes(outs: Sequence[dict]) -> list[str]:
    """What the live panel's histograms are not: runs shown on their own recorded batch, subsampled values."""
    notes = []
    own = [o["name"] for o in outs if o["note"].startswith("the recorded")]
    if own:
        notes.append("Recorded from a model the app cannot rebuild, so shown on its own recorded probe batch (last "
                     "step), not on the minibatch the others share: " + ", ".join(own))
    if any(o["subsampled"] for o in outs):
        notes.append(f"Pooled values were subsampled to {MAX_VALUES:,} per run for the histograms.")
    return notes


REPRODUCTION_INTRO = ("`bench/reproduce_mn.py` trains the MN paper's protocol (Sec. 4.1) with several seeds per norm: "
                      "test error, mean ± 1 sd over seeds (the paper's Fig. 2), and its Table 3 — steps to reach "
                      "BatchNorm's maximum test accuracy — in our numbers beside the paper's.")


def reproduction_best_note(acc: float, step) -> str:
    return (f"BN's best (maximum of its mean curve): {acc:.2%} at step {step}. The paper's numbers are CIFAR's "
            "(100 epochs, another scale), so compare the reductions and the ordering, not the step counts.")


SPEED_INTRO = ("**Cost of each layer** (`bench/speed.py`): forward + backward time as a multiple of "
               "`torch.nn.BatchNorm2d`'s on the same input; black ticks are the goals.")


def machine_note(machine: dict) -> str:
    return ("Machine: " + " · ".join(f"{k} = {v}" for k, v in machine.items())) if machine else \
        "Machine: not recorded in this file."


def speed_machine_note(m: dict) -> str:
    return (f"Measured on {m.get('cpu', 'an unrecorded machine')} ({m.get('device', '?')}, "
            f"{m.get('torch_threads', '?')} torch threads, torch {m.get('torch', '?')}); per-layer tables, the whole "
            "network and each speed lever are in speed.json below.")


def convergence_intro(b: dict) -> str:
    return ("**Convergence** (`bench/convergence.py`): test accuracy against optimizer steps, mean over seeds — "
            f"{b.get('dataset', '?')}, {b.get('train_images', '?')} training images, {b.get('epochs', '?')} epochs, "
            f"width {b.get('width', '?')}.")

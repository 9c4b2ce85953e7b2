"""The app's pages in one table: key, file, title, icon and the paragraph Home shows about each. app.py builds
the navigation from it and pages/0_Home.py its tour of the pages, so a page is named the same everywhere."""
from __future__ import annotations

from typing import NamedTuple


class Page(NamedTuple):
    key: str
    file: str  # relative to app.py
    title: str
    icon: str
    about: str  # markdown, on Home


PAGES = [
    Page("home", "pages/0_Home.py", "Home", ":material/home:", ""),
    Page("hist", "pages/1_Activation_Histograms.py", "Activation histograms", ":material/bar_chart:",
         "Pick a run and one of its normalization layers in the sidebar. The app draws a minibatch of test "
         "images (size and seed are yours; *Resample* draws another), runs the model and records what enters and "
         "leaves the layer. For each channel you see the histogram of the layer's **input** with a mixture over "
         "it: the layer's own components (MN, ACN, CN, CN-X, CN-embed, ModeNorm), each dashed in its colour, and "
         "their sum solid; layers without a mixture (BN, LN, GN) get a K-component fit. The **output** grid shows "
         "the normalized values against N(0, 1) with their skewness, excess kurtosis and distance to N(0, 1), so "
         "the papers' claim that the output is closer to normal can be checked by eye and by number."),
    Page("evo", "pages/2_Cluster_Evolution.py", "Cluster evolution", ":material/scatter_plot:",
         "The same fixed sample of test images at every training snapshot of a run, through the chosen layer, "
         "projected to 2-D by PCA (fitted on the last snapshot), t-SNE or UMAP (each snapshot started from the "
         "previous one's layout, so the frames stay aligned). Colour points by class, superclass, the model's "
         "prediction at that step or the layer's mixture component, move the snapshot slider or play the "
         "animation to watch classes separate as training goes on."),
    Page("daynight", "pages/3_Day_Night_Transfer.py", "Day ↔ night transfer", ":material/dark_mode:",
         "The \"American night\" experiment of the Context Normalization paper: a photo is normalized with the day "
         "context's parameters and de-normalized with the night context's (or back), with a learned input-level "
         "context norm, an autoencoder with context norms inside, or plain per-context statistics. Pick a bundled "
         "photo or upload one, set the strength, compare input and output side by side, inspect each context's "
         "parameters, fit contexts from your own day and night photos, and read the measured quality on held-out "
         "photos."),
    Page("compare", "pages/4_Compare_Normalizers.py", "Compare normalizers", ":material/compare_arrows:",
         "Runs side by side: test error and loss against epochs or steps; a table of final and best accuracy, "
         "the steps each run needs to reach BatchNorm's best accuracy (the MN paper's speed-up measure), time per "
         "step and parameter count; a live panel that runs every chosen run's studied layer on the same "
         "minibatch and compares their output distributions; and the benchmark results in `bench/results/`."),
    Page("gen", "pages/5_Image_Generation.py", "Image generation", ":material/auto_awesome:",
         "DCGANs with BatchNorm, MN or ACN in the generator (the papers' GAN experiments, on Fashion-MNIST): the same "
         "latent vectors drawn by each generator at every snapshot, side by side and animated, with their FD in "
         "classifier features, k-NN precision / recall and the classes their samples cover."),
    Page("across", "pages/6_Across_Runs_and_Training.py", "Across runs and training", ":material/stacked_line_chart:",
         "**Distributions over training**: one layer's values at every snapshot on the same test images, as offset "
         "histograms with each step's mixture components (the MN paper's Fig. 8 at every step), an overlay and "
         "percentile bands over a chosen window of steps. **The same histogram across runs**: several runs' histograms "
         "of a shared layer at one step, overlaid and in aligned panels on bins from the values shown, with each "
         "run's normality statistics and their differences to a reference run. **Embedding grid**: runs as rows and "
         "snapshots as columns, the same images in every cell (the CB-Norm paper's Fig. 3), by PCA, t-SNE or UMAP, "
         "coordinates downloadable. **Cluster quality over training**: silhouette, k-NN accuracy and the agreement "
         "of the layer's mixture components with classes and contexts at every snapshot, one line per run with a "
         "mean ± sd band over seeds."),
    Page("scan", "pages/7_Multimodality_Scan.py", "Where would a mixture help?", ":material/grid_on:",
         "The multimodality scan of every recorded normalization layer over training: a layers × steps heat map of "
         "the share of channels whose values a mixture of Gaussians fits better than one (by BIC) and of the median "
         "BIC gain, on the layer's input or x̂, for one run or two side by side (e.g. BN and MN in the same "
         "network); pick a cell for its histograms with the fits. Below it, the verdicts on the papers' premise "
         "measured on the committed runs."),
]
BY_KEY = {p.key: p for p in PAGES}

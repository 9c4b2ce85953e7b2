"""Depth as a tested property: every normalization layer of our ResNet-20 and of a researcher's ResNet-18
(kuangliu/pytorch-cifar's, copied in bench/depth_models.py) converted to each of mn, acn, mode, cn (with
contexts) and cnx, trained 200 steps at the BatchNorm recipe (SGD lr 0.01, momentum 0.9, weight decay 5e-4,
batch 32) on Fashion-MNIST: the loss stays finite and decreases. ACN runs here as update="moving_average";
with components learned as weights (update="weight", its default) it trains in every layer of ResNet-20 since
its data init, but diverges in every layer of the full-width ResNet-18 (README, "Depth"), as CN-X does, so
converting more than 6 layers to either warns.

Scaled for CI's two cores: 14 x 14 images (Fashion-MNIST average-pooled), ResNet-20 at width 0.25 and
ResNet-18 at width 4 (the architectures, all their norm layers; bench/depth.py runs full width).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cbnorm  # noqa: E402
from bench.depth_models import ResNet18  # noqa: E402
from cbnorm.data import FASHION_SUPERCLASSES, load_dataset  # noqa: E402
from cbnorm.models import resnet20  # noqa: E402

pytestmark = pytest.mark.timeout(240)

STEPS, BATCH = 200, 32
SUPER = torch.tensor([FASHION_SUPERCLASSES[i] for i in range(10)])
KW = {"mn": {"num_components": 3}, "acn": {"num_components": 3, "update": "moving_average"},
      "mode": {"num_components": 3}, "cn": {"num_contexts": 4}, "cnx": {"num_contexts": 4}}


@pytest.fixture(scope="module")
def data():
    ds = load_dataset("fashion-mnist", "train" if Path("/usr/share/datasets/fashion-mnist").is_dir() else "test")
    idx = np.random.default_rng(0).choice(len(ds), STEPS * BATCH // 2, replace=False)
    x = (torch.from_numpy(ds.images[idx]).float().div(255) - 0.2860) / 0.3530
    x = F.avg_pool2d(x[:, None], 2)  # (M, 1, 14, 14)
    return x, torch.from_numpy(ds.labels[idx].astype(np.int64))


def build(model: str, norm: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if model == "resnet20":
        return resnet20(in_channels=1, num_classes=10, width=0.25, norm=norm, norm_layers=("*",),
                        norm_kwargs=KW[norm])
    net = ResNet18(width=4)
    net.conv1 = torch.nn.Conv2d(1, 4, 3, 1, 1, bias=False)  # one input channel, as the data
    cbnorm.convert(net, norm, **KW[norm])
    return cbnorm.ContextModel(net) if norm in ("cn", "cnx") else net


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, uses_context: bool) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for step in range(STEPS):
        if step % (len(y) // BATCH) == 0:
            order = torch.randperm(len(y), generator=g)
        idx = order[(step % (len(y) // BATCH)) * BATCH:][:BATCH]
        yb = y[idx]
        loss = F.cross_entropy(model(x[idx], context=SUPER[yb]) if uses_context else model(x[idx]), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("model", ["resnet20", "resnet18"])
@pytest.mark.parametrize("norm", list(KW))
def test_every_layer_trains_at_depth(data, model, norm):
    net = build(model, norm)
    n_norms = sum(isinstance(m, cbnorm.NormBase) and type(m).__name__ != "BatchNorm" for m in net.modules())
    assert n_norms >= 19  # every norm layer is the layer type (ResNet-20: 19, ResNet-18: 20)
    losses = train(net, *data, uses_context=norm in ("cn", "cnx"))
    assert all(math.isfinite(v) for v in losses), f"{model}/{norm}: non-finite loss at step " \
        f"{next(i for i, v in enumerate(losses) if not math.isfinite(v)) + 1}"
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.8 * first, f"{model}/{norm}: mean loss {first:.3f} over the first 20 steps, {last:.3f} over the last 20"


def test_learned_statistics_in_every_layer_warn_and_a_few_layers_or_batch_statistics_do_not():
    with pytest.warns(UserWarning, match=r"20 AdaptiveContextNorm layers in one network: .* diverge"):
        cbnorm.convert(ResNet18(width=4), "acn", num_components=3)
    with pytest.warns(UserWarning, match=r"20 ContextNormX layers in one network"):
        cbnorm.convert(ResNet18(width=4), "cnx", num_contexts=4)
    with pytest.warns(UserWarning, match="README 'Depth'"):
        resnet20(in_channels=1, width=0.25, norm="acn", norm_layers=("*",), norm_kwargs={"num_components": 3})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cbnorm.convert(ResNet18(width=4), "acn", include="layer4.*", num_components=3)  # 5 layers
        cbnorm.convert(ResNet18(width=4), "acn", num_components=3, update="moving_average")
        cbnorm.convert(ResNet18(width=4), "mn", num_components=3)


@pytest.mark.parametrize("init", ["random", "data"])
def test_acn_in_every_layer_of_resnet20_diverges_with_the_old_random_init_and_trains_with_the_data_init(data, init):
    """The init fix, at the test's scale: ACN's former default (random means, unit variances whatever the
    activations' scale) in all 19 norms of ResNet-20 gives non-finite values within the 200 steps; the data
    init (the default now) trains, loss finite and decreasing."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(0)
        net = resnet20(in_channels=1, num_classes=10, width=0.25, norm="acn", norm_layers=("*",),
                       norm_kwargs={"num_components": 3, "init": init})
    if init == "random":
        with pytest.raises(cbnorm.NonFiniteError, match="AdaptiveContextNorm"):
            train(net, *data, uses_context=False)
        return
    losses = train(net, *data, uses_context=False)
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:20])


def test_depth_bench_runs_a_few_steps_and_tabulates_seeds():
    """bench/depth.py's pieces on a tiny budget: a run's record, and the README table's mean ± sd over seeds."""
    from bench import depth

    rec = depth.train_one("mode", "layer3", 0, limit=96, width=0.25, steps=3)
    assert rec["steps"] == 3 and rec["skipped"] == 0 and rec["diverged_at"] is None
    assert math.isfinite(rec["final_loss"]) and 0.0 <= rec["test_acc"] <= 1.0
    fake = {"runs": [dict(rec, label="bn", seed=0, final_loss=1.0, test_acc=0.5),
                     dict(rec, label="bn", seed=1, final_loss=3.0, test_acc=0.7),
                     dict(rec, label="acn every layer", seed=0, final_loss=None, test_acc=None, diverged_at=12)],
            "step_time": {"bn": {"ratio_to_bn": 1.0, "q1": 1.0, "q3": 1.0, "ms": 10.0}}}
    table = depth.table(fake).splitlines()
    assert table[2] == "| bn | 2.000 ± 1.414 | 0.600 ± 0.141 | 0/2 diverged, 0 steps skipped | 1.00× [1.00, 1.00] |"
    assert table[3].startswith("| acn every layer | — | — | 1/1 diverged")

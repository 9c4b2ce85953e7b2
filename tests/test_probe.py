"""x_hat, the normalized values before the affine, for every normalization layer by one mechanism
(``cbnorm.probe``): BatchNorm's in train mode is exactly standardized per channel, the output is the affine of
x_hat, torch's own layers included, and a train-mode probe changes the model's state once, as without it."""
import numpy as np
import pytest
import torch
from torch import nn

import cbnorm
from cbnorm import analysis, probe
from conftest import LAYER_KWARGS, contexts_for, make_layer, randomize


def model_with(norm: nn.Module) -> nn.Module:
    m = nn.Sequential(nn.Conv2d(3, 4, 3), norm)
    return cbnorm.ContextModel(m) if getattr(norm, "uses_context", False) else m


def batch(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 7, 7, generator=g) * 2 + 1


@pytest.mark.parametrize("norm", [lambda: make_layer("bn"), lambda: nn.BatchNorm2d(4)], ids=["cbnorm", "torch"])
def test_batchnorm_x_hat_in_train_mode_is_standardized_per_channel(norm):
    torch.manual_seed(0)
    layer = norm()
    with torch.no_grad():
        layer.weight.fill_(2.5), layer.bias.fill_(-1.0)
    m = model_with(layer).train()
    cap = probe.capture(m, batch(), ["1"], allow_train=True)["1"]
    xh = cap.x_hat.double()
    torch.testing.assert_close(xh.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-5, rtol=0)
    # variance 1 up to eps: sigma^2 / (sigma^2 + eps) exactly, independent reference on the input
    s2 = cap.input.double().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(xh.var(dim=(0, 2, 3), unbiased=False), s2 / (s2 + layer.eps), atol=1e-5, rtol=0)
    torch.testing.assert_close(xh.var(dim=(0, 2, 3), unbiased=False), torch.ones(4, dtype=torch.float64),
                               atol=float(layer.eps / s2.min()) + 1e-6, rtol=0)
    torch.testing.assert_close(cap.output, 2.5 * cap.x_hat - 1.0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LAYER_KWARGS))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_every_layer_x_hat_is_the_output_without_its_affine_and_state_changes_once(name, train):
    """For a per-channel affine, output = weight * x_hat + bias; for CN's per-context affine, per sample
    with its context's gamma and beta. A probed train-mode call leaves the same state (and draws the same
    random numbers) as an unprobed one."""
    torch.manual_seed(0)
    layer = randomize(make_layer(name), seed=1)
    twin = model_with(randomize(make_layer(name), seed=1))
    m = model_with(layer)
    twin.load_state_dict(m.state_dict())
    m.train(train), twin.train(train)
    x = batch()
    ctx = contexts_for(x.shape[0]) if layer.uses_context else None
    path = "model.1" if layer.uses_context else "1"
    torch.manual_seed(5)
    cap = probe.capture(m, x, [path], context=ctx, allow_train=True)[path]
    draw_probed = torch.rand(3)
    torch.manual_seed(5)
    with torch.no_grad():
        y = twin(x) if ctx is None else twin(x, context=ctx)
    torch.testing.assert_close(draw_probed, torch.rand(3))  # the random stream goes on as without the probe
    torch.testing.assert_close(cap.output, y.float(), atol=1e-5, rtol=1e-5)  # the probe changed nothing
    for (k, a), (_, b) in zip(m.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(a, b, msg=lambda s: f"{name} {k}: {s}")
    w, b = layer.weight.detach(), layer.bias.detach()
    if w.dim() == 2:  # per-context affine (N, C) rows
        if name == "cn" and train:
            w, b = w[ctx][:, :, None, None], b[ctx][:, :, None, None]
        else:
            return  # CN+ mixing: the affine is inside the posterior sum; x_hat is its affine-free twin
    else:
        w, b = w[None, :, None, None], b[None, :, None, None]
    torch.testing.assert_close(cap.output, w * cap.x_hat + b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("module", [nn.GroupNorm(2, 4), nn.LayerNorm(5)], ids=["groupnorm", "layernorm"])
def test_torch_group_and_layer_norm_x_hat(module):
    with torch.no_grad():
        module.weight.fill_(3.0), module.bias.fill_(2.0)
    cap = probe.capture(model_with(module).eval(), batch(), ["1"])["1"]
    torch.testing.assert_close(cap.output, 3.0 * cap.x_hat + 2.0, atol=1e-5, rtol=1e-5)
    assert module.weight is not None and module.bias is not None  # put back
    assert probe.layer_names(model_with(module), torch_layers=True) == ["1"]


def test_non_norm_modules_have_no_x_hat_and_normalized_refuses_them():
    m = model_with(make_layer("bn")).eval()
    caps = probe.capture(m, batch(), ["0", "1"])
    assert caps["0"].x_hat is None and caps["1"].x_hat is not None
    with pytest.raises(TypeError, match="not a normalization layer"):
        probe.normalized(m[0], batch())


def test_view_stats_like_with_like():
    """Input: distances to N(0, 1) of its standardized values (scale and shift do not matter); output: no
    distance to N(0, 1) at all; x_hat: scipy's numbers."""
    import scipy.stats as sps

    rng = np.random.default_rng(0)
    v = rng.gamma(2.0, size=(3, 500)) * 7 + 40
    si = analysis.view_stats(v, "input")
    z = (v - v.mean(1, keepdims=True)) / v.std(1, keepdims=True)
    np.testing.assert_allclose(si["ks_to_normal"], [sps.kstest(r, "norm").statistic for r in z], atol=1e-12)
    np.testing.assert_allclose(si["mean"], v.mean(1))
    so = analysis.view_stats(v, "output")
    assert set(so) == {"mean", "std", "skewness", "excess_kurtosis"}
    np.testing.assert_allclose(so["excess_kurtosis"], sps.kurtosis(v, axis=1))
    sx = analysis.view_stats(z, "x_hat")
    np.testing.assert_allclose(sx["ks_to_normal"], si["ks_to_normal"], atol=1e-12)
    with pytest.raises(ValueError, match="which must be one of"):
        analysis.view_stats(v, "affine")

"""cbnorm.convert on models researchers already have, and context routing through ContextModel."""
import functools
import threading

import pytest
import torch
from torch import nn

import cbnorm
from cbnorm.convert import context_layers
from cbnorm.models import build_model
from cbnorm.norms.base import ROUTED_CONTEXTS

K_CTX = 3
TARGET_KW = {
    "mn": {"num_components": 2}, "mode": {"num_components": 2}, "acn": {"num_components": 2},
    "cn": {"num_contexts": K_CTX}, "cnx": {"num_contexts": K_CTX}, "cn-embed": {"num_contexts": K_CTX},
    "gn": {"num_groups": 2},
}


# ----------------------------------------------------------------------------- a torchvision-style ResNet-18
class TVBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TVResNet18(nn.Module):
    """torchvision.models.resnet18's structure (norm_layer=, BatchNorm2d inside Sequential downsamples),
    narrowed by ``width`` so the tests stay fast."""

    def __init__(self, num_classes=10, width=8, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, 2)
        self.layer2 = self._make_layer(2 * width, 2, stride=2)
        self.layer3 = self._make_layer(4 * width, 2, stride=2)
        self.layer4 = self._make_layer(8 * width, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                       self._norm_layer(planes))
        layers = [TVBasicBlock(self.inplanes, planes, stride, downsample, self._norm_layer)]
        self.inplanes = planes
        layers += [TVBasicBlock(planes, planes, norm_layer=self._norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8),
                         nn.BatchNorm1d(8, eps=1e-3, momentum=None), nn.ReLU(), nn.Linear(8, 3))


def trained(model, x, steps=3):
    """A few SGD steps in train mode so that running statistics and affine weights are not at their init."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model.eval()


# ----------------------------------------------------------------------------- bn -> bn is exact
@pytest.mark.parametrize("make,shape", [(TVResNet18, (4, 3, 32, 32)), (mlp, (16, 6))])
def test_bn_to_bn_reproduces_eval_output_exactly(make, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = trained(make(), x)
    with torch.no_grad():
        before = model(x)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    out, paths = cbnorm.convert(model, "bn", return_paths=True)
    assert out is model and len(paths) == n_bn
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, cbnorm.BatchNorm) for m in model.modules()) == n_bn
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)


def test_carries_hyperparameters_weights_statistics_and_flags():
    torch.manual_seed(0)
    model = trained(mlp(), torch.randn(16, 6))
    model[1].weight.requires_grad_(False)
    old1, old4 = model[1], model[4]
    model.train()
    model[0].eval()  # an untouched module's own mode must survive
    cbnorm.convert(model, "bn")
    new1, new4 = model[1], model[4]
    assert (new4.eps, new4.momentum, new1.momentum, new1.affine) == (1e-3, None, 0.1, True)
    assert torch.equal(new1.weight, old1.weight) and torch.equal(new1.bias, old1.bias)
    assert not new1.weight.requires_grad and new1.bias.requires_grad
    assert torch.equal(new1.running_mean, old1.running_mean) and torch.equal(new1.running_var, old1.running_var)
    assert int(new1.num_batches_tracked) == int(old1.num_batches_tracked) == 3
    assert new1.training and not model[0].training


def test_device_dtype_affine_and_root_layer():
    bn = nn.BatchNorm2d(5, affine=False).double()
    new = cbnorm.convert(bn, "mn", num_components=2)
    assert isinstance(new, cbnorm.MixtureNorm) and new is not bn
    assert new.weight is None and new.affine is False
    assert all(b.dtype == torch.float64 for b in new.buffers() if b.is_floating_point())
    y = new(torch.randn(8, 5, 3, 3, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_sync_batchnorm_is_converted():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))
    cbnorm.convert(model, "mode", num_components=2)
    assert isinstance(model[1], cbnorm.ModeNorm)
    # ModeNorm starts every mode from the BatchNorm's running statistics
    assert torch.equal(model[1].running_mean, torch.zeros(2, 4))


def test_modes_and_contexts_start_from_the_batchnorm_statistics():
    torch.manual_seed(0)
    model = trained(mlp(), torch.randn(16, 6))
    mean, var = model[1].running_mean.clone(), model[1].running_var.clone()
    cbnorm.convert(model, "cn", include="1", num_contexts=K_CTX)
    assert torch.equal(model[1].running_mean, mean.expand(K_CTX, -1))
    assert torch.equal(model[1].running_var, var.expand(K_CTX, -1))
    assert model[1].running_batches_tracked.tolist() == [3] * K_CTX  # each context was averaged over 3 batches


def test_cumulative_average_continues_from_the_carried_count():
    """momentum=None: a converted layer's next update weighs the new batch by 1 / (batches so far + 1)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4, momentum=None)
    bn.train()
    for _ in range(3):
        bn(torch.randn(32, 4) + 2)
    x = torch.randn(32, 4) - 1
    ours = cbnorm.convert(bn, "cn", num_contexts=2)
    expected = bn.running_mean.clone() * 3 / 4 + x[:16].mean(0) / 4  # context 0's 4th batch
    ours.train()(x[:16].repeat(2, 1), context=torch.tensor([0] * 32))
    torch.testing.assert_close(ours.running_mean[0], expected)
    torch.testing.assert_close(ours.running_mean[1], bn.running_mean)  # context 1 saw no batch


def test_track_running_stats_false_is_refused_with_its_path():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"'1'.*track_running_stats=False"):
        cbnorm.convert(model, "bn")


# ----------------------------------------------------------------------------- every target trains and evals
@pytest.mark.parametrize("norm", sorted(cbnorm.NORMS))
def test_every_cbnorm_layer_as_target_trains_a_step_and_evaluates(norm):
    torch.manual_seed(0)
    model = TVResNet18(width=4)
    cbnorm.convert(model, norm, include=["layer3.*", "layer4.0.downsample.*"], **TARGET_KW.get(norm, {}))
    replaced = [n for n, m in model.named_modules() if isinstance(m, cbnorm.NORMS[norm])]
    assert replaced == ["layer3.0.bn1", "layer3.0.bn2", "layer3.0.downsample.1", "layer3.1.bn1", "layer3.1.bn2",
                        "layer4.0.downsample.1"]
    wrapped = cbnorm.ContextModel(model)
    x = torch.randn(6, 3, 32, 32)
    ctx = torch.arange(6) % K_CTX if wrapped.uses_context else None
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    wrapped.train()
    loss = wrapped(x, context=ctx).logsumexp(1).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    wrapped.eval()
    with torch.no_grad():
        y = wrapped(x, context=ctx)
        assert y.shape == (6, 10) and torch.isfinite(y).all()
        if wrapped.uses_context:  # CN+ mixing without ids in eval
            assert torch.isfinite(wrapped(x)).all()


def test_converting_a_converted_model_again():
    torch.manual_seed(0)
    model = cbnorm.convert(TVResNet18(width=4), "mn", include="layer2.*", num_components=2)
    assert sum(isinstance(m, cbnorm.MixtureNorm) for m in model.modules()) == 5
    _, paths = cbnorm.convert(model, "acn", include="layer2.*", return_paths=True, num_components=3)
    assert len(paths) == 5 and all(isinstance(model.get_submodule(p), cbnorm.AdaptiveContextNorm) for p in paths)
    assert all(model.get_submodule(p).num_components == 3 for p in paths)
    cbnorm.convert(model, "bn")  # everything back to BatchNorm: cbnorm layers are sources too
    assert all(isinstance(model.get_submodule(p), cbnorm.BatchNorm) for p in cbnorm.norm_layer_paths(model))


def test_partial_class_and_callable_targets():
    model = cbnorm.convert(mlp(), functools.partial(cbnorm.MixtureNorm, num_components=2), include="1")
    assert isinstance(model[1], cbnorm.MixtureNorm) and model[1].num_components == 2
    model = cbnorm.convert(mlp(), cbnorm.GroupNorm, num_groups=4)
    assert isinstance(model[4], cbnorm.GroupNorm) and model[4].eps == 1e-3
    model = cbnorm.convert(mlp(), lambda c: nn.LayerNorm(c), include="4")
    assert isinstance(model[4], nn.LayerNorm)
    with pytest.raises(TypeError, match="num_contexts"):
        cbnorm.convert(mlp(), "mn", num_contexts=3)
    with pytest.raises(TypeError, match="norm must be"):
        cbnorm.convert(mlp(), 3)


def test_shared_layer_stays_shared():
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), bn, nn.Linear(4, 4), bn)
    cbnorm.convert(model, "bn")
    assert model[1] is model[3] and isinstance(model[1], cbnorm.BatchNorm)


def test_untouched_modules_keep_hooks_and_requires_grad():
    model = TVResNet18(width=4)
    calls = []
    model.layer1.register_forward_hook(lambda *a: calls.append(1))
    model.conv1.weight.requires_grad_(False)
    cbnorm.convert(model, "bn", exclude="layer1.*")
    assert isinstance(model.layer1[0].bn1, nn.BatchNorm2d)  # excluded
    assert isinstance(model.layer2[0].bn1, cbnorm.BatchNorm)
    model.eval()(torch.randn(1, 3, 32, 32))
    assert calls == [1] and not model.conv1.weight.requires_grad


# ----------------------------------------------------------------------------- patterns
def test_include_exclude_patterns_and_their_errors():
    model = TVResNet18(width=4)
    paths = cbnorm.select_layers(model, include="layer3.*.bn2")
    assert paths == ["layer3.0.bn2", "layer3.1.bn2"]
    assert cbnorm.select_layers(model, include="layer4.*", exclude="*downsample*") == [
        "layer4.0.bn1", "layer4.0.bn2", "layer4.1.bn1", "layer4.1.bn2"]
    assert cbnorm.select_layers(model, include="bn1,layer1.0.bn1") == ["bn1", "layer1.0.bn1"]
    with pytest.raises(ValueError, match=r"include pattern 'layer5\.\*' matches no normalization layer.*'layer1\.0\.bn1'"):
        cbnorm.convert(model, "mn", include="layer5.*")
    with pytest.raises(ValueError, match="exclude pattern 'fc'"):
        cbnorm.convert(model, "mn", exclude="fc")  # a module path, but not a normalization layer
    with pytest.raises(ValueError, match="no normalization layer to convert"):
        cbnorm.convert(nn.Linear(3, 3), "bn")
    with pytest.raises(ValueError, match="holds no pattern"):
        cbnorm.convert(model, "bn", include=" , ")


def test_our_resnet_and_densenet_choose_layers_by_path():
    r = build_model("resnet20", in_channels=1, num_classes=10, width=0.25, norm="mn", norm_layers="layer3.*",
                    norm_kwargs={"num_components": 2, "num_contexts": 4})
    mn = [n for n, m in r.named_modules() if isinstance(m, cbnorm.MixtureNorm)]
    assert mn == [f"layer3.{i}.bn{j}" for i in range(3) for j in (1, 2)] and r.norm_layers == tuple(mn)
    d = build_model("densenet40", in_channels=1, num_classes=10, width=0.25, norm="cn",
                    norm_layers=["transition*", "final"], norm_kwargs={"num_components": 2, "num_contexts": 4})
    assert d.norm_layers == ("transition1.norm", "transition2.norm", "final")
    assert d.num_final_features == 4 + 36 * 3  # 16 * width stem channels + 3 blocks x 12 layers x growth 3
    assert build_model("densenet40", num_classes=100).num_final_features == 448  # the MN paper's Table 7
    x, c = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    assert d.train()(x, context=c).shape == (4, 10)
    cbnorm.convert(r, "bn")
    assert r.eval()(x).shape == (4, 10)


# ----------------------------------------------------------------------------- context routing
class Plain(nn.Module):
    """A model whose forward knows nothing of contexts."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).mean(dim=(2, 3))


def _ctx_model():
    return cbnorm.ContextModel(cbnorm.convert(Plain(), "cn", num_contexts=2))


def test_context_model_routes_ids_for_the_call_only():
    torch.manual_seed(0)
    wrapped = _ctx_model()
    layer = wrapped.model.bn
    x = torch.randn(8, 2, 5, 5)
    ctx = torch.tensor([0, 1] * 4)
    wrapped.train()
    y = wrapped(x, context=ctx)
    # the same as calling the layer with explicit ids
    ref = layer.running_mean.clone()
    assert ROUTED_CONTEXTS.get() == {}
    with pytest.raises(ValueError, match="needs context ids"):
        wrapped(x)  # nothing left behind: training without ids fails again
    with pytest.raises(ValueError, match="needs context ids"):
        wrapped.model(x)
    wrapped.eval()
    with torch.no_grad():
        known = wrapped(x, context=ctx)
        direct = layer(wrapped.model.conv(x), context=ctx).mean(dim=(2, 3))
    torch.testing.assert_close(known, direct)
    assert torch.equal(ref, layer.running_mean) and y.shape == (8, 4)


def test_no_state_after_an_exception_and_models_are_isolated():
    a, b = _ctx_model().train(), _ctx_model().train()
    x = torch.randn(4, 2, 5, 5)
    with pytest.raises(ValueError, match=r"context ids must be in \[0, 1\]"):
        a(x, context=torch.tensor([0, 1, 2, 0]))
    assert ROUTED_CONTEXTS.get() == {}
    seen = []

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = a, b.model

        def forward(self, x):
            return self.a(x, context=torch.tensor([0, 0, 1, 1])) + self.b(x)  # b gets no ids of a's

    with pytest.raises(ValueError, match="needs context ids"):
        Outer()(x)
    b.model.bn.register_forward_pre_hook(lambda m, args: seen.append(ROUTED_CONTEXTS.get().get(id(m))))
    b(x, context=torch.tensor([1, 1, 0, 0]))
    assert torch.equal(seen[-1], torch.tensor([1, 1, 0, 0]))
    with pytest.raises(ValueError, match="no context layer"):
        cbnorm.ContextModel(Plain())(x, context=torch.tensor([0, 1, 0, 1]))


def test_threads_never_see_each_others_ids():
    model = _ctx_model().eval()
    layer = model.model.bn
    seen = {}
    barrier = threading.Barrier(2)

    def hook(m, args):
        barrier.wait(timeout=10)  # both threads are inside their call at the same time
        seen[threading.current_thread().name] = ROUTED_CONTEXTS.get().get(id(m))

    layer.register_forward_pre_hook(hook)
    x = torch.randn(2, 2, 3, 3)
    ids = {"t0": torch.tensor([0, 0]), "t1": torch.tensor([1, 1])}
    threads = [threading.Thread(target=lambda n=n: model(x, context=ids[n]), name=n) for n in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(seen["t0"], ids["t0"]) and torch.equal(seen["t1"], ids["t1"])


def test_our_models_use_the_same_routing():
    m = build_model("resnet20", in_channels=1, num_classes=10, width=0.25, norm="cnx", norm_layers="layer2.0.*",
                    norm_kwargs={"num_contexts": 2})
    assert [type(x).__name__ for x in context_layers(m)] == ["ContextNormX", "ContextNormX"]
    x, c = torch.randn(4, 1, 12, 12), torch.tensor([0, 1, 0, 1])
    m.eval()
    with torch.no_grad():
        ours = m(x, context=c)
        wrapped = cbnorm.ContextModel(m)(x, context=c)
    assert torch.equal(ours, wrapped)

"""Models: ShallowCNN / SmallViT with every norm, widths, which layers are replaced, context routing."""
import pytest
import torch

import cbnorm
from cbnorm.norms.base import ROUTED_CONTEXTS
from cbnorm.models import CNN_BLOCKS, ShallowCNN, SmallViT, build_model, norm_layers_of


K = 3
NORM_KW = {"num_components": 2, "num_contexts": K, "num_groups": 2}


def ctx(n):
    return torch.arange(n) % K


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("norm", sorted(cbnorm.NORMS))
def test_shallow_cnn_every_norm(norm, channels):
    torch.manual_seed(0)
    model = ShallowCNN(channels, 10, width=0.125, norm=norm, norm_kwargs=NORM_KW)
    x = torch.randn(8, channels, 16, 16)
    c = ctx(8) if model.uses_context else None
    model.train()
    out = model(x, context=c)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.blocks["conv1"]["conv"].parameters())
    model.eval()
    with torch.no_grad():
        y1 = model(x)  # eval without context: CN+ inference for context layers
        y2 = model(x[:3])
    assert y1.shape == (8, 10) and torch.isfinite(y1).all()
    torch.testing.assert_close(y1[:3], y2, atol=1e-4, rtol=1e-4)  # eval depends on the sample only


def test_width_multiplier_sets_channels():
    for width, expected in ((1.0, [64, 128, 128, 256]), (0.5, [32, 64, 64, 128]), (0.01, [4, 4, 4, 4])):
        m = ShallowCNN(3, 7, width=width)
        assert m.widths == expected
        assert [m.blocks[b]["conv"].out_channels for b in CNN_BLOCKS] == expected
        assert [m.blocks[b]["norm"].num_features for b in CNN_BLOCKS] == expected
        assert m.head.in_features == expected[-1] and m.head.out_features == 7
    assert ShallowCNN(1, 10, width=0.5).blocks["conv1"]["conv"].in_channels == 1


def test_which_layers_are_replaced():
    m = ShallowCNN(1, 10, width=0.125, norm="acn", norm_layers=("conv2", "conv4"), norm_kwargs=NORM_KW)
    kinds = {b: type(m.blocks[b]["norm"]).__name__ for b in CNN_BLOCKS}
    assert kinds == {"conv1": "BatchNorm", "conv2": "AdaptiveContextNorm", "conv3": "BatchNorm",
                     "conv4": "AdaptiveContextNorm"}
    assert m.blocks["conv2"]["norm"].num_components == 2
    assert m.norm_layers == ("conv2", "conv4")
    # the default places the norm at conv3 only (the papers' setting); base_norm can change the others
    m = ShallowCNN(1, 10, width=0.125, norm="mn", norm_kwargs=NORM_KW, base_norm="gn")
    assert [type(m.blocks[b]["norm"]).__name__ for b in CNN_BLOCKS] == ["GroupNorm", "GroupNorm", "MixtureNorm",
                                                                       "GroupNorm"]
    names = set(norm_layers_of(m))
    assert names == {f"blocks.{b}.norm" for b in CNN_BLOCKS}
    # input norm on the image channels
    m = ShallowCNN(3, 10, width=0.125, input_norm="cn", norm_kwargs=NORM_KW)
    assert m.input_norm.num_features == 3 and m.uses_context
    assert "input_norm" in norm_layers_of(m)


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm_layers"):
        ShallowCNN(1, 10, norm_layers=("conv9",))
    with pytest.raises(ValueError, match="width"):
        ShallowCNN(1, 10, width=0)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet")
    with pytest.raises(ValueError, match="unknown norm"):
        ShallowCNN(1, 10, norm="nope")
    m = ShallowCNN(1, 10, width=0.125)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        m(torch.randn(2, 3, 16, 16))


def _record_context(model):
    seen = {}

    def hook(name):
        def fn(module, args, kwargs):  # what the layer uses: an explicit context, else the routed ids
            explicit = kwargs.get("context")
            seen[name] = explicit if explicit is not None else ROUTED_CONTEXTS.get().get(id(module))
        return fn

    for name, layer in norm_layers_of(model).items():
        layer.register_forward_pre_hook(hook(name), with_kwargs=True)
    return seen


def test_context_routing_cnn():
    torch.manual_seed(0)
    m = ShallowCNN(1, 10, width=0.125, norm="cn", norm_layers=("conv3",), norm_kwargs=NORM_KW)
    assert m.uses_context
    seen = _record_context(m)
    c = ctx(6)
    m.train()
    m(torch.randn(6, 1, 16, 16), context=c)
    assert torch.equal(seen["blocks.conv3.norm"], c)  # the context layer gets the ids
    assert all(seen[f"blocks.{b}.norm"] is None for b in ("conv1", "conv2", "conv4"))  # the others never do
    with pytest.raises(ValueError, match="context"):
        m(torch.randn(6, 1, 16, 16))  # training a context layer without contexts
    m.eval()
    with torch.no_grad():
        y_mixed = m(torch.randn(6, 1, 16, 16))  # CN+ inference
        y_known = m(torch.randn(6, 1, 16, 16), context=c)
    assert y_mixed.shape == y_known.shape == (6, 10)
    assert seen["blocks.conv3.norm"] is not None


def test_model_without_context_layer_refuses_context():
    m = ShallowCNN(1, 10, width=0.125, norm="acn", norm_kwargs=NORM_KW)
    assert not m.uses_context
    with pytest.raises(ValueError, match="no context layer"):
        m(torch.randn(4, 1, 16, 16), context=ctx(4))


def test_vit_cn_patch_norm_on_tokens():
    torch.manual_seed(0)
    m = build_model("vit", in_channels=1, num_classes=10, image_size=16, patch_size=4, dim=16, depth=1, heads=2,
                    patch_norm="cn", norm_kwargs={"num_contexts": K})
    assert isinstance(m, SmallViT) and m.uses_context
    layer = m.patch_norm
    assert layer.channel_last and layer.num_contexts == K
    shapes = []
    layer.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    seen = _record_context(m)
    x, c = torch.randn(6, 1, 16, 16), ctx(6)
    m.train()
    out = m(x, context=c)
    assert out.shape == (6, 10)
    assert shapes[-1] == (6, 16, 16)  # (N, L, D): 16 patches of dim 16
    assert torch.equal(seen["patch_norm"], c)
    out.sum().backward()
    assert layer.weight.grad is not None
    # per-context statistics are over the tokens of each context's samples, per feature D
    assert layer.running_mean.shape == (K, 16)
    m.eval()
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()
    with pytest.raises(ValueError, match="16, 16"):
        m(torch.randn(2, 1, 20, 20))


@pytest.mark.parametrize("norm", ["ln", "bn", "acn", "cnx"])
def test_vit_other_patch_norms(norm):
    m = build_model("vit", in_channels=3, num_classes=5, image_size=8, patch_size=4, dim=8, depth=1, heads=2,
                    patch_norm=norm, norm_kwargs=NORM_KW)
    x = torch.randn(4, 3, 8, 8)
    out = m(x, context=ctx(4) if m.uses_context else None)
    assert out.shape == (4, 5)


def test_context_predictor_routes_predicted_context_in_eval():
    from cbnorm.models import ShallowCNN

    torch.manual_seed(0)
    model = ShallowCNN(1, 10, width=0.25, norm="cnx", norm_kwargs={"num_contexts": 3}, predict_contexts=3)
    x = torch.randn(5, 1, 28, 28)
    ctx = torch.tensor([0, 1, 2, 0, 1])
    logits, ctx_logits = model(x, context=ctx, return_context_logits=True)
    assert logits.shape == (5, 10) and ctx_logits.shape == (5, 3)
    model.eval()
    predicted = model.context_predictor(x).argmax(1)
    torch.testing.assert_close(model(x), model(x, context=predicted))  # eval: predicted context is used
    torch.testing.assert_close(model(x, predict_context=False), model.eval()(x, predict_context=False))
    model.train()
    with pytest.raises(ValueError, match="needs context ids"):
        model(x)  # training still needs the true contexts for the statistics
    with pytest.raises(ValueError, match="predict_contexts needs a context layer"):
        ShallowCNN(1, 10, width=0.25, norm="bn", predict_contexts=3)

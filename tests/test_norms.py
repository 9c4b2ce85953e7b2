"""Properties every layer must have: one interface, shapes, modes, dtypes, devices, state, errors."""
import copy

import pytest
import torch
from torch import nn

import cbnorm
from conftest import CUDA, LAYER_KWARGS, call, contexts_for, make_layer, randomize, requires_cuda, warm_up

NAMES = list(LAYER_KWARGS)


# ------------------------------------------------------------------------------------------- registry
def test_registry_names_and_aliases():
    assert set(cbnorm.NORMS) == set(NAMES)
    for alias, canonical in {"scb": "cnx", "scb-base": "cn-embed", "ucb": "acn", "uan": "acn",
                             "UCB_Norm": "acn", "mixture": "mn", "batchnorm": "bn"}.items():
        assert cbnorm.resolve_name(alias) == canonical
    assert isinstance(cbnorm.build_norm("uan", 8, num_components=2), cbnorm.AdaptiveContextNorm)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown norm 'foo'"):
        cbnorm.build_norm("foo", 4)
    with pytest.raises(TypeError, match="num_contexts"):
        cbnorm.build_norm("bn", 4, num_contexts=3)
    with pytest.raises(ValueError, match="num_features"):
        cbnorm.build_norm("bn", 0)
    with pytest.raises(TypeError, match="num_contexts"):
        cbnorm.build_norm("cn", 4, num_contexts=2.5)


#: layers whose running statistics are averages with BatchNorm's momentum (MN's running state is its queue)
MOMENTUM = ("bn", "mode", "cn", "acn")
#: layers with running statistics (RunningStatsNorm: num_batches_tracked, reset_running_stats)
RUNNING = ("bn", "mn", "mode", "cn", "acn")


@pytest.mark.parametrize("name", NAMES)
def test_uniform_constructor(name):
    kw = {"momentum": 0.2} if name in MOMENTUM else {}
    layer = make_layer(name, 6, eps=1e-3, affine=False, **kw)
    assert layer.num_features == 6 and layer.eps == 1e-3
    assert layer.uses_context == (name in ("cn", "cnx", "cn-embed"))
    assert not any(n in ("weight", "bias") for n, _ in layer.named_parameters())
    assert layer.takes_momentum == (name in MOMENTUM) == ("momentum" in cbnorm.norms.accepted_kwargs(type(layer)))
    assert isinstance(layer, cbnorm.norms.RunningStatsNorm) == (name in RUNNING)
    assert ("num_batches_tracked" in dict(layer.named_buffers())) == (name in RUNNING)
    if name in MOMENTUM:
        assert layer.momentum == 0.2 and f"momentum=0.2" in repr(layer)
        assert make_layer(name, 6, momentum=None).momentum is None  # cumulative average
        for bad in (-0.1, 1.5, float("nan"), "0.1", True):
            with pytest.raises(ValueError, match="momentum must be in"):
                make_layer(name, 6, momentum=bad)
    else:  # no running average: momentum would be silently ignored, so it is refused, by name
        assert not hasattr(layer, "momentum") and "momentum" not in repr(layer)
        with pytest.raises(TypeError, match="momentum"):
            make_layer(name, 6, momentum=0.1)


# ------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(8, 4), (8, 4, 5), (8, 4, 3, 3), (6, 4, 2, 2, 2)])
def test_shapes_train_eval(name, shape):
    layer = make_layer(name, 4)
    x = torch.randn(*shape)
    y = call(layer, x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    layer.eval()
    y = call(layer, x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("ln", "gn")])
def test_tokens_channel_last(name):
    """(N, L, D) with channel_last=True equals the channels-first layer on (N, D, L).

    (ln/gn differ on purpose: on tokens they normalize each token, as transformers do; see test_references.)"""
    torch.manual_seed(0)
    a = randomize(make_layer(name, 4, channel_last=True))
    b = copy.deepcopy(a)
    b.channel_last = False
    x = torch.randn(8, 5, 4)
    torch.manual_seed(1)
    ya = call(a, x)
    torch.manual_seed(1)
    yb = call(b, x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------- eval mode
@pytest.mark.parametrize("name", NAMES)
def test_eval_depends_on_one_sample_only(name):
    layer = randomize(warm_up(make_layer(name, 4))).eval()
    x = torch.randn(10, 4, 3, 3)
    ctx = contexts_for(10)
    full = layer(x, context=ctx if layer.uses_context else None)
    for i in (0, 7):
        one = layer(x[i:i + 1], context=ctx[i:i + 1] if layer.uses_context else None)
        torch.testing.assert_close(one[0], full[i], rtol=1e-5, atol=1e-5)
    # and is deterministic
    torch.testing.assert_close(full, layer(x, context=ctx if layer.uses_context else None))


@pytest.mark.parametrize("name", ["cn", "cnx", "cn-embed"])
def test_cn_plus_mixed_inference_eval_only(name):
    layer = randomize(warm_up(make_layer(name, 4)))
    with pytest.raises(ValueError, match="needs context ids"):
        layer(torch.randn(6, 4, 2, 2))  # train mode needs contexts
    layer.eval()
    y = layer(torch.randn(6, 4, 2, 2))  # CN+ mixes all contexts
    assert torch.isfinite(y).all()
    layer.mixed_inference = False
    with pytest.raises(ValueError, match="mixed_inference"):
        layer(torch.randn(6, 4, 2, 2))


# --------------------------------------------------------------------------------------------- state
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    src = randomize(warm_up(make_layer(name, 4))).eval()
    dst = make_layer(name, 4)
    dst.load_state_dict(src.state_dict())
    dst.eval()
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(call(dst, x), call(src, x))


@pytest.mark.parametrize("name", NAMES)
def test_to_double_moves_every_buffer(name):
    layer = warm_up(make_layer(name, 4)).double()
    for n, t in list(layer.named_parameters()) + list(layer.named_buffers()):
        if t.is_floating_point():
            assert t.dtype == torch.float64, n
    y = call(layer, torch.randn(8, 4, 3, 3, dtype=torch.float64))
    assert y.dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_mixture_parameters_one_signature(name):
    """mixture_parameters() -> (weights (K,), means (K, C), variances (K, C)), no arguments, on every layer;
    has_mixture tells which layers have one; channel_mixture_parameters() gives (K, C) weights."""
    import inspect

    for kw in ({}, {"posterior": "channel"}) if name in ("mn", "acn") else ({},):
        layer = warm_up(make_layer(name, 4, **kw))
        assert isinstance(type(layer).has_mixture, bool)
        assert list(inspect.signature(layer.mixture_parameters).parameters) == []
        if not layer.has_mixture:
            assert name in ("bn", "ln", "gn")
            with pytest.raises(NotImplementedError, match="has no mixture"):
                layer.mixture_parameters()
            continue
        w, mu, var = layer.mixture_parameters()
        k = w.shape[0]
        assert w.shape == (k,) and mu.shape == (k, 4) and var.shape == (k, 4)
        torch.testing.assert_close(w.sum(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)
        assert (var > 0).all() and (w >= 0).all()
        assert not any(t.requires_grad for t in (w, mu, var))
        wc, muc, varc = layer.channel_mixture_parameters()
        assert wc.shape == (k, 4)
        torch.testing.assert_close(wc.sum(0), torch.ones(4), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wc.mean(1), w)  # the mixture weights are the channels' average
        torch.testing.assert_close(muc, mu), torch.testing.assert_close(varc, var)
        if name == "mn" and kw:  # per-channel weights really differ per channel
            assert not torch.allclose(wc, wc[:, :1].expand_as(wc))


# -------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", ["cn", "cnx", "cn-embed"])
def test_context_errors(name):
    layer = make_layer(name, 4)
    x = torch.randn(6, 4, 2, 2)
    with pytest.raises(ValueError, match=r"context ids must be in \[0, 2\]"):
        layer(x, context=torch.tensor([0, 1, 2, 3, 0, 1]))
    with pytest.raises(ValueError, match=r"context ids must be in"):
        layer(x, context=torch.tensor([0, 1, 2, -1, 0, 1]))
    with pytest.raises(ValueError, match=r"shape \(N,\) = \(6,\)"):
        layer(x, context=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        layer(x, context=torch.zeros(6))
    with pytest.raises(ValueError, match="needs context ids"):
        layer(x)


@pytest.mark.parametrize("name", ["bn", "ln", "gn", "mn", "mode", "acn"])
def test_context_refused_by_layers_without_one(name):
    with pytest.raises(ValueError, match="does not take a context"):
        make_layer(name, 4)(torch.randn(6, 4, 2, 2), context=torch.zeros(6, dtype=torch.long))


@pytest.mark.parametrize("name", NAMES)
def test_shape_errors(name):
    layer = make_layer(name, 4)
    with pytest.raises(ValueError, match="num_features=4"):
        call(layer, torch.randn(6, 5, 2, 2))
    with pytest.raises(ValueError, match=r"\(N, C, \*spatial\)"):
        call(layer, torch.randn(4), context=None)
    with pytest.raises(TypeError, match="floating-point"):
        call(layer, torch.ones(6, 4, 2, 2, dtype=torch.long))
    tok = make_layer(name, 4, channel_last=True)
    with pytest.raises(ValueError, match=r"\(N, L, D\)"):
        call(tok, torch.randn(6, 4, 2, 2))
    with pytest.raises(ValueError, match="empty batch"):
        call(layer, torch.randn(0, 4, 2, 2), context=None)


@pytest.mark.parametrize("name", ["bn", "mn", "mode"])
def test_single_value_per_channel_in_training(name):
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        make_layer(name, 4)(torch.randn(1, 4))


# ---------------------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("name", NAMES)
def test_constant_channel_is_finite(name):
    layer = warm_up(make_layer(name, 4))
    layer.train()
    x = torch.randn(12, 4, 3, 3)
    x[:, 2] = 5.0
    y = call(layer, x)
    assert torch.isfinite(y).all()
    x = torch.full((12, 4, 3, 3), 3.0)
    assert torch.isfinite(call(layer, x)).all()
    layer.eval()
    assert torch.isfinite(call(layer, x)).all()


@pytest.mark.parametrize("name", NAMES)
def test_huge_and_tiny_activations_are_finite(name):
    layer = warm_up(make_layer(name, 4))
    for scale in (1e-6, 1e4):
        x = torch.randn(12, 4, 3, 3) * scale
        layer.train()
        assert torch.isfinite(call(layer, x)).all()
        layer.eval()
        assert torch.isfinite(call(layer, x)).all()
    # eval: one sample's activations so large that their squares overflow float32 (train refuses them)
    x = torch.randn(12, 4, 3, 3)
    x[0] *= 1e20
    y = call(layer.eval(), x)
    assert torch.isfinite(y).all(), f"{name}: activations of 1e20 in eval give non-finite output"


def test_context_with_one_sample_uses_running_stats():
    layer = randomize(warm_up(make_layer("cn", 4)))
    before_mean = layer.running_mean.clone()
    x = torch.randn(7, 4, 2, 2)
    ctx = torch.tensor([0, 0, 0, 1, 1, 1, 2])  # context 2 has one sample
    y = layer(x, context=ctx)
    ref = copy.deepcopy(layer).eval()(x[6:], context=ctx[6:])
    torch.testing.assert_close(y[6:], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_mean[2], before_mean[2])  # not updated from one sample
    assert not torch.allclose(layer.running_mean[0], before_mean[0])


def test_mn_component_with_no_points_is_finite():
    layer = make_layer("mn", 2, num_components=3)
    x = torch.zeros(8, 2, 2, 2)
    x[4:] = 1.0  # only two distinct points for three components
    y = layer(x)
    assert torch.isfinite(y).all()
    layer.eval()
    assert torch.isfinite(layer(x)).all()


# ------------------------------------------------------------------------------------ memory & dtype
@pytest.mark.parametrize("name", NAMES)
def test_channels_last_and_non_contiguous(name):
    torch.manual_seed(0)
    layer = randomize(warm_up(make_layer(name, 4))).eval()
    x = torch.randn(6, 4, 5, 5)
    ref = call(layer, x)
    xcl = x.contiguous(memory_format=torch.channels_last)
    y = call(layer, xcl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    xnc = torch.randn(6, 5, 5, 4).permute(0, 3, 1, 2)[:, :, ::2]  # non-contiguous view
    torch.testing.assert_close(call(layer, xnc), call(layer, xnc.contiguous()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_low_precision(name, dtype):
    layer = warm_up(make_layer(name, 4))
    x = torch.randn(8, 4, 3, 3) * 3
    with torch.autocast("cpu", dtype=dtype):
        y = call(layer, x.to(dtype))
        layer.eval()
        y2 = call(layer, x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all() and torch.isfinite(y2).all()
    for n, b in layer.named_buffers():
        if b.is_floating_point():
            assert b.dtype == torch.float32, n


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_parameters(name):
    layer = make_layer(name, 4)
    x = torch.randn(12, 4, 3, 3, requires_grad=True)
    call(layer, x).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for n, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_matches_eager(name):
    layer = randomize(warm_up(make_layer(name, 4))).eval()
    x = torch.randn(6, 4, 3, 3)
    ctx = contexts_for(6) if layer.uses_context else None
    compiled = torch.compile(layer)  # inductor
    torch.testing.assert_close(compiled(x, context=ctx), layer(x, context=ctx), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------- CUDA
@requires_cuda
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name):
    torch.manual_seed(0)
    cpu = randomize(warm_up(make_layer(name, 4))).eval()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(6, 4, 3, 3)
    ctx = contexts_for(6) if cpu.uses_context else None
    y = gpu(x.cuda(), context=None if ctx is None else ctx.cuda())
    assert y.device.type == "cuda"
    torch.testing.assert_close(y.cpu(), cpu(x, context=ctx), rtol=1e-4, atol=1e-4)
    gpu.train()
    with torch.autocast("cuda", dtype=torch.float16):
        out = call(gpu, x.cuda() * 3)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(1, 4), (2, 4), (3, 4, 1, 1)])
@pytest.mark.parametrize("training", [True, False])
def test_groupnorm_one_value_per_group_is_refused_with_a_message(shape, training):
    gn = cbnorm.build_norm("gn", 4, num_groups=4).train(training)
    with pytest.raises(ValueError, match="one value per group"):
        gn(torch.randn(*shape))
    assert cbnorm.build_norm("gn", 4, num_groups=2).train(training)(torch.randn(*shape)).shape == shape

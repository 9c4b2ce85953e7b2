"""No host synchronisation in any layer's forward/backward, every layer compiled whole, deferred checks.

* every layer (and the variants with other code paths) compiles with ``torch.compile(fullgraph=True)`` in train
  and eval, with the eager numbers (output, input gradient, buffers), and does not recompile over 10 steps of
  one shape (dynamo's "eager"/"aot_eager" backends, which trace what inductor would get, in seconds; one
  inductor case in tests/test_fast_paths.py);
* on CPU, a dispatch-level detector of host reads (``aten._local_scalar_dense``, behind ``.item()``, ``bool()``,
  ``int()``; ops whose output size depends on values) sees none in a train step, its backward and eval with
  ``validate="deferred"`` (what every layer does on an accelerator by default);
* deferred checks keep what the immediate ones protect: a non-finite training batch leaves every buffer
  unchanged and out-of-range ids change no state (their samples get NaN output); ``check_deferred`` then raises
  the same ValueError the immediate check raises, naming the layer;
* on CUDA (``@pytest.mark.cuda``, skipped without one): the same steps under
  ``torch.cuda.set_sync_debug_mode("error")``.
"""
import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import cbnorm
from cbnorm import gmm
from cbnorm.norms import check_deferred
from conftest import CUDA, LAYER_KWARGS, contexts_for, make_layer, randomize, warm_up

#: (registry name, extra keywords): every layer, and the variants that take other code paths
CASES = [(name, {}) for name in LAYER_KWARGS] + [
    ("mn", {"posterior": "channel"}), ("mn", {"fit_fraction": 0.5}), ("mn", {"warm_start": True}),
    ("acn", {"update": "moving_average"}), ("acn", {"posterior": "channel"}), ("cn", {"posterior": "joint"}),
    ("bn", {"channel_last": True}), ("bn", {"momentum": None}), ("cn", {"momentum": None})]
IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in CASES]


def build(name, kw, seed=0):
    torch.manual_seed(seed)
    return randomize(make_layer(name, 4, **kw), seed=seed)


def batch(layer, seed, n=12, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 5, 4) if layer.channel_last else (n, 4, 3, 3)
    x = torch.randn(*shape, generator=g, dtype=dtype) * 2 + 1
    return x, (contexts_for(n) if layer.uses_context else None)


def trained(layer, steps=2, dtype=torch.float32):
    """A few training steps (any layout) so running statistics / queues are filled; returns the layer."""
    layer.train()
    for i in range(steps):
        layer(*batch(layer, seed=50 + i, dtype=dtype))
    return layer


def step(layer, x, ctx, seed):
    """One call and, in train mode, a backward of a fixed random projection: (y, dx)."""
    x = x.clone().requires_grad_(layer.training)
    torch.manual_seed(seed)  # the same draws (k-means++, subsamples) in eager and compiled calls
    y = layer(x, context=ctx)
    if not layer.training:
        return y.detach(), None
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (y * w).sum().backward()
    return y.detach(), x.grad


def assert_same_state(a, b, rtol=1e-5, atol=1e-6):
    for (name, ba), bb in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(ba, bb, rtol=rtol, atol=atol, msg=lambda m: f"buffer {name}: {m}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_fullgraph_compile_gives_the_eager_numbers_without_recompiling(name, kw, train):
    """fullgraph=True (any graph break or data-dependent guard is an error), 10 steps of one shape with new data
    each: the eager output, input gradient and buffers at every step (float64, so that the formulations
    torch.compile picks, which round differently, are checked tightly), and one compiled frame."""
    torch._dynamo.reset()
    eager = trained(build(name, kw).double(), dtype=torch.float64).train(train)
    traced = copy.deepcopy(eager)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager" if train else "eager")
    compiled = torch.compile(traced, fullgraph=True, backend=counter)
    for i in range(10):
        x, ctx = batch(eager, seed=100 + i, dtype=torch.float64)
        ye, ge = step(eager, x, ctx, seed=i)
        yc, gc = step(compiled, x, ctx, seed=i)
        torch.testing.assert_close(yc, ye, rtol=1e-9, atol=1e-9)
        if train:
            torch.testing.assert_close(gc, ge, rtol=1e-8, atol=1e-9)
        assert_same_state(traced, eager, rtol=1e-9, atol=1e-10)
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for one shape"
    assert int(traced.deferred_errors.sum()) == 0


@pytest.mark.parametrize("kw", [{"warm_start": True}, {"init": "data"}], ids=["mn-warm", "acn-data"])
def test_one_off_first_steps_recompile_once(kw):
    name = "mn" if "warm_start" in kw else "acn"
    torch._dynamo.reset()
    layer = build(name, kw).train()
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    for i in range(10):
        compiled(batch(layer, seed=i)[0])
    assert counter.frame_count == 2


# ------------------------------------------------------------------------------------ host-read detector
#: ops that read a value back to the host, or whose output size depends on values (a sync on CUDA)
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
              "item", "equal", "is_nonzero"}


class HostReads(TorchDispatchMode):
    """Records every op that would synchronise with an accelerator: a value read back to the host or a
    value-dependent output size (boolean-mask indexing included)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in HOST_READS or (name == "repeat_interleave" and "output_size" not in (kwargs or {})) or (
                name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                        for i in (args[1] if len(args) > 1 else []) if i is not None)):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_no_host_read_in_train_backward_and_eval(name, kw):
    layer = trained(build(name, kw))
    layer.validate = "deferred"
    x, ctx = batch(layer, seed=1)
    x.requires_grad_()
    with HostReads() as mode:
        y = layer(x, context=ctx)
        y.square().sum().backward()
        layer.eval()
        layer(x.detach(), context=ctx)
        if layer.uses_context:
            layer(x.detach())  # CN+ inference over all contexts
    assert mode.seen == [], f"{name}: host reads {mode.seen}"
    assert torch.isfinite(x.grad).all()


def test_the_detector_sees_the_immediate_checks():
    """The detector is not blind: the immediate checks (validate="now") read the statistics and the ids."""
    for name in ("bn", "cn"):
        layer = make_layer(name, 4, validate="now")
        x, ctx = batch(layer, seed=2)
        with HostReads() as mode:
            layer(x, context=ctx)
        assert any("_local_scalar_dense" in op for op in mode.seen), name


# ----------------------------------------------------------------------------------- deferred checks
#: layers whose training step updates running statistics or a queue
STATEFUL = [("bn", {}), ("bn", {"momentum": None}), ("mn", {}), ("mn", {"posterior": "channel"}),
            ("mn", {"warm_start": True}), ("mode", {}), ("cn", {}), ("acn", {"update": "moving_average"})]


@pytest.mark.parametrize("bad", ["nan", "inf", "huge"])
@pytest.mark.parametrize("name,kw", STATEFUL, ids=[n + "".join(f"-{k}={v}" for k, v in kw.items()) for n, kw in STATEFUL])
def test_deferred_nonfinite_batch_changes_nothing_and_raises_at_the_check(name, kw, bad):
    layer = warm_up(make_layer(name, 4, validate="deferred", **kw))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x, ctx = batch(layer, seed=3)
    if bad == "huge":
        x = x * 1e20
    else:
        x.view(-1)[5] = float(bad)
    layer(x, context=ctx)  # no host read: nothing raised here
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match=rf"{type(layer).__name__}: 1 training minibatch since the last check gave "
                                         r"non-finite statistics"):
        check_deferred(layer)
    check_deferred(layer)  # reported once
    layer(batch(layer, seed=4)[0], context=ctx)  # the next good batch trains normally
    assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"]) + 1
    check_deferred(layer)


@pytest.mark.parametrize("name", ["cn", "cnx", "cn-embed"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_deferred_context_ids_give_nan_change_nothing_and_raise_at_the_check(name, train):
    layer = warm_up(make_layer(name, 4, validate="deferred")).train(train)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x, _ = batch(layer, seed=5, n=6)
    ids = torch.tensor([0, 1, 2, 7, 0, -1])
    y = layer(x, context=ids)
    bad = torch.tensor([False, False, False, True, False, True])
    assert torch.isnan(y[bad]).all() and torch.isfinite(y[~bad]).all()
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match=r"context ids must be in \[0, 2\] \(num_contexts=3\), got min -1 and max 7"):
        check_deferred(layer)
    check_deferred(layer)


def test_check_deferred_names_the_layer_in_a_model():
    from cbnorm.models import ShallowCNN

    model = ShallowCNN(1, 10, width=0.25, norm="bn", norm_kwargs={"validate": "deferred"})
    x = torch.randn(4, 1, 28, 28)
    model(x)
    check_deferred(model)
    x[1, 0, 3, 3] = float("nan")
    model(x)
    with pytest.raises(ValueError, match=r"BatchNorm: 1 training minibatch .*non-finite statistics.*layer '[^']+'"):
        check_deferred(model)
    check_deferred(model)


def test_compiled_layer_on_cpu_defers_and_the_check_raises():
    """validate="auto" reads on the host in eager CPU calls (the hostile tests) and defers while compiling."""
    torch._dynamo.reset()
    layer = warm_up(make_layer("bn", 4))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x, _ = batch(layer, seed=6)
    x[0, 0, 0, 0] = float("nan")
    compiled(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="BatchNorm: .*non-finite statistics"):
        layer.check_deferred()
    with pytest.raises(ValueError, match="BatchNorm: this minibatch gives non-finite statistics"):
        layer(x)  # eager on CPU: at once


def test_validate_is_checked_and_only_where_there_is_something_to_check():
    with pytest.raises(ValueError, match="validate must be one of"):
        make_layer("bn", 4, validate="later")
    for name in LAYER_KWARGS:
        takes = "validate" in cbnorm.norms.accepted_kwargs(type(make_layer(name, 4)))
        assert takes == (name not in ("ln", "gn")), name


# ------------------------------------------------------------------------------------------ warm start
def drifting_batches(steps, n=64, p=4, c=3, seed=0, sd=1.5):
    """Minibatches (N, C, P) from a 3-mode mixture whose modes overlap (sd 1.5 at 4-5 apart: EM has work to do)
    and drift a little each step."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-4.0, 0.0, 2.0], [0.0, 3.0, -2.0], [4.0, -3.0, 0.0]])[:, :c]
    for t in range(steps):
        mode = torch.randint(0, 3, (n, p), generator=g)
        pts = centres[mode] + 0.05 * t + torch.randn(n, p, c, generator=g) * sd
        yield pts.permute(0, 2, 1).contiguous()


def fit_log_likelihood(layer, x3):
    pts = x3.transpose(1, 2).reshape(-1, x3.shape[1])[None]
    w, m, v = (getattr(layer, f"queue_fit_{n}")[(int(layer.queue_ptr) - 1) % layer.queue_size]
               for n in ("weights", "means", "vars"))
    return float(gmm.mean_log_likelihood(gmm.GMM(w[None], m[None], v[None]), pts))


def test_warm_started_em_is_as_good_a_fit_as_seeding_every_step():
    """MN warm_start=True against the default (k-means++ every step) on a stream of drifting minibatches of
    overlapping modes: the mean log-likelihood of its fits is at least the default's minus 0.02 nats/point
    (measured: -6.496 against -6.504, EM continues from a good fit), and its train outputs differ from the
    default's no more than the default's differ between two random seeds (median relative difference,
    measured 0.036 against 0.064)."""
    torch.manual_seed(0)
    seeded, other, warm = make_layer("mn", 3), make_layer("mn", 3), make_layer("mn", 3, warm_start=True)
    ll_s, ll_w, d_seed, d_warm = [], [], [], []
    for x3 in drifting_batches(40):
        x = x3.reshape(*x3.shape[:2], 2, 2)
        ys, yo, yw = seeded(x).detach(), other(x).detach(), warm(x).detach()
        ll_s.append(fit_log_likelihood(seeded, x3)), ll_w.append(fit_log_likelihood(warm, x3))
        d_seed.append(float((ys - yo).norm() / ys.norm())), d_warm.append(float((ys - yw).norm() / ys.norm()))
    mean_s, mean_w = sum(ll_s[5:]) / 35, sum(ll_w[5:]) / 35
    assert mean_w >= mean_s - 0.02, (mean_w, mean_s)
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    assert median(d_warm) <= 1.5 * median(d_seed), (median(d_warm), median(d_seed))


def test_warm_start_restarts_a_dead_component():
    x = torch.cat([torch.randn(200, 2) - 5, torch.randn(200, 2) + 5, torch.randn(200, 2) * 0.5])[None]
    init = gmm.GMM(torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[[-5.0, -5], [5, 5], [50, 50]]]),
                   torch.ones(1, 3, 2))
    fitted = gmm.fit(x, 3, iters=10, init=init, generator=torch.Generator().manual_seed(0))
    assert (fitted.weights > 0.1).all()
    fresh = gmm.fit(x, 3, iters=10, generator=torch.Generator().manual_seed(0))
    assert float(gmm.mean_log_likelihood(fitted, x)) >= float(gmm.mean_log_likelihood(fresh, x)) - 0.05


def test_warm_start_seeds_again_after_a_reset_and_after_loading_an_empty_queue():
    layer = warm_up(make_layer("mn", 4, warm_start=True))
    assert layer._warm_ready
    layer.reset_running_stats()
    assert not layer._warm_ready
    other = warm_up(make_layer("mn", 4, warm_start=True))
    other.load_state_dict(make_layer("mn", 4).state_dict())
    assert not other._warm_ready
    other.load_state_dict(layer.state_dict() | {"queue_count": torch.tensor(3)})
    assert other._warm_ready


def test_posteriors_from_the_fit_equal_a_fresh_pass():
    """MN's default takes the posteriors from one more E-step on the fit's [x^2; x; 1]; the fresh pass over x
    gives the same train step (float64: to 1e-10; float32: to 1e-5)."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        a = randomize(make_layer("mn", 4)).to(dtype)
        b = copy.deepcopy(a)
        b.posteriors_from_fit = False
        x = torch.randn(12, 4, 3, 3, dtype=dtype) * 3 + 2
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(0)
        ya = a(xa)
        torch.manual_seed(0)
        yb = b(xb)
        torch.testing.assert_close(ya, yb, rtol=tol, atol=tol)
        ya.square().sum().backward(), yb.square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=10 * tol, atol=10 * tol)
        assert_same_state(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_cuda_train_backward_eval_never_synchronise(name, kw):
    layer = trained(build(name, kw)).cuda()
    x, ctx = batch(layer, seed=7)
    x = x.cuda().requires_grad_()
    ctx = None if ctx is None else ctx.cuda()
    layer(x, context=ctx).sum().backward()  # warm-up: lazy CUDA initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer.train()
        layer(x, context=ctx).square().sum().backward()
        layer.eval()
        y = layer(x, context=ctx)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(y).all()
    check_deferred(layer)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_defers_by_default_and_the_check_raises():
    layer = warm_up(make_layer("bn", 4)).cuda()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(8, 4, 3, 3, device="cuda")
    x[0, 0, 0, 0] = float("nan")
    layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="BatchNorm: .*non-finite statistics"):
        check_deferred(layer)
    cn = make_layer("cn", 4).cuda()
    cn(torch.randn(6, 4, 2, 2, device="cuda"), context=torch.tensor([0, 1, 2, 3, 0, 1], device="cuda"))
    with pytest.raises(ValueError, match=r"context ids must be in \[0, 2\]"):
        check_deferred(cn)


@pytest.mark.parametrize("name", ["cn", "cnx", "cn-embed"])
def test_context_model_with_routed_ids_compiles_whole(name):
    """``ContextModel`` routes ids through a ContextVar in eager, which dynamo cannot trace; while compiling it
    routes them as a plain attribute: the wrapped model compiles with fullgraph=True, gives the eager numbers
    in train and eval, and the attribute is cleared after each call."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), make_layer(name, 4), nn.ReLU())
    model = cbnorm.ContextModel(inner)
    twin = copy.deepcopy(model)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    g = torch.Generator().manual_seed(1)
    for train in (True, False):
        model.train(train), twin.train(train)
        for _ in range(2):
            x = torch.randn(12, 3, 6, 6, generator=g)
            ctx = contexts_for(12)
            torch.testing.assert_close(compiled(x, context=ctx), twin(x, context=ctx), atol=1e-5, rtol=1e-5)
            assert inner[1]._compiled_route is None
    # one graph per mode, no break (CN-X's init="data" fits on the first step: one recompile after it)
    assert counter.frame_count == 2 + (name == "cnx")
    for (k, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{k}: {m}")

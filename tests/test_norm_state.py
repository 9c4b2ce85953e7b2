"""State of the layers: the running-statistics base (one EMA step, resets, versioned loading), MN's queue
(train/eval consistency, eq. 34-38 in numpy), CN's per-context counts, ModeNorm's unbiased variance, and
the migration of files written before these changes (the committed checkpoints included)."""
from pathlib import Path

import numpy as np
import pytest
import torch

import cbnorm
from cbnorm import runs
from cbnorm.norms import RunningStatsNorm
from conftest import LAYER_KWARGS, make_layer, randomize, warm_up

NAMES = list(LAYER_KWARGS)
ROOT = Path(__file__).resolve().parents[1]
#: every constructor variant with its own state (posterior, update)
VARIANTS = [(n, {}) for n in NAMES] + [("mn", {"posterior": "channel"}), ("acn", {"update": "moving_average"}),
                                       ("acn", {"init": "data"}),
                                       ("acn", {"update": "moving_average", "init": "data"})]
VARIANT_IDS = [f"{n}-{'-'.join(map(str, kw.values()))}" if kw else n for n, kw in VARIANTS]


def npoints(x):
    """(N, C, *S) -> (N*P, C) float64 points, sample-major (numpy, independent of the library)."""
    x = x.detach().double().numpy()
    return np.concatenate([x[n].reshape(x.shape[1], -1).T for n in range(x.shape[0])])


def gauss_logpdf(v, mean, var):
    return -0.5 * np.sum((v - mean) ** 2 / var + np.log(2 * np.pi * var))


def as_points(y):
    return y.detach().reshape(y.shape[0], y.shape[1], -1).transpose(1, 2).reshape(-1, y.shape[1])


# ==================================================================================== the base
@pytest.mark.parametrize("name,kw", VARIANTS, ids=VARIANT_IDS)
def test_reset_parameters_and_running_stats_restore_a_fresh_layer(name, kw):
    """After training and random parameters, reset_parameters() gives exactly a freshly built layer (the same
    random draws, in the same order, for gates, embedders and ACN's random means); reset_running_stats()
    restores the buffers and leaves the parameters alone."""
    torch.manual_seed(1)
    fresh = make_layer(name, 4, **kw)
    layer = randomize(warm_up(make_layer(name, 4, **kw)), seed=5)
    trained = {k: v.clone() for k, v in layer.state_dict().items()}
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in trained.items())
    if isinstance(layer, RunningStatsNorm):
        torch.manual_seed(1)
        layer.reset_running_stats()
        running = set(dict(layer.named_buffers())) - ({"data_initialized"} if getattr(layer, "init", None) == "data"
                                                         and layer.update == "weight" else set())
        for k, v in layer.state_dict().items():  # (ACN update="weight": data_initialized goes with parameters)
            assert torch.equal(v, fresh.state_dict()[k] if k in running else trained[k]), k
    else:
        assert not hasattr(layer, "reset_running_stats") and not hasattr(layer, "num_batches_tracked")
    torch.manual_seed(1)
    layer.reset_parameters()
    for k, v in fresh.state_dict().items():
        assert torch.equal(layer.state_dict()[k], v), k
    x = torch.randn(12, 4, 3, 3)
    ctx = torch.arange(12) % 3 if layer.uses_context else None
    torch.manual_seed(2)
    y = layer(x, context=ctx)  # and it trains like the fresh one (ACN init="data" refits)
    torch.manual_seed(2)
    torch.testing.assert_close(y, fresh(x, context=ctx))


def test_one_running_average_step_for_every_layer():
    """momentum=None is the cumulative average with a tensor count (no .item()); momentum=m the EMA."""
    x = [torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(4)]
    for momentum in (None, 0.3):
        layer = make_layer("bn", 3, momentum=momentum).double()
        ref = np.zeros(3)
        for i, xi in enumerate(x):
            layer(xi)
            mean = npoints(xi).mean(0)
            ref = ref + (mean - ref) / (i + 1) if momentum is None else (1 - momentum) * ref + momentum * mean
        np.testing.assert_allclose(layer.running_mean.numpy(), ref, rtol=1e-12, atol=1e-12)
        assert int(layer.num_batches_tracked) == 4


def version1_state(layer):
    """A state dict as version 1 of the layers wrote it (no _version: torch's default 1)."""
    state = layer.state_dict()
    state._metadata[""]["version"] = 1
    return state


@pytest.mark.parametrize("name", ["ln", "gn", "cnx", "cn-embed"])
def test_version1_state_of_layers_without_running_stats_loads(name):
    """Version 1 gave every layer a num_batches_tracked: dropped on load (strict), as by cbnorm.runs."""
    src = randomize(make_layer(name, 4))
    state = version1_state(src)
    state["num_batches_tracked"] = torch.tensor(7)
    dst = make_layer(name, 4)
    dst.load_state_dict(state)  # strict
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    current = src.state_dict()
    current["num_batches_tracked"] = torch.tensor(7)  # a current-version file with it is refused
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        dst.load_state_dict(current)
    tensors = runs._with_legacy_buffers(torch.nn.Sequential(dst), {"0." + k: v for k, v in state.items()})
    assert "0.num_batches_tracked" not in tensors


def test_version1_acn_state_without_data_initialized_loads_as_initialised():
    src = make_layer("acn", 3, num_components=2, init="data")
    src(torch.randn(8, 3, 2, 2) - 10)
    state = version1_state(src)
    del state["data_initialized"]
    dst = make_layer("acn", 3, num_components=2, init="data")
    dst.load_state_dict(state)
    assert int(dst.data_initialized) == 1


# ============================================================================ MN: queue reading
def bimodal(n=32, c=4, hw=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64)
    x[: n // 2] = x[: n // 2] * 0.7 - 2.0
    x[n // 2:] = x[n // 2:] * 1.3 + 1.5
    return x


def mn_train_numpy(pts, w, m, v, gain, bias, eps=1e-5):
    """MN training transform from the paper, given the GMM fit (w (K,), m (K, C), v (K, C)): eq. 31 posteriors,
    eq. 35-36 moments, eq. 34 output (M, C). Returns (output, lambda, mu, sigma^2)."""
    k = len(w)
    logp = np.array([[np.log(w[j]) + gauss_logpdf(p, m[j], v[j]) for j in range(k)] for p in pts])
    nu = np.exp(logp - logp.max(1, keepdims=True))
    nu /= nu.sum(1, keepdims=True)
    lam = nu.mean(0)
    nu_hat = nu / nu.sum(0)
    mu = np.stack([nu_hat[:, j] @ pts for j in range(k)])
    var = np.stack([nu_hat[:, j] @ (pts - mu[j]) ** 2 for j in range(k)])
    out = sum(nu[:, j:j + 1] / np.sqrt(lam[j]) * (pts - mu[j]) / np.sqrt(var[j] + eps) for j in range(k))
    return gain * out + bias, lam, mu, var


def mn_eval_numpy(pts, fits, moments, tau, gain, bias, eps=1e-5):
    """eq. 38 (our reading): posteriors over all (t, k) from the fits with weights tau^t w_k^t; component (t, k)
    normalized with the moments of step t, scaled by 1 / sqrt(lambda_k^t)."""
    terms = []
    for t, ((w, m, v), (lam, mu, var)) in enumerate(zip(fits, moments)):
        for j in range(len(w)):
            logp = np.log(tau[t] * w[j]) - 0.5 * (((pts - m[j]) ** 2 / v[j]) + np.log(2 * np.pi * v[j])).sum(1)
            terms.append((logp, (pts - mu[j]) / np.sqrt(var[j] + eps) / np.sqrt(lam[j])))
    logp = np.stack([t[0] for t in terms], 1)
    post = np.exp(logp - logp.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    return gain * sum(post[:, i:i + 1] * t[1] for i, t in enumerate(terms)) + bias


@pytest.mark.parametrize("posterior", ["joint", "channel"])
def test_mn_eval_with_T_copies_of_one_step_reproduces_that_training_step(posterior):
    """Train on batch B T times with one seed (T identical fits in the queue), then eval on B: the training
    output to 1e-10 in float64. (Before the queue stored the fits, the posteriors of eval came from the
    moments plus eps: max |diff| 0.51 here.)"""
    layer = randomize(make_layer("mn", 4, num_components=3, queue_size=5, posterior=posterior)).double()
    x = bimodal()
    for _ in range(5):
        torch.manual_seed(0)
        y = layer(x).detach()
    assert int(layer.queue_count) == 5
    for name in ("weights", "means", "vars"):  # the T steps are identical
        q = getattr(layer, f"queue_fit_{name}")
        torch.testing.assert_close(q, q[:1].expand_as(q), rtol=0, atol=0)
    layer.eval()
    torch.testing.assert_close(layer(x).detach(), y, rtol=1e-10, atol=1e-10)


def test_mn_train_and_eval_equal_the_paper_in_numpy_given_the_fit():
    """The reverse check: from the fit the layer stored, numpy eq. 31 + 34-36 gives the training output and
    the stored moments; numpy eq. 38 over T copies gives the eval output; and with T different steps in the
    queue numpy eq. 38 gives the eval output too."""
    layer = randomize(make_layer("mn", 4, num_components=3, queue_size=5)).double()
    x = bimodal()
    gain, bias = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    torch.manual_seed(0)
    y = layer(x)
    pts = npoints(x)
    fit = tuple(getattr(layer, f"queue_fit_{n}")[0].numpy() for n in ("weights", "means", "vars"))
    out, lam, mu, var = mn_train_numpy(pts, *fit, gain, bias)
    np.testing.assert_allclose(as_points(y).numpy(), out, rtol=1e-10, atol=1e-10)
    for name, ref in (("weights", lam), ("means", mu), ("vars", var)):
        np.testing.assert_allclose(getattr(layer, f"queue_{name}")[0].numpy(), ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # T copies of that step
        for b in layer.buffers():
            if b.dim() >= 2 and b.shape[0] == 5:
                b.copy_(b[:1].expand_as(b))
        layer.queue_count.fill_(5)
    layer.eval()
    tau = np.full(5, 0.2)  # any tau summing to 1 gives the training transform back
    ye = mn_eval_numpy(pts, [fit] * 5, [(lam, mu, var)] * 5, tau, gain, bias)
    np.testing.assert_allclose(ye, out, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(as_points(layer(x)).numpy(), ye, rtol=1e-10, atol=1e-10)
    # five different steps, oldest first from queue_ptr
    layer.train()
    for seed in range(1, 6):
        torch.manual_seed(seed)
        layer(bimodal(seed=seed))
    layer.eval()
    q = {n: b.numpy() for n, b in layer.named_buffers()}
    order = [(int(layer.queue_ptr) + t) % 5 for t in range(5)]
    tau = np.array([0.1 / (1 - 0.9 ** 5) * 0.9 ** (5 - t - 1) for t in range(5)])  # eq. 39, zeta = 0.9
    fits = [tuple(q[f"queue_fit_{n}"][s] for n in ("weights", "means", "vars")) for s in order]
    moments = [tuple(q[f"queue_{n}"][s] for n in ("weights", "means", "vars")) for s in order]
    np.testing.assert_allclose(as_points(layer(x)).numpy(), mn_eval_numpy(pts, fits, moments, tau, gain, bias),
                               rtol=1e-9, atol=1e-9)


def test_mn_mixture_parameters_are_the_posterior_mixture():
    layer = warm_up(make_layer("mn", 4, num_components=3, queue_size=4), steps=2)
    w, mu, var = layer.mixture_parameters()
    assert w.shape == (6,)  # two filled slots of K = 3
    lam = layer.queue_fit_weights[[0, 1]].reshape(-1)
    torch.testing.assert_close(w, (torch.tensor([0.09 / 0.19, 0.1 / 0.19])[:, None] * lam.view(2, 3)).reshape(-1))
    torch.testing.assert_close(mu, layer.queue_fit_means[[0, 1]].reshape(6, 4))
    torch.testing.assert_close(var, layer.queue_fit_vars[[0, 1]].reshape(6, 4))


def version1_mn_state(layer):
    state = version1_state(layer)
    for name in ("weights", "means", "vars"):
        del state[f"queue_fit_{name}"]
    return state


def old_mn_eval_numpy(pts, layer, gain, bias, eps=1e-5):
    """Version 1's eval, written out: posteriors and transform both from the queued moments, variances + eps
    in the posteriors."""
    t = layer.queue_size
    q = {n: b.double().numpy() for n, b in layer.named_buffers()}
    order = [(int(layer.queue_ptr) + s) % t for s in range(t)][-min(int(layer.queue_count), t):]
    zeta = layer.zeta
    tau = np.array([zeta ** (len(order) - i - 1) for i in range(len(order))])
    tau /= tau.sum()
    moments = [tuple(q[f"queue_{n}"][s] for n in ("weights", "means", "vars")) for s in order]
    fits = [(lam, mu, var + eps) for lam, mu, var in moments]
    return mn_eval_numpy(pts, fits, moments, tau, gain, bias, eps)


def test_mn_version1_state_loads_with_the_old_eval_transform():
    src = randomize(warm_up(make_layer("mn", 3, num_components=2, queue_size=3), c=3, steps=4)).double()
    dst = make_layer("mn", 3, num_components=2, queue_size=3).double()
    dst.load_state_dict(version1_mn_state(src))
    torch.testing.assert_close(dst.queue_fit_weights, src.queue_weights)
    torch.testing.assert_close(dst.queue_fit_vars, src.queue_vars + 1e-5)
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    ref = old_mn_eval_numpy(npoints(x), src, src.weight.detach().numpy(), src.bias.detach().numpy())
    np.testing.assert_allclose(as_points(dst.eval()(x)).numpy(), ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="queue_fit_vars"):  # a current-version file must have them
        state = src.state_dict()
        del state["queue_fit_vars"]
        dst.load_state_dict(state)


def test_committed_mn_checkpoint_loads_and_evaluates_as_before(tmp_path):
    """A run file that holds only the queued moments (version 1; the committed fmnist-mn, retrained with the
    fits queued, with its queue_fit_* tensors removed): load_run fills the fits, and conv3's eval output is the
    old transform written out in numpy."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(ROOT / "checkpoints" / "fmnist-mn", tmp_path / "mn", ignore=shutil.ignore_patterns("snapshots"))
    tensors, meta = runs.read_safetensors(tmp_path / "mn" / "model.safetensors")
    assert any(".queue_fit_" in k for k in tensors)  # the committed run is of the current version
    save_file({k: v.contiguous() for k, v in tensors.items() if ".queue_fit_" not in k},
              str(tmp_path / "mn" / "model.safetensors"), metadata=meta)
    run = runs.load_run(tmp_path / "mn")
    layer = dict(run.model.named_modules())["blocks.conv3.norm"]
    assert isinstance(layer, cbnorm.MixtureNorm) and int(layer.queue_count) > 0
    torch.testing.assert_close(layer.queue_fit_vars, layer.queue_vars + layer.eps)
    seen = {}
    handle = layer.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), y=o.detach()))
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    with torch.no_grad():
        logits = run.logits(images)
    handle.remove()
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    pts = npoints(seen["x"][:1])  # one image: 49 points x 32 channels x 30 components
    ref = old_mn_eval_numpy(pts, layer, layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy())
    np.testing.assert_allclose(as_points(seen["y"][:1]).double().numpy(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("run_dir", sorted(p.name for p in (ROOT / "checkpoints").iterdir()
                                           if (p / "config.json").exists()))
def test_every_committed_checkpoint_loads(run_dir):
    """Files written before the running-statistics base: num_batches_tracked of ln/gn/cnx/cn-embed is
    dropped, CN gets per-context counts, MN its queued fits."""
    run = runs.load_run(ROOT / "checkpoints" / run_dir)
    for name, module in run.model.named_modules():
        if isinstance(module, cbnorm.ContextNorm):
            assert (module.running_batches_tracked == module.num_batches_tracked).all(), name
        if isinstance(module, (cbnorm.LayerNorm, cbnorm.GroupNorm, cbnorm.ContextNormX, cbnorm.ContextNormEmbed)):
            assert "num_batches_tracked" not in dict(module.named_buffers()), name


# ============================================================================= CN: per-context counts
def test_cn_cumulative_average_counts_batches_per_context():
    """momentum=None, context 1 absent from half the batches: each context's running mean / variance is the
    plain average of its own batch statistics over the batches it was in (a global count mixed the absent
    batches' initial values in: max |diff| 0.36 before)."""
    layer = make_layer("cn", 3, num_contexts=2, momentum=None).double()
    g = torch.Generator().manual_seed(0)
    means, vars_ = {0: [], 1: []}, {0: [], 1: []}
    for b in range(8):
        ctx = torch.tensor([0, 0, 0, 1, 1, 1] if b % 2 == 0 else [0, 0, 0, 0, 0, 0])
        x = torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64) * 2 + 3 * ctx.view(-1, 1, 1, 1)
        layer(x, context=ctx)
        for k in (0, 1):
            if (ctx == k).any():
                pts = npoints(x[ctx == k])
                means[k].append(pts.mean(0))
                vars_[k].append(pts.var(0, ddof=1))
    assert layer.running_batches_tracked.tolist() == [8, 4] and int(layer.num_batches_tracked) == 8
    for k in (0, 1):
        np.testing.assert_allclose(layer.running_mean[k].numpy(), np.mean(means[k], 0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer.running_var[k].numpy(), np.mean(vars_[k], 0), rtol=1e-10, atol=1e-12)


def test_cn_version1_state_gets_the_global_count_per_context():
    src = warm_up(make_layer("cn", 3, num_contexts=3, momentum=None), c=3, steps=3)
    state = version1_state(src)
    del state["running_batches_tracked"]
    dst = make_layer("cn", 3, num_contexts=3, momentum=None)
    dst.load_state_dict(state)
    assert dst.running_batches_tracked.tolist() == [3, 3, 3]
    tensors = runs._with_legacy_buffers(torch.nn.Sequential(dst), {"0." + k: v for k, v in state.items()})
    assert tensors["0.running_batches_tracked"].tolist() == [3, 3, 3]


# ============================================================================ ModeNorm: unbiased variance
def test_mode_running_statistics_equal_reliability_weighted_numpy():
    """One step with momentum=1: running mean = gate-weighted mean, running variance = the unbiased weighted
    variance with reliability weights, sum w (x - mu)^2 / (V1 - V2 / V1), w_np = g_nk over every (n, p)."""
    torch.manual_seed(0)
    layer = randomize(make_layer("mode", 3, num_components=2, momentum=1.0)).double()
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64) * 2 + 1
    layer(x)
    pts = x.detach().numpy().reshape(6, 3, -1)
    z = pts.mean(2) @ layer.gate.weight.detach().numpy().T + layer.gate.bias.detach().numpy()
    gates = np.exp(z - z.max(1, keepdims=True))
    gates /= gates.sum(1, keepdims=True)
    for k in range(2):
        w = np.repeat(gates[:, k], 4)  # weight of each (n, p) point, sample-major
        v = pts.transpose(0, 2, 1).reshape(-1, 3)
        v1, v2 = w.sum(), (w ** 2).sum()
        mu = (w[:, None] * v).sum(0) / v1
        var = (w[:, None] * (v - mu) ** 2).sum(0) / (v1 - v2 / v1)
        np.testing.assert_allclose(layer.running_mean[k].numpy(), mu, rtol=1e-12)
        np.testing.assert_allclose(layer.running_var[k].numpy(), var, rtol=1e-12)
    # unit gates (K = 1): BatchNorm's m / (m - 1)
    one = make_layer("mode", 3, num_components=1, momentum=1.0).double()
    one(x)
    np.testing.assert_allclose(one.running_var[0].numpy(), npoints(x).var(0, ddof=1), rtol=1e-12)


def test_mode_rare_mode_keeps_its_variance():
    """Gate bias [0, -7] on N(0, 1) data: mode 1 has gate mass N_k ~ 0.23 per batch. Its running variance is
    ~1 (it was 0.22 here, 0.01 in long runs, with the frequency correction N_k / max(N_k - 1, 1))."""
    layer = make_layer("mode", 3, num_components=2, momentum=None, affine=False).double()
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.bias.copy_(torch.tensor([0.0, -7.0]))
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(5)]
    for x in xs:
        layer(x)
    ref = np.mean([npoints(x).var(0, ddof=1) for x in xs], 0)  # equal gates: the plain unbiased variance
    np.testing.assert_allclose(layer.running_var[0].numpy(), ref, rtol=1e-10)
    np.testing.assert_allclose(layer.running_var[1].numpy(), ref, rtol=1e-6)
    np.testing.assert_allclose(layer.running_var.numpy(), 1.0, atol=0.1)

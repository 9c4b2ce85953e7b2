"""The small analysis helpers the app relies on (appended to cbnorm.analysis)."""
import numpy as np
import pytest
import torch

import cbnorm
from cbnorm import analysis


def test_steps_to_reach_first_step_at_or_above_target():
    steps, accs = [100, 200, 300, 400], [0.5, 0.7, 0.69, 0.8]
    assert analysis.steps_to_reach(steps, accs, 0.7) == 200
    assert analysis.steps_to_reach(steps, accs, 0.5) == 100
    assert analysis.steps_to_reach(steps, accs, 0.81) is None
    # unordered curves are read by step; exactly equal counts as reached
    assert analysis.steps_to_reach([300, 100, 200], [0.9, 0.1, 0.9], 0.9) == 200
    with pytest.raises(ValueError, match="same length"):
        analysis.steps_to_reach([1, 2], [0.1], 0.5)


def test_smooth_is_a_trailing_mean():
    v = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(analysis.smooth(v, 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(analysis.smooth(v, 1), v)
    np.testing.assert_allclose(analysis.smooth(v, 10), np.cumsum(v) / np.arange(1, 5))
    with pytest.raises(ValueError):
        analysis.smooth(v, 0)


def test_sample_components_joint_channel_and_without_mixture():
    torch.manual_seed(0)
    acn = cbnorm.build_norm("acn", 3, num_components=2).eval()
    with torch.no_grad():
        acn.mean.copy_(torch.tensor([[-5.0, -5.0, -5.0], [5.0, 5.0, 5.0]]))
    x = torch.cat([torch.randn(4, 3, 2, 2) - 5, torch.randn(3, 3, 2, 2) + 5])
    comp = analysis.sample_components(acn, x)
    assert comp.tolist() == [0, 0, 0, 0, 1, 1, 1]
    acn_c = cbnorm.build_norm("acn", 3, num_components=2, posterior="channel").eval()
    with torch.no_grad():
        acn_c.mean.copy_(torch.tensor([[-5.0, -5.0, -5.0], [5.0, 5.0, 5.0]]))
    assert analysis.sample_components(acn_c, x).tolist() == [0, 0, 0, 0, 1, 1, 1]
    mode = cbnorm.build_norm("mode", 3, num_components=2).eval()
    assert analysis.sample_components(mode, x).shape == (7,)
    assert analysis.sample_components(cbnorm.build_norm("bn", 3).eval(), x) is None


def test_embed_step_tsne_warm_start_stays_aligned():
    rng = np.random.default_rng(0)
    centers = np.array([[8.0] * 5, [-8.0] * 5, [8.0, -8.0, 8.0, -8.0, 8.0]])
    lab = np.repeat(np.arange(3), 20)
    x = centers[lab] + rng.normal(size=(60, 5))
    first, info = analysis.embed_step(x, None, "tsne", perplexity=10, first_iters=200)
    assert first.shape == (60, 2) and first.dtype == np.float32 and info["iterations"] == 200
    second, _ = analysis.embed_step(x + 0.01 * rng.normal(size=x.shape), first, "tsne", perplexity=10,
                                    refine_iters=30)
    # a warm-started refinement of nearly the same data stays near the previous layout
    span = np.ptp(first, axis=0).max()
    assert np.abs(second - first).mean() < 0.2 * span
    with pytest.raises(ValueError, match="prev"):
        analysis.embed_step(x, first[:10], "tsne")
    with pytest.raises(ValueError, match="method"):
        analysis.embed_step(x, None, "pca")


def test_embed_snapshots_warm_pca_and_limits():
    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(30, 6)).astype(np.float32) for _ in range(3)]
    calls = []
    emb = analysis.embed_snapshots_warm(feats, "pca", callback=lambda i, n: calls.append((i, n)))
    assert len(emb.coords) == 3 and "explained_variance_pct" in emb.info and calls[-1] == (3, 3)
    (x0, x1), (y0, y1) = analysis.embedding_limits(emb.coords)
    allc = np.concatenate(emb.coords)
    assert x0 < allc[:, 0].min() and x1 > allc[:, 0].max() and y0 < allc[:, 1].min() and y1 > allc[:, 1].max()
    red = analysis.reduce_features(feats, dims=4)
    assert [r.shape for r in red] == [(30, 4)] * 3 and red[0].dtype == np.float64


def test_fit_reducer_matches_reduce_features():
    rng = np.random.default_rng(2)
    feats = [rng.normal(size=(40, 12)).astype(np.float32) for _ in range(3)]
    red = analysis.reduce_features(feats, dims=5)
    reducer = analysis.fit_reducer(feats[-1], dims=5)
    for f, r in zip(feats, red):
        np.testing.assert_allclose(reducer(f), r, rtol=1e-5, atol=1e-6)
    assert analysis.fit_reducer(feats[-1], dims=50)(feats[0]).shape == (40, 12)


# --------------------------------------------------------------------------- benchmark plots
def test_speed_ratio_figure_bars_per_shape_and_goals():
    from cbnorm.app import figures as F

    layers = [{"layer": n, "shape": list(sh), "K": k, "ratio_to_bn": r}
              for n, r0 in (("mn", 4.0), ("acn", 2.5)) for sh in ((256, 128, 8, 8), (64, 448, 4, 4))
              for k, r in ((3, r0 + sh[1] / 1000), (5, 99.0))]
    fig = F.speed_ratio_figure(layers, {"mn": 4, "acn": 3, "absent": 1})
    bars = [t for t in fig.data if t.type == "bar"]
    assert [t.name for t in bars] == ["N=256, C=128, 8x8", "N=64, C=448, 4x4"]
    assert list(bars[0].x) == ["mn", "acn"] and list(bars[0].y) == [4.128, 2.628]  # K=3 only
    goal = [t for t in fig.data if t.name == "goal"][0]
    assert list(goal.x) == ["mn", "acn"] and list(goal.y) == [4.0, 3.0]


def test_convergence_figure_is_the_mean_over_seeds_at_shared_steps():
    from cbnorm.app import figures as F

    runs = [{"norm": "bn", "seed": 0, "curve": [[10, 0.5], [20, 0.7]]},
            {"norm": "bn", "seed": 1, "curve": [[10, 0.6], [20, 0.8], [30, 0.9]]},
            {"norm": "mn", "seed": 0, "curve": [[10, 0.4]]}]
    fig = F.convergence_figure(runs)
    assert [t.name for t in fig.data] == ["bn (2 seeds)", "mn (1 seeds)"]
    assert list(fig.data[0].x) == [10, 20] and np.allclose(fig.data[0].y, [0.55, 0.75])


def test_bench_plot_data_reads_the_files_and_drops_bad_ones(tmp_path):
    import json

    from cbnorm.app import compare as C

    (tmp_path / "speed.json").write_text(json.dumps({
        "machine": {"cpu": "x"}, "goals": {"mn": 4, "bad": "no"},
        "layers": [{"layer": "mn", "shape": [2, 3], "K": 3, "ratio_to_bn": 2.0}, {"layer": "broken"}]}))
    (tmp_path / "convergence.json").write_text("{not json")
    out = C.bench_plot_data(str(tmp_path))
    assert out["speed_layers"] == [{"layer": "mn", "shape": [2, 3], "K": 3, "ratio_to_bn": 2.0}]
    assert out["speed_goals"] == {"mn": 4} and "convergence_runs" not in out
    assert C.bench_plot_data(str(tmp_path / "missing")) == {}


# --------------------------------------------------------------------------- layer selection (any module path)
def _fake_run(model, layers, norm="bn"):
    from pathlib import Path
    from types import SimpleNamespace

    return SimpleNamespace(model=model, config={"layers": layers}, norm=norm, path=Path("/runs/fake"))


def _resnet_like():
    """A module tree with the paths of CIFAR ResNet / DenseNet-BC norm layers (cbnorm layers at each)."""
    nn = torch.nn

    def block(norm):
        return nn.ModuleDict({"bn1": cbnorm.build_norm("bn", 4), "bn2": cbnorm.build_norm(norm, 4, num_components=2)
                              if norm == "mn" else cbnorm.build_norm(norm, 4)})

    m = nn.Module()
    m.bn1 = cbnorm.build_norm("bn", 4)
    m.layer1 = nn.ModuleList([block("bn")])
    m.layer3 = nn.ModuleList([block("mn"), block("mn")])
    m.transition1 = nn.ModuleDict({"norm": cbnorm.build_norm("bn", 4)})
    m.final = cbnorm.build_norm("bn", 4)
    return m


def test_studied_layers_match_fnmatch_patterns_and_block_names():
    from cbnorm.app import shared as S

    model = _resnet_like()
    run = _fake_run(model, ["layer3.*", "transition*", "final"], norm="mn")
    choices = S.layer_choices(run)
    studied = ["layer3.0.bn1", "layer3.0.bn2", "layer3.1.bn1", "layer3.1.bn2", "transition1.norm", "final"]
    assert choices[:6] == studied and sorted(choices[6:]) == ["bn1", "layer1.0.bn1", "layer1.0.bn2"]
    assert S.studied_layer(run) == "layer3.0.bn1"
    assert [S.is_studied(run, n) for n in ("layer1.0.bn2", "layer3.1.bn2", "final", "bn1")] == [False, True, True, False]
    # the shallow CNN's runs name blocks: "conv3" means blocks.conv3.norm (and a plain string is one pattern)
    assert S.matches_layer("blocks.conv3.norm", "conv3") and not S.matches_layer("blocks.conv31.norm", "conv3")
    assert S.matches_layer("layer3.0.bn2", "layer3.*") and not S.matches_layer("layer30.0.bn2", "layer3.*")
    assert S.studied_patterns({"layers": "conv3"}) == ["conv3"] and S.studied_patterns({}) == []
    # nothing named: the layers of the run's norm type come first
    assert S.layer_choices(_fake_run(model, [], norm="mn"))[:2] == ["layer3.0.bn2", "layer3.1.bn2"]


def test_layer_labels_are_short_and_unique_for_any_path():
    from cbnorm.app import shared as S

    assert S.short_layer_names(["blocks.conv1.norm", "blocks.conv3.norm"]) == {
        "blocks.conv1.norm": "conv1", "blocks.conv3.norm": "conv3"}
    assert S.short_layer_names(["blocks.conv3.norm"]) == {"blocks.conv3.norm": "conv3"}
    assert S.short_layer_names(["bn1", "layer3.0.bn2", "transition1.norm", "final"]) == {
        "bn1": "bn1", "layer3.0.bn2": "layer3.0.bn2", "transition1.norm": "transition1", "final": "final"}
    assert S.short_layer_names(["net.features.norm", "net.head.norm"]) == {  # the shared prefix goes
        "net.features.norm": "features", "net.head.norm": "head"}
    assert S.short_layer_names(["a.norm", "a", "b.norm"]) == {"a.norm": "a.norm", "a": "a", "b.norm": "b"}
    run = _fake_run(_resnet_like(), ["layer3.*", "final"], norm="mn")
    assert S.layer_label(run, "layer3.1.bn2") == "layer3.1.bn2 · mn (studied)"
    assert S.layer_label(run, "transition1.norm") == "transition1 · bn"
    assert S.layer_label(run, "final") == "final · bn (studied)"
    info = S.layer_info(run, "layer3.0.bn2")
    assert info["kind"] == "mn" and info["has_mixture"] and not info["uses_context"] and info["num_components"] == 2
    assert not S.layer_info(run, "bn1")["has_mixture"]
    with pytest.raises(ValueError, match="no layer 'nope'"):
        S.layer_info(run, "nope")

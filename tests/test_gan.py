"""The GAN experiment: the DCGAN, its trainer (a few steps for every generator norm, on the shipped test
split), the run format of task "gan" (safe loading, hostile runs), ``python -m cbnorm.evaluate RUN --check``
and page 5 in AppTest with two runs (and a damaged one), plus the histogram page on a generator's layer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cbnorm.models.dcgan import DCGANDiscriminator, DCGANGenerator
from cbnorm.runs import load_run

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER = ROOT / "checkpoints" / "gan-features" / "classifier"
TINY = ["--split", "test", "--limit-train", "128", "--batch-size", "16", "--steps", "4", "--eval-every", "2",
        "--snapshot-every", "2", "--eval-samples", "64", "--pr-samples", "64", "--num-fixed", "8", "--width", "4",
        "--latent-dim", "16", "--classifier", str(CLASSIFIER), "--threads", "1", "--quiet"]
NORM_ARGS = {"bn": [], "mn": ["--components", "3", "--norm-kwargs", '{"em_iters": 1, "kmeans_iters": 1}'],
             "acn": ["--components", "3"], "mode": ["--components", "3"], "ln": [], "gn": ["--norm-kwargs", '{"num_groups": 2}']}
_BUILT: dict[str, Path] = {}


def tiny_run(base: Path, norm: str = "bn", extra=()) -> Path:
    from cbnorm.train import gan

    out = base / f"gan-{norm}"
    if str(out) not in _BUILT:
        assert gan.main(TINY + ["--norm", norm, "--out", str(out)] + NORM_ARGS[norm] + list(extra)) == 0
        _BUILT[str(out)] = out
    return out


@pytest.fixture(scope="module")
def gan_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gan_runs")
    tiny_run(root, "bn")
    tiny_run(root, "mn")
    return root


# ----------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_dcgan_shapes_and_norm_paths(size, channels):
    g = DCGANGenerator(16, channels, size, width=4, norm="mn", norm_layers=("norm1", "norm2"),
                       norm_kwargs={"num_components": 2})
    assert [type(getattr(g, n)).__name__ for n in ("norm1", "norm2", "norm3")] == ["MixtureNorm", "MixtureNorm",
                                                                                   "BatchNorm"]
    x = g(torch.randn(6, 16))
    assert x.shape == (6, channels, size, size) and x.abs().max() <= 1
    d = DCGANDiscriminator(channels, size, width=4)
    assert d(x).shape == (6,)
    with pytest.raises(ValueError, match="z must be"):
        g(torch.randn(6, 15))
    with pytest.raises(ValueError, match="image_size"):
        DCGANGenerator(16, 1, 64)
    with pytest.raises(ValueError, match="norm4|matched no"):
        DCGANGenerator(16, 1, 28, norm="mn", norm_layers=("norm4",))


# ----------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("norm", sorted(NORM_ARGS))
def test_trains_a_few_steps_for_every_generator_norm(norm, tmp_path):
    out = tiny_run(tmp_path, norm)
    run = load_run(out)
    m = run.metrics
    assert run.config["task"] == "gan" and m["steps_done"] == 4
    assert [e["step"] for e in m["evals"]] == [0, 2, 4]
    assert [s for s, _ in run.snapshots] == [0, 2, 4]
    assert all(np.isfinite(e["fd"]) and 0 <= e["precision"] <= 1 and 1 <= e["modes"] <= 10 for e in m["evals"])
    assert len(m["loss"]) == 4 and all(np.isfinite(v) for r in m["loss"] for v in r)
    expected = "BatchNorm" if norm == "bn" else type(run.model.norm1).__name__
    assert type(run.model.norm3).__name__ == "BatchNorm" or norm == "bn"
    assert type(run.model.norm1).__name__ == expected
    # snapshots are float16 generator weights only; the final weights load; latents are fixed
    from cbnorm.runs import read_safetensors
    from cbnorm.train.gan import fixed_latents

    snap, _ = read_safetensors(run.snapshots[-1][1])
    assert not any(k.startswith(("d.", "features.")) for k in snap)
    assert all(v.dtype == torch.float16 for v in snap.values() if v.is_floating_point())
    assert fixed_latents(run).shape == (8, 16)
    assert run.load_snapshot(2) is not run.model


def test_resume_continues_the_run(tmp_path):
    from cbnorm.train import gan

    out = tmp_path / "r"
    assert gan.main(TINY + ["--steps", "2", "--out", str(out)]) == 0
    assert gan.main(["--out", str(out), "--resume", "--steps", "4", "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps_done"] == 4 and [e["step"] for e in m["evals"]] == [0, 2, 4]
    assert [r[0] for r in m["loss"]] == [1, 2, 3, 4]
    # an option that defines the experiment cannot change on resume
    assert gan.main(["--out", str(out), "--resume", "--steps", "6", "--lr", "1e-3", "--quiet"]) == 2


def test_evaluate_check_recomputes_the_scores(gan_root, tmp_path, capsys):
    from cbnorm import evaluate

    run = gan_root / "gan-mn"
    assert evaluate.main([str(run), "--check"]) == 0
    assert "check passed" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    m = json.loads((bad / "metrics.json").read_text())
    m["evals"][-1]["fd"] += 1.0
    (bad / "metrics.json").write_text(json.dumps(m))
    (bad / "config.json").write_text((bad / "config.json").read_text().replace(
        json.loads((run / "config.json").read_text())["evaluation"]["classifier"], str(CLASSIFIER)))
    assert evaluate.main([str(bad), "--check"]) == 1
    assert "fd: recomputed" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- hostile runs
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["evaluation"]["classifier"] = str(CLASSIFIER)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_hostile_gan_runs_give_clear_messages(gan_root, tmp_path):
    from cbnorm.train.gan import fixed_latents

    src = gan_root / "gan-bn"
    no_weights = _copy(src, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="weights are missing"):
        load_run(no_weights)
    wide = _copy(src, tmp_path / "wrong_shapes")
    cfg = json.loads((wide / "config.json").read_text())
    cfg["model"]["kwargs"]["width"] = 5
    (wide / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match the architecture"):
        load_run(wide)
    lat = _copy(src, tmp_path / "latent_mismatch")
    cfg = json.loads((lat / "config.json").read_text())
    cfg["latent"]["dim"] = 17
    (lat / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="latent.dim 17 differs"):
        load_run(lat)
    pickled = _copy(src, tmp_path / "pickled")
    torch.save({"x": torch.zeros(2)}, pickled / "model.safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_run(pickled)
    bad_lat = _copy(src, tmp_path / "bad_latents")
    from safetensors.torch import save_file

    save_file({"fixed": torch.zeros(8, 3)}, str(bad_lat / "latents.safetensors"))
    with pytest.raises(ValueError, match=r"'fixed' of shape \(n, 16\)"):
        fixed_latents(load_run(bad_lat))
    other = _copy(src, tmp_path / "other_classifier")
    cfg = json.loads((other / "config.json").read_text())
    cfg["evaluation"]["classifier_sha256"] = "0" * 64
    (other / "config.json").write_text(json.dumps(cfg))
    from cbnorm import evaluate

    assert evaluate.main([str(other), "--check"]) == 2


# ----------------------------------------------------------------------------------------------- app
def _app_dir(gan_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    root.mkdir()
    for name in ("gan-bn", "gan-mn"):
        _copy(gan_root / name, root / name)
    broken = _copy(gan_root / "gan-bn", root / "gan-broken")
    (broken / "model.safetensors").unlink()
    return root


def test_generation_page_in_apptest(gan_root, tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CBNORM_RUNS", str(_app_dir(gan_root, tmp_path)))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180).run()
    assert not at.exception, [e.value for e in at.exception]
    at.switch_page("pages/5_Image_Generation.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.multiselect(key="gen_runs").value == ["gan-bn", "gan-mn"]  # loadable runs by default
    assert not at.error, [e.value for e in at.error]
    at.multiselect(key="gen_runs").set_value(["gan-bn", "gan-mn", "gan-broken"]).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("gan-broken" in e.value and "weights are missing" in e.value for e in at.error)
    assert len(at.get("image")) == 2
    charts = [c for c in at.get("plotly_chart")]
    assert len(charts) >= 3  # animation, scores, classes
    scores = json.loads(next(c for c in charts if c.proto.id and "gen_scores" in c.proto.id).proto.spec)
    assert len(scores["data"]) == 2
    anim = json.loads(next(c for c in charts if c.proto.id and "gen_anim" in c.proto.id).proto.spec)
    assert [f["name"] for f in anim["frames"]] == ["0", "2", "4"]  # one frame per common snapshot
    at.select_slider(key="gen_step").set_value(2).run()
    assert not at.exception
    at.radio(key="gen_metric").set_value("recall").run()
    assert not at.exception and not [e for e in at.error if "gan-broken" not in e.value]
    # the generator's norm layers on the histogram page (latents as its input)
    at.session_state["run"] = "gan-mn"
    at.switch_page("pages/1_Activation_Histograms.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    captions = " ".join(c.value for c in at.caption)
    assert "gan-mn" in captions and "latent vectors" in captions and " test images, seed" not in captions
    at.switch_page("pages/2_Cluster_Evolution.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_bench_steps_to_reach_bn_best():
    import sys

    sys.path.insert(0, str(ROOT))
    from bench.gan import steps_to_reach

    curve = [{"step": 0, "fd": 90.0}, {"step": 250, "fd": 20.0}, {"step": 500, "fd": float("nan")},
             {"step": 750, "fd": 9.0}]
    assert steps_to_reach(curve, 20.0) == 250
    assert steps_to_reach(curve, 10.0) == 750
    assert steps_to_reach(curve, 5.0) is None

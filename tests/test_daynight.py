"""Day-for-night renderer, the paired set and its split, the day/night trainer and the run format (task daynight)."""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import color

from cbnorm.daynight import (CONTEXTS, HOLDOUT_PHOTOS, PHOTOS, TRAIN_PHOTOS, DayNightPairs, NightParams,
                             load_photo, photo_seed, render_night, rgb_to_xyz, scotopic_luminance, srgb_to_linear)
from cbnorm.runs import load_run, read_safetensors

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"input": ROOT / "checkpoints" / "daynight-input", "feature": ROOT / "checkpoints" / "daynight-feature"}



@pytest.fixture(scope="module")
def photo():
    return np.array(load_photo("chelsea")[::2, ::2])


@pytest.fixture(scope="module")
def night(photo):
    return render_night(photo)


# ----------------------------------------------------------------------------- renderer
def test_night_is_darker(photo, night):
    assert night.shape == photo.shape and night.dtype == np.uint8
    lum_day, lum_night = color.rgb2lab(photo)[..., 0].mean(), color.rgb2lab(night)[..., 0].mean()
    assert lum_night < 0.6 * lum_day


def test_night_is_less_saturated(photo, night):
    chroma = lambda im: np.hypot(*np.moveaxis(color.rgb2lab(im)[..., 1:], -1, 0)).mean()  # noqa: E731
    assert chroma(night) < 0.5 * chroma(photo)
    # without the blue tint, HSV saturation (independent of brightness) drops too
    grey_night = render_night(photo, NightParams(blue_shift=0.0, noise_shot=0.0, noise_read=0.0))
    assert color.rgb2hsv(grey_night)[..., 1].mean() < 0.7 * color.rgb2hsv(photo)[..., 1].mean()


def test_night_is_bluer(photo, night):
    share = lambda im: im[..., 2].astype(float).sum() / im.astype(float).sum()  # noqa: E731
    assert share(night) > share(photo) + 0.05
    assert color.rgb2lab(night)[..., 2].mean() < color.rgb2lab(photo)[..., 2].mean() - 5  # b*: toward blue


def test_renderer_is_deterministic_with_seed(photo):
    a, b = render_night(photo, NightParams(seed=3)), render_night(photo, NightParams(seed=3))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render_night(photo, NightParams(seed=4)))
    assert np.array_equal(render_night(photo, NightParams(seed=4), seed=3), a)


def test_renderer_parameters_act(photo):
    base = NightParams(noise_shot=0.0, noise_read=0.0)
    dark = render_night(photo, replace(base, exposure_stops=4.0))
    assert dark.mean() < render_night(photo, base).mean()
    sharp = render_night(photo, replace(base, blur_sigma=0.0, scotopic=1.0)).astype(float)
    blurry = render_night(photo, replace(base, blur_sigma=3.0, scotopic=1.0)).astype(float)
    assert np.abs(np.diff(blurry, axis=1)).mean() < 0.7 * np.abs(np.diff(sharp, axis=1)).mean()
    noisy = render_night(photo, replace(base, noise_read=0.02)).astype(float)
    assert np.abs(noisy - render_night(photo, base)).mean() > 1.0


def test_scotopic_luminance_purkinje():
    white = rgb_to_xyz(np.array([1.0, 1.0, 1.0]))
    assert scotopic_luminance(white) == pytest.approx(white[1], rel=1e-3)
    red, blue = rgb_to_xyz(np.array([1.0, 0, 0])), rgb_to_xyz(np.array([0, 0, 1.0]))
    assert scotopic_luminance(blue) / blue[1] > 1.5 > 0.5 > scotopic_luminance(red) / red[1]
    assert srgb_to_linear(np.array([0.0, 1.0])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("bad,msg", [
    ({"scotopic": 1.5}, r"scotopic must be a number in \[0, 1\]"),
    ({"gamma": 0.0}, r"gamma must be"),
    ({"blur_sigma": -1}, r"blur_sigma must be"),
    ({"seed": -1}, r"seed must be"),
    ({"seed": 1.5}, r"seed must be"),
    ({"bogus": 1}, r"unknown renderer parameters \['bogus'\]"),
])
def test_night_params_validation(bad, msg):
    with pytest.raises(ValueError, match=msg):
        NightParams.from_dict(bad)


def test_night_params_round_trip():
    p = NightParams(scotopic=0.9, seed=7)
    assert NightParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_renderer_refuses_bad_input():
    with pytest.raises(ValueError, match=r"uint8 RGB array"):
        render_night(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 RGB array"):
        render_night(np.zeros((4, 4, 3), np.float32))


# ----------------------------------------------------------------------------- paired set
def test_split_holds_out_whole_photos():
    assert len(HOLDOUT_PHOTOS) >= 2
    assert not set(TRAIN_PHOTOS) & set(HOLDOUT_PHOTOS)
    assert set(TRAIN_PHOTOS) | set(HOLDOUT_PHOTOS) == set(PHOTOS)
    for name in PHOTOS:
        img = load_photo(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 256
    with pytest.raises(ValueError, match="unknown photo"):
        load_photo("lena")


def test_pairs_are_aligned_crops_of_whole_renderings():
    pairs = DayNightPairs(("chelsea",))
    assert np.array_equal(pairs.night[0], render_night(load_photo("chelsea"), seed=photo_seed(NightParams(),
                                                                                              "chelsea")))
    rng = np.random.default_rng(0)
    day, night, loc = pairs.sample(16, 24, rng)
    assert day.shape == night.shape == (16, 24, 24, 3)
    for k, (i, t, l) in enumerate(loc):
        assert 0 <= t <= pairs.day[i].shape[0] - 24 and 0 <= l <= pairs.day[i].shape[1] - 24
        assert np.array_equal(day[k], pairs.day[i][t:t + 24, l:l + 24])
        assert np.array_equal(night[k], pairs.night[i][t:t + 24, l:l + 24])
    assert pairs.pixels("night").shape == (300 * 451, 3)
    with pytest.raises(ValueError, match="fit in every photo"):
        pairs.sample(1, 1000, rng)


# ----------------------------------------------------------------------------- trainer + run format
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    from cbnorm.train.daynight import train_daynight

    root = tmp_path_factory.mktemp("dn")
    out = {}
    for tr in ("input", "feature"):
        out[tr] = train_daynight({"translator": tr, "steps": 3, "batch_size": 4, "crop": 16, "width": 4,
                                  "embed_dim": 8, "log_every": 1, "quiet": True, "out": str(root / tr),
                                  "renderer": '{"scotopic": 0.8}'})
    return out


def test_trainer_writes_loadable_runs(tiny_runs):
    for tr, path in tiny_runs.items():
        run = load_run(path)
        cfg = run.config
        assert cfg["task"] == "daynight" and cfg["translator"] == tr and run.context_names == list(CONTEXTS)
        assert cfg["renderer"]["scotopic"] == 0.8
        assert [r[0] for r in run.metrics["loss"]] == [1, 2, 3]
        assert {"train_psnr_day_to_night", "train_psnr_night_to_day"} <= set(run.metrics)
        assert run.class_names == [] and not run.model.training
        tensors, _ = read_safetensors(path / "model.safetensors")
        for k, v in run.model.state_dict().items():
            assert torch.equal(tensors[k], v)


def test_trainer_refuses_existing_run_and_bad_options(tiny_runs, tmp_path):
    from cbnorm.train.daynight import main, train_daynight

    with pytest.raises(ValueError, match="already holds a run"):
        train_daynight({"translator": "input", "steps": 1, "out": str(tiny_runs["input"])})
    with pytest.raises(ValueError, match="multiple of 4"):
        train_daynight({"translator": "feature", "crop": 30, "out": str(tmp_path / "x")})
    with pytest.raises(ValueError, match="unknown renderer parameters"):
        train_daynight({"translator": "input", "renderer": '{"moon": 1}', "out": str(tmp_path / "y")})
    with pytest.raises(ValueError, match="unknown options"):
        train_daynight({"epochs": 3, "out": str(tmp_path / "z")})
    assert main(["--steps", "0", "--out", str(tmp_path / "w")]) == 2


def test_evaluate_check_recomputes_the_stored_scores(tiny_runs, tmp_path, capsys):
    """``python -m cbnorm.evaluate RUN --check`` on a day-night run: PSNRs (and the hold-out verification of
    the input translator) recomputed from the weights equal metrics.json; a tampered score fails it."""
    from cbnorm.evaluate import main

    for tr, path in tiny_runs.items():
        assert main([str(path), "--check"]) == 0, capsys.readouterr()
        assert "check passed" in capsys.readouterr().out
    assert main([str(tiny_runs["input"]), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert {"holdout_pair_acc", "train_psnr_day_to_night"} <= set(got) and not got["mismatches"]
    bad = tmp_path / "bad"
    shutil.copytree(tiny_runs["feature"], bad)
    m = json.loads((bad / "metrics.json").read_text())
    m["train_psnr_night_to_day"] += 0.5
    (bad / "metrics.json").write_text(json.dumps(m))
    assert main([str(bad), "--check"]) == 1
    assert "train_psnr_night_to_day" in capsys.readouterr().err


def test_psnr_matches_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio

    from cbnorm.daynight.scores import psnr as _psnr

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    assert _psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), rel=1e-12)


def test_command_of_reproduces_the_options():
    from cbnorm.train.daynight import build_parser, command_of

    cfg = json.loads((RUNS["input"] / "config.json").read_text())
    cmd = command_of(cfg, "checkpoints/daynight-input")
    args = vars(build_parser().parse_args(cmd.split()[3:]))
    for k, v in cfg["training"].items():
        if v is not None:
            assert args[k] == v, k


@pytest.mark.parametrize("which", ["input", "feature"])
def test_committed_runs_load(which):
    run = load_run(RUNS[which])
    assert run.config["task"] == "daynight" and run.config["translator"] == which
    assert run.context_names == ["day", "night"]
    assert NightParams.from_dict(run.config["renderer"]) == NightParams()
    size = sum(p.stat().st_size for p in RUNS[which].rglob("*") if p.is_file())
    assert size < 1_500_000


def _tamper(tmp_path, which, edit):
    dst = tmp_path / which
    shutil.copytree(RUNS[which], dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("which,edit,msg", [
    ("input", lambda c: c["contexts"].update(names=["night", "day"]), r"contexts of a daynight run must be"),
    ("input", lambda c: c["renderer"].update(scotopic=7), r"renderer: NightParams.scotopic must be"),
    ("input", lambda c: c["renderer"].update(exec="rm -rf /"), r"renderer: unknown renderer parameters"),
    ("input", lambda c: c.update(translator="feature"), r"translator must be 'input'"),
    ("input", lambda c: c.pop("renderer"), r"missing the keys \['renderer'\]"),
    ("input", lambda c: c.update(norm="bn"), r"must be a context layer"),
    ("input", lambda c: c["norm_kwargs"].update(num_contexts=3), r"num_contexts of a daynight run must be 2"),
    ("input", lambda c: c["model"].update(name="shallow_cnn"), r"unknown model 'shallow_cnn'"),
    ("feature", lambda c: c.update(task="translate"), r"unknown task 'translate'"),
    ("feature", lambda c: c["model"]["kwargs"].update(width=8), r"does not match the architecture"),
    ("feature", lambda c: c["files"].update(weights="../../etc/passwd"), r"must be a relative path inside"),
    ("feature", lambda c: c["preprocessing"].update(channels=1, mean=[0], std=[1]), r"channels of a daynight run"),
])
def test_refuses_tampered_daynight_config(tmp_path, which, edit, msg):
    with pytest.raises(ValueError, match=msg):
        load_run(_tamper(tmp_path, which, edit))


def test_refuses_pickled_weights(tmp_path):
    import pickle

    dst = _tamper(tmp_path, "input", lambda c: None)
    (dst / "model.safetensors").write_bytes(pickle.dumps({"x": 1}, protocol=2))
    with pytest.raises(ValueError, match="not a safetensors file.*pickle"):
        load_run(dst)

"""Run directories: round trip, snapshots, preprocessing, and every refusal of load_run with its message."""
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cbnorm
from cbnorm import runs
from cbnorm.runs import (build_model_from_config, load_resume_state, load_run, read_safetensors, save_resume_state,
                         save_run, save_snapshot)


LABEL_TO_CONTEXT = [0, 1, 0, 1, 0, 2, 0, 2, 3, 2]


def make_config(**over):
    cfg = {
        "format_version": 1, "task": "classify",
        "model": {"name": "shallow_cnn", "kwargs": {"in_channels": 1, "num_classes": 10, "width": 0.125}},
        "norm": "cn", "norm_kwargs": {"num_contexts": 4, "priors": [0.4, 0.2, 0.3, 0.1]},
        "layers": ["conv3"], "input_norm": None,
        "dataset": {"name": "fashion-mnist", "limit_train": None, "limit_test": None, "subset_seed": 0},
        "contexts": {"spec": "superclass", "num_contexts": 4, "names": ["a", "b", "c", "d"],
                     "label_derived": True, "label_to_context": LABEL_TO_CONTEXT, "kmeans": None},
        "class_names": [str(i) for i in range(10)],
        "preprocessing": {"channels": 1, "image_size": [12, 12], "mean": [0.25], "std": [0.5]},
        "training": {"epochs": 1},
        "files": dict(runs.DEFAULT_FILES),
    }
    cfg.update(over)
    return cfg


def trained_model(cfg, steps=3):
    torch.manual_seed(0)
    model = build_model_from_config(cfg)
    model.train()
    for _ in range(steps):  # fill running statistics
        model(torch.randn(16, 1, 12, 12) * 2 + 1, context=torch.arange(16) % 4)
    return model.eval()


@pytest.fixture(scope="module")
def template_run(tmp_path_factory):
    cfg = make_config()
    model = trained_model(cfg)
    path = tmp_path_factory.mktemp("template") / "run"
    save_snapshot(path, build_model_from_config(cfg), 0)
    save_run(path, cfg, model, {"loss": [[1, 2.3]], "epochs": [], "test_acc": 0.5})
    save_snapshot(path, model, 3)
    save_snapshot(path, model, 12)
    return path


@pytest.fixture
def run_dir(template_run, tmp_path):
    """A fresh copy of a small saved run (cn at conv3, 4 label-derived contexts) that a test may damage."""
    return Path(shutil.copytree(template_run, tmp_path / "run"))


def images(n=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 12, 12), dtype=np.uint8)


def test_round_trip(run_dir):
    cfg = make_config()
    model = trained_model(cfg)
    run = cbnorm.load_run(run_dir)  # exported lazily from the package
    assert isinstance(run, runs.Run) and run.path == run_dir
    assert not run.model.training
    assert run.config["norm"] == "cn" and run.metrics["test_acc"] == 0.5
    assert run.metrics["params"] == sum(p.numel() for p in model.parameters())
    ref, got = model.state_dict(), run.model.state_dict()
    assert set(ref) == set(got)
    for k in ref:  # parameters AND buffers (running stats, priors, num_batches_tracked)
        assert torch.equal(ref[k], got[k]), k
    assert int(got["blocks.conv3.norm.num_batches_tracked"]) == 3
    x = run.preprocess(images())
    with torch.no_grad():
        torch.testing.assert_close(run.model(x), model(x), atol=0, rtol=0)
    assert run.predict(images()).shape == (5,)
    assert run.logits(images(), context=run.context_of([0, 1, 5, 8, 9])).shape == (5, 10)
    assert run.class_names == cfg["class_names"] and run.context_names == ["a", "b", "c", "d"]


def test_snapshots_and_load_snapshot(run_dir):
    run = load_run(run_dir)
    assert [s for s, _ in run.snapshots] == [0, 3, 12]
    assert all(p.name == f"step_{s:06d}.safetensors" for s, p in run.snapshots)
    tensors, meta = read_safetensors(run.snapshots[1][1])
    assert meta["step"] == "3"
    assert tensors["blocks.conv1.conv.weight"].dtype == torch.float16
    assert tensors["blocks.conv3.norm.num_batches_tracked"].dtype == torch.int64  # ints kept
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    m0 = run.load_snapshot(0)
    m12 = run.load_snapshot(12)
    assert m0 is not run.model and m12 is not run.model and not m12.training
    for k, v in run.model.state_dict().items():  # the shared model is untouched
        assert torch.equal(v, before[k])
    assert int(m0.state_dict()["blocks.conv3.norm.num_batches_tracked"]) == 0
    for k, v in m12.state_dict().items():
        torch.testing.assert_close(v.float(), before[k].float(), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match=r"no snapshot at step 5.*\[0, 3, 12\]"):
        run.load_snapshot(5)


def test_snapshot_keeps_float32_where_float16_overflows(tmp_path):
    cfg = make_config()
    model = trained_model(cfg)
    with torch.no_grad():
        model.blocks["conv3"]["norm"].running_var.fill_(1e6)
    p = save_snapshot(tmp_path, model, 1)
    t, _ = read_safetensors(p)
    assert t["blocks.conv3.norm.running_var"].dtype == torch.float32
    assert t["blocks.conv3.norm.running_mean"].dtype == torch.float16


def test_preprocess(run_dir):
    run = load_run(run_dir)
    imgs = images(3)
    x = run.preprocess(imgs)
    assert x.shape == (3, 1, 12, 12) and x.dtype == torch.float32
    expected = (torch.from_numpy(imgs).float() / 255.0 - 0.25) / 0.5
    torch.testing.assert_close(x[:, 0], expected)
    assert run.preprocess(imgs[..., None]).shape == (3, 1, 12, 12)  # (N, H, W, 1) too
    assert run.preprocess(imgs[0]).shape == (1, 1, 12, 12)  # one (H, W) image
    with pytest.raises(TypeError, match="uint8"):
        run.preprocess(imgs.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(12, 12\)"):
        run.preprocess(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="3 channels"):
        run.preprocess(np.zeros((2, 12, 12, 3), np.uint8))


def test_context_of(run_dir, tmp_path):
    run = load_run(run_dir)
    assert run.context_of(np.arange(10)).tolist() == LABEL_TO_CONTEXT
    with pytest.raises(ValueError, match="labels must be in"):
        run.context_of([10])
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["contexts"] = {"spec": "kmeans:2", "num_contexts": 2, "names": ["x", "y"], "label_derived": False,
                       "label_to_context": None,
                       "kmeans": {"type": "kmeans", "n_contexts": 2, "seed": 0, "max_samples": None, "pool": 1,
                                  "minibatch": False, "image_shape": [12, 12],
                                  "centers": [[0.0] * 144, [1.0] * 144]}}
    cfg["norm_kwargs"]["num_contexts"] = 4  # architecture unchanged
    (run_dir / "config.json").write_text(json.dumps(cfg))
    run = load_run(run_dir)
    with pytest.raises(ValueError, match="not derived from class labels"):
        run.context_of([0, 1])
    imgs = np.stack([np.zeros((12, 12), np.uint8), np.full((12, 12), 255, np.uint8)])
    assert run.context_of_images(imgs).tolist() == [0, 1]


def test_resume_state_round_trip(tmp_path):
    cfg = make_config()
    model = trained_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model(torch.randn(8, 1, 12, 12), context=torch.arange(8) % 4).sum().backward()
    opt.step()
    rng_state = torch.get_rng_state()
    p = save_resume_state(tmp_path / "resume.safetensors", model, opt, {"epochs_done": 1, "step": 7},
                          {"torch": rng_state})
    model2 = build_model_from_config(cfg)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=5.0)
    state, rng = load_resume_state(p, model2, opt2, cfg)
    assert state == {"epochs_done": 1, "step": 7} and torch.equal(rng["torch"], rng_state)
    assert opt2.param_groups[0]["lr"] == 1e-3 and opt2.param_groups[0]["betas"] == (0.9, 0.999)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert sorted(s1) == sorted(s2)
    for k in s1:
        for name in s1[k]:
            assert torch.equal(torch.as_tensor(s1[k][name]), torch.as_tensor(s2[k][name])), (k, name)
    with pytest.raises(ValueError, match="AdamW optimizer, not SGD"):
        load_resume_state(p, model2, torch.optim.SGD(model2.parameters(), lr=0.1), cfg)


def test_save_run_refuses_model_config_mismatch(tmp_path):
    cfg = make_config()
    model = trained_model(make_config(model={"name": "shallow_cnn",
                                             "kwargs": {"in_channels": 1, "num_classes": 10, "width": 0.25}}))
    with pytest.raises(ValueError, match="does not match the architecture"):
        save_run(tmp_path / "r", cfg, model)


# ---------------------------------------------------------------------------------------------- refusals
def edit_config(run_dir, fn):
    cfg = json.loads((run_dir / "config.json").read_text())
    fn(cfg)
    (run_dir / "config.json").write_text(json.dumps(cfg))


def test_refuses_missing_dir_and_files(run_dir, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a directory"):
        load_run(run_dir / "config.json")
    for name, msg in (("model.safetensors", "weights are missing"), ("metrics.json", "metrics.json is missing"),
                      ("config.json", "config.json is missing")):
        d = tmp_path / f"copy_{name}"
        shutil.copytree(run_dir, d)
        (d / name).unlink()
        with pytest.raises(ValueError, match=msg):
            load_run(d)


@pytest.mark.parametrize("name", ["config.json", "metrics.json"])
def test_refuses_malformed_json(run_dir, name):
    (run_dir / name).write_text('{"format_version": 1,, }')
    with pytest.raises(ValueError, match=f"{name} .* malformed JSON.*line 1"):
        load_run(run_dir)


def test_refuses_non_object_json(run_dir):
    (run_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_run(run_dir)


@pytest.mark.parametrize("edit,msg", [
    (lambda c: c.update(format_version=99), r"unknown format_version 99"),
    (lambda c: c.update(format_version="1"), r"unknown format_version '1'"),
    (lambda c: c.update(task="segment"), r"unknown task 'segment'"),
    (lambda c: c.update(norm="supernorm"), r"norm: unknown norm 'supernorm'"),
    (lambda c: c.update(input_norm="zz"), r"input_norm: unknown norm 'zz'"),
    (lambda c: c["model"].update(name="resnet50"), r"unknown model 'resnet50'"),
    (lambda c: c.pop("preprocessing"), r"missing the keys \['preprocessing'\]"),
    (lambda c: c["preprocessing"].update(std=[0.0]), r"preprocessing' is inconsistent"),
    (lambda c: c["model"]["kwargs"].update(depth=3), r"cannot be built.*depth"),
])
def test_refuses_bad_config(run_dir, edit, msg):
    edit_config(run_dir, edit)
    with pytest.raises(ValueError, match=msg):
        load_run(run_dir)


@pytest.mark.parametrize("edit,what", [
    (lambda c: c["model"]["kwargs"].update(width=0.25), r"blocks\.conv1\.conv\.weight: \(8, 1, 5, 5\) in the file, "
                                                        r"\(16, 1, 5, 5\) in the model"),
    (lambda c: c["norm_kwargs"].update(num_contexts=5, priors=None), r"blocks\.conv3\.norm\.running_mean: \(4, 16\) in the file, \(5, 16\)"),
    (lambda c: c.update(norm="bn"), r"unexpected: \['blocks\.conv3\.norm\.priors'"),
    (lambda c: c.update(layers=["conv2", "conv3"]), r"missing: \['blocks\.conv2\.norm\.priors'"),
])
def test_refuses_mismatched_architecture(run_dir, edit, what):
    edit_config(run_dir, edit)
    with pytest.raises(ValueError, match=r"model\.safetensors does not match the architecture in config\.json.*"
                                         + what):
        load_run(run_dir)


def test_refuses_truncated_and_corrupt_safetensors(run_dir):
    w = run_dir / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="model.safetensors .* is truncated: tensors need"):
        load_run(run_dir)
    w.write_bytes(data[:50])
    with pytest.raises(ValueError, match="truncated: header of"):
        load_run(run_dir)
    w.write_bytes(data[:4])
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        load_run(run_dir)
    w.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        load_run(run_dir)
    n = int.from_bytes(data[:8], "little")
    w.write_bytes(data[:8] + b"{" + b"\x00" * (n - 1) + data[8 + n:])
    with pytest.raises(ValueError, match="corrupt or not a safetensors file: its header is not JSON"):
        load_run(run_dir)
    w.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_run(run_dir)
    # a byte range inconsistent with the tensor's shape
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [999]
    h = json.dumps(header).encode()
    w.write_bytes(len(h).to_bytes(8, "little") + h + data[8 + n:])
    with pytest.raises(ValueError, match=f"corrupt: tensor '{key}'"):
        load_run(run_dir)


@pytest.mark.parametrize("how", ["torch_zip", "torch_legacy", "pickle0"])
def test_refuses_pickle_renamed_as_safetensors(run_dir, how):
    w = run_dir / "model.safetensors"
    state = trained_model(make_config()).state_dict()
    if how == "torch_zip":
        torch.save(state, w)
    elif how == "torch_legacy":
        torch.save(state, w, _use_new_zipfile_serialization=False)
    else:
        w.write_bytes(pickle.dumps({"a": 1}, protocol=0))
    with pytest.raises(ValueError, match=r"not a safetensors file: it looks like .*(pickle|torch\.save).*Refusing"):
        load_run(run_dir)
    # snapshots are checked the same way
    shutil.copy(w, run_dir / "snapshots" / "step_000003.safetensors")
    save = run_dir / "good.safetensors"
    runs.save_weights(save, trained_model(make_config()))
    shutil.copy(save, w)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_run(run_dir).load_snapshot(3)


@pytest.mark.parametrize("rel", ["../outside.safetensors", "sub/../../x.safetensors", "/etc/passwd",
                                 "C:\\weights.safetensors"])
def test_refuses_paths_escaping_the_run_dir(run_dir, rel):
    edit_config(run_dir, lambda c: c["files"].update(weights=rel))
    with pytest.raises(ValueError, match=r"files\.weights .* (relative path inside the run directory|absolute|'\.\.')"):
        load_run(run_dir)


def test_refuses_symlink_escaping_the_run_dir(run_dir, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(run_dir / "model.safetensors", outside)
    os.symlink(outside, run_dir / "link.safetensors")
    edit_config(run_dir, lambda c: c["files"].update(weights="link.safetensors"))
    with pytest.raises(ValueError, match="outside the run directory"):
        load_run(run_dir)
    edit_config(run_dir, lambda c: c["files"].update(weights="model.safetensors"))
    load_run(run_dir)  # fine again
    (run_dir / "snapshots" / "step_000099.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="snapshot step_000099.safetensors .* outside the run directory"):
        load_run(run_dir)


def test_run_saved_before_acn_data_initialized_existed_loads_as_initialised():
    """Runs written before ACN got its ``data_initialized`` buffer load, and are not re-initialised."""
    from torch import nn

    old = nn.Sequential(cbnorm.build_norm("acn", 3, num_components=2, init="data"))
    old(torch.randn(8, 3, 2, 2) - 10)
    tensors = {k: v for k, v in runs._state_tensors(old).items() if not k.endswith("data_initialized")}
    new = nn.Sequential(cbnorm.build_norm("acn", 3, num_components=2, init="data"))
    runs._load_into(new, tensors, "legacy file", {})
    assert int(new[0].data_initialized) == 1
    before = new[0].mean.detach().clone()
    new(torch.randn(8, 3, 2, 2) + 40)
    torch.testing.assert_close(new[0].mean.detach(), before)


def test_a_hand_written_config_is_checked_for_its_dataset_and_contexts(run_dir):
    cfg = json.loads((run_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="dataset 'my-own-images' is not one cbnorm can load.*cbnorm.watch"):
        runs.validate_config({**cfg, "dataset": {"name": "my-own-images"}})
    bad = json.loads(json.dumps(cfg))
    bad["contexts"]["label_to_context"] = LABEL_TO_CONTEXT[:5]
    with pytest.raises(ValueError, match="has 5 entries for 10 classes"):
        runs.validate_config(bad)
    bad["contexts"]["label_to_context"] = [0] * 9 + [7]
    with pytest.raises(ValueError, match=r"context ids in \[0, 4\)"):
        runs.validate_config(bad)


def test_grey_images_feed_a_three_channel_run_in_every_channel():
    grey = np.arange(2 * 12 * 12, dtype=np.uint8).reshape(2, 12, 12)
    x = runs.preprocess_images(grey, [0.5, 0.4, 0.3], [0.2, 0.2, 0.2], 3, [12, 12])
    assert x.shape == (2, 3, 12, 12)
    for c, m in enumerate((0.5, 0.4, 0.3)):
        np.testing.assert_allclose(x[:, c].numpy(), (grey / 255.0 - m) / 0.2, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="are grey"):
        runs.preprocess_images(grey, [0.5, 0.5], [0.2, 0.2], 2, [12, 12])

"""Training CLI at toy scale: a 1-epoch run on 512 Fashion-MNIST images, metrics, evaluate, resume."""
import json

import pytest
import torch

from cbnorm import evaluate, train as train_mod
from cbnorm.data import DatasetNotFound, load_dataset
from cbnorm.runs import load_run, read_safetensors
from cbnorm.train import train



@pytest.fixture(scope="module")
def fashion():
    try:
        load_dataset("fashion-mnist", "train")  # the test split always loads (shipped)
    except DatasetNotFound as err:  # CI installs dataset-fashion-mnist; skip cleanly elsewhere
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def cn_run(fashion, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "cn"
    argv = ["--dataset", "fashion-mnist", "--model", "shallow_cnn", "--norm", "cn", "--contexts", "superclass",
            "--layers", "conv3", "--width", "0.25", "--epochs", "1", "--batch-size", "128", "--lr", "1e-3",
            "--weight-decay", "1e-4", "--optimizer", "adamw", "--seed", "0", "--snapshot-every", "2",
            "--limit-train", "512", "--limit-test", "500", "--quiet", "--out", str(out)]
    assert train_mod.main(argv) == 0
    return out


def test_run_directory_and_metrics(cn_run):
    names = {p.name for p in cn_run.iterdir()}
    assert {"config.json", "metrics.json", "model.safetensors", "snapshots", "resume.safetensors"} <= names
    cfg = json.loads((cn_run / "config.json").read_text())
    assert cfg["format_version"] == 2 and cfg["task"] == "classify"
    assert cfg["norm"] == "cn" and cfg["layers"] == ["conv3"]
    assert cfg["norm_kwargs"]["num_contexts"] == 4  # Fashion-MNIST superclasses
    assert sum(cfg["norm_kwargs"]["priors"]) == pytest.approx(1.0)
    assert cfg["contexts"]["label_derived"] and cfg["contexts"]["label_to_context"] == [0, 1, 0, 1, 0, 2, 0, 2, 3, 2]
    assert cfg["dataset"]["train_samples"] == 512 and cfg["dataset"]["limit_test"] == 500
    assert cfg["preprocessing"]["channels"] == 1 and cfg["preprocessing"]["image_size"] == [28, 28]
    assert cfg["training"]["optimizer"] == "adamw" and cfg["training"]["width"] == 0.25
    assert "git" not in json.dumps(cfg).lower()

    m = json.loads((cn_run / "metrics.json").read_text())
    steps = 512 // 128
    assert [s for s, _ in m["loss"]] == list(range(1, steps + 1))
    assert all(l > 0 for _, l in m["loss"])
    (ep,) = m["epochs"]
    for key in ("epoch", "step", "train_acc", "test_acc", "test_acc_oracle", "test_loss", "time_per_step_s", "wall",
                "loadavg"):
        assert key in ep, key
    assert ep["epoch"] == 1 and ep["step"] == steps
    assert 0 <= ep["train_acc"] <= 1 and 0 <= ep["test_acc"] <= 1 and 0 <= ep["test_acc_oracle"] <= 1
    assert ep["time_per_step_s"] > 0 and ep["wall"] >= ep["time_per_step_s"] * steps
    assert m["test_acc"] == ep["test_acc"] and m["test_acc_oracle"] == ep["test_acc_oracle"]
    assert m["best_test_acc"] == ep["test_acc"] and m["epochs_done"] == 1 and m["steps_done"] == steps
    run = load_run(cn_run)
    assert m["params"] == sum(p.numel() for p in run.model.parameters())
    assert [s for s, _ in run.snapshots] == [0, 2, 4]  # step 0, every 2 steps; the last one is the end


def test_evaluate_recomputes_test_accuracy(cn_run, capsys):
    res = evaluate.evaluate_run(str(cn_run))
    m = json.loads((cn_run / "metrics.json").read_text())
    assert res["n"] == 500
    assert abs(res["test_acc"] - m["test_acc"]) <= 0.002
    assert abs(res["test_acc_oracle"] - m["test_acc_oracle"]) <= 0.002
    assert abs(res["test_loss"] - m["epochs"][-1]["test_loss"]) < 1e-3
    assert evaluate.main([str(cn_run), "--check"]) == 0
    out = capsys.readouterr().out
    assert "test_acc" in out and "check passed" in out
    # a different test subset cannot be checked against metrics.json
    assert evaluate.main([str(cn_run), "--check", "--limit", "100"]) == 2


def test_evaluate_check_fails_on_tampered_metrics(cn_run, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(cn_run, bad)
    m = json.loads((bad / "metrics.json").read_text())
    m["test_acc"] = m["test_acc"] + 0.01
    (bad / "metrics.json").write_text(json.dumps(m))
    assert evaluate.main([str(bad), "--check", "--json"]) == 1
    assert "test_acc" in capsys.readouterr().err


def _train_small(out, **kw):
    opts = dict(dataset="fashion-mnist", width=0.125, batch_size=64, limit_train=256, limit_test=200, quiet=True,
                snapshot_every=3, components=2, out=str(out))
    opts.update(kw)
    return train(opts)


def test_resume_gives_the_same_run(fashion, tmp_path, norm="mn"):
    """2 epochs in one go == 1 epoch, stop, --resume to 2 epochs (MN draws random numbers: RNG state restored)."""
    small = dict(norm=norm, limit_train=192, limit_test=100, snapshot_every=2)  # 3 steps per epoch
    full = _train_small(tmp_path / "full", epochs=2, **small)
    part = _train_small(tmp_path / "part", epochs=1, **small)
    part = train(["--out", str(part), "--resume", "--epochs", "2", "--quiet"])
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (full, part))
    assert ma["loss"] == mb["loss"]
    strip = lambda eps: [{k: v for k, v in e.items() if k not in ("time_per_step_s", "wall", "loadavg")} for e in eps]
    assert strip(ma["epochs"]) == strip(mb["epochs"])
    wa, _ = read_safetensors(full / "model.safetensors")
    wb, _ = read_safetensors(part / "model.safetensors")
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    snaps_a, snaps_b = dict(load_run(full).snapshots), dict(load_run(part).snapshots)
    assert sorted(snaps_a) == [0, 2, 4, 6]
    assert sorted(snaps_b) == [0, 2, 3, 4, 6]  # + the end of the interrupted run (epoch 1 = step 3)
    sa, _ = read_safetensors(snaps_a[4])
    sb, _ = read_safetensors(snaps_b[4])
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((part / "config.json").read_text())["training"]["epochs"] == 2


def test_refusals(fashion, tmp_path):
    out = _train_small(tmp_path / "r", norm="bn", epochs=1, limit_train=128)
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        _train_small(out, norm="bn", epochs=1)
    with pytest.raises(ValueError, match=r"differ from the stored run.*lr: stored 0\.001, given 0\.1"):
        train({"out": str(out), "resume": True, "lr": 0.1})
    with pytest.raises(ValueError, match="needs per-sample contexts"):
        _train_small(tmp_path / "x", norm="cn", contexts="none", epochs=1)
    with pytest.raises(ValueError, match="invalid contexts spec"):
        _train_small(tmp_path / "y", norm="cn", contexts="clusters", epochs=1)
    with pytest.raises(ValueError, match="unknown training options"):
        train({"out": str(tmp_path / "z"), "bogus": 1})
    assert train_mod.main(["--out", str(tmp_path / "w"), "--norm", "nope", "--quiet"]) == 2


def test_kmeans_contexts_and_acn(tmp_path):
    """k-means contexts (on the bundled sklearn digits, always available); ACN ignores contexts."""
    out = train(dict(dataset="digits", norm="cnx", contexts="kmeans:3", width=0.125, epochs=1, batch_size=64,
                     quiet=True, snapshot_every=0, out=str(tmp_path / "km")))
    run = load_run(out)
    assert run.contexts["kmeans"]["n_contexts"] == 3 and not run.contexts["label_derived"]
    m = run.metrics
    assert m["test_acc_oracle"] is None and m["test_acc_kmeans"] is not None
    with pytest.raises(ValueError, match="not derived from class labels"):
        run.context_of([0, 1])
    res = evaluate.evaluate_run(run)
    assert abs(res["test_acc"] - m["test_acc"]) <= 0.002 and abs(res["test_acc_kmeans"] - m["test_acc_kmeans"]) <= 0.002
    out = train(dict(dataset="digits", norm="acn", components=2, width=0.125, epochs=1, batch_size=64, quiet=True,
                     optimizer="sgd", lr=0.05, out=str(tmp_path / "acn")))
    run = load_run(out)
    assert run.config["norm_kwargs"] == {"num_components": 2} and not run.uses_context
    assert run.metrics["test_acc_oracle"] is None


def test_context_head_run_reports_predicted_mixed_and_oracle(fashion, tmp_path, capsys):
    out = tmp_path / "cnh"
    argv = ["--dataset", "fashion-mnist", "--norm", "cnx", "--contexts", "superclass", "--context-head",
            "--width", "0.25", "--epochs", "1", "--batch-size", "64", "--snapshot-every", "0",
            "--limit-train", "512", "--limit-test", "300", "--quiet", "--out", str(out)]
    assert train_mod.main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("test_acc", "test_acc_mixed", "test_acc_oracle"):
        assert 0.0 <= m[key] <= 1.0, key
    run = load_run(out)
    assert run.model.context_predictor is not None
    res = evaluate.evaluate_run(run)
    assert abs(res["test_acc"] - m["test_acc"]) < 1e-9 and abs(res["test_acc_mixed"] - m["test_acc_mixed"]) < 1e-9
    with pytest.raises(ValueError, match="context-head needs a context norm"):
        train({"norm": "bn", "context_head": True, "limit_train": 64, "limit_test": 32, "epochs": 1,
               "out": str(tmp_path / "bad")})

"""cbnorm.watch: a plain loop on a model defined here writes a run that load_run opens; the recorded x_hat of a
BatchNorm equals its formula on the recorded input (numpy); readers never see a half-written step; a process
killed with SIGKILL leaves a readable run; two gloo ranks record once; bad input gets a clear error and a full
disk stops the recording, not the training."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import cbnorm
from cbnorm import record as R
from cbnorm.runs import (list_summaries, load_run, read_metric_lines, read_summary, run_status, find_runs,
                         metrics_from_lines)

from conftest import native_stacks, spawn_timeboxed

pytestmark = pytest.mark.timeout(240)  # subprocesses are boxed tighter below


class Net(nn.Module):
    """A user's own model: conv -> BN -> relu -> conv -> GroupNorm -> relu -> linear (nothing from cbnorm)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.gn = nn.Conv2d(6, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.gn(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 10, 10, generator=g), torch.randint(0, 5, (n,), generator=g)


def _train(model, rec, steps, x, y, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr)
    for step in range(1, steps + 1):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step(step, loss=loss.item(), lr=lr)


def test_plain_loop_writes_a_run_that_load_run_opens(tmp_path):
    torch.manual_seed(0)
    model = cbnorm.convert(Net(), "mn", include="bn1", num_components=2)
    x, y = _data()
    with cbnorm.watch(model, tmp_path / "run", probe=(x, y), every=10, early=3,
                      config={"lr": 0.05}, class_names=list("abcde")) as rec:
        _train(model, rec, 25, x, y)
        rec.log(25, test_acc=0.4)
    run = load_run(tmp_path / "run")
    assert run.model is None and not run.rebuildable
    assert run.config["task"] == "record" and run.config["model"]["class"] == "Net"
    assert [li["path"] for li in run.recorded_layers] == ["bn1", "gn"]
    assert [li["kind"] for li in run.recorded_layers] == ["mn", "groupnorm"]
    assert [li["width"] for li in run.recorded_layers] == [6, 8]
    steps = [s for s, _ in run.summaries]
    _, early = R.probe_schedule(10, 3)
    assert steps == sorted({0, 10, 20, 25} | early)  # init, early log-spaced, every 10, the last step at close
    assert run.metrics["steps_done"] == 25 and len(run.metrics["loss"]) == 25
    assert run.metrics["test_acc"] == pytest.approx(0.4) and run.metrics["scalars"]["lr"][0] == [1, 0.05]
    assert run_status(run.path)["state"] == "finished"
    s = run.read_summary(20)
    assert s.values("bn1", "input").shape == (6, 2048) and s.values("gn", "x_hat").shape == (8, 2048)
    assert s.features("gn", "output").shape == (48, 8)
    w, m, v = s.mixture("bn1")  # MN's inference mixture, per channel
    assert w.shape[1] == m.shape[1] == v.shape[1] == 6 and np.allclose(w.sum(0), 1, atol=1e-5)
    assert s.mixture("gn") is None
    assert (s.array("labels") == y.numpy()).all() and s.array("predictions").shape == (48,)
    np.testing.assert_array_equal(s.tensors["gn::positions"], run.read_summary(0).tensors["gn::positions"])


def test_recorded_x_hat_of_batchnorm_is_its_formula_on_the_recorded_input(tmp_path):
    """Independent reference: in eval mode BatchNorm's x_hat is (x - running_mean) / sqrt(running_var + eps)."""
    torch.manual_seed(1)
    model = Net()
    x, y = _data(32, seed=3)
    rec = cbnorm.watch(model, tmp_path / "r", probe=x, every=5, early=0)
    _train(model, rec, 5, x, y)
    rec.close()
    s = read_summary(list_summaries(tmp_path / "r")[-1][1])
    inp = s.values("bn1", "input").astype(np.float64)
    xh = s.values("bn1", "x_hat").astype(np.float64)
    out = s.values("bn1", "output").astype(np.float64)
    rm, rv = model.bn1.running_mean.numpy()[:, None], model.bn1.running_var.numpy()[:, None]
    ref = (inp - rm) / np.sqrt(rv + model.bn1.eps)
    np.testing.assert_allclose(xh, ref, atol=2e-2, rtol=2e-2)  # float16 storage
    g, b = model.bn1.weight.detach().numpy()[:, None], model.bn1.bias.detach().numpy()[:, None]
    np.testing.assert_allclose(out, g * ref + b, atol=2e-2, rtol=2e-2)
    # the pooled features are the per-sample channel means of the full output, recomputed here
    model.eval()  # the probe ran in eval mode
    with torch.no_grad():
        full = model.bn1(model.conv1(x)).mean((2, 3)).numpy()
    np.testing.assert_allclose(s.features("bn1", "output"), full, atol=1e-2)


def test_train_mode_probe_leaves_training_state_alone(tmp_path):
    torch.manual_seed(0)
    model = cbnorm.convert(Net(), "mn", include="bn1", num_components=2)
    x, y = _data()
    model.train()
    model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    rec = cbnorm.watch(model, tmp_path / "t", probe=x, every=1, early=0, mode="train")
    rec.probe(1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng, torch.get_rng_state()) and model.training
    s = read_summary(list_summaries(tmp_path / "t")[-1][1])
    assert s.meta["mode"] == "train" and np.isfinite(s.values("bn1", "x_hat")).all()


def test_scalars_given_as_tensors_are_read_at_the_next_probe(tmp_path):
    model = Net()
    x, y = _data()
    rec = cbnorm.watch(model, tmp_path / "s", probe=x, every=4, early=0)
    for step in range(1, 4):
        rec.step(step, loss=torch.tensor(float(step)))
    assert read_metric_lines(tmp_path / "s") == []  # still on the device: no sync outside probe steps
    rec.step(4, loss=torch.tensor(4.0))
    assert [ln["loss"] for ln in read_metric_lines(tmp_path / "s")] == [1.0, 2.0, 3.0, 4.0]
    rec.close()


@pytest.mark.parametrize("bad, message", [
    (lambda x, y: (x[:, :, :, 0], y), "does not run through Net"),
    (lambda x, y: (x, y[:3]), r"labels y must have shape \(N,\)"),
    (lambda x, y: ("images", None), "probe must be a tensor"),
    (lambda x, y: None, "probe is required"),
])
def test_bad_probe_is_refused_with_a_clear_error(tmp_path, bad, message):
    x, y = _data()
    with pytest.raises((ValueError, TypeError), match=message):
        cbnorm.watch(Net(), tmp_path / "b", probe=bad(x, y), every=10)


def test_patterns_that_match_no_layer_name_the_layers(tmp_path):
    x, _ = _data()
    with pytest.raises(ValueError, match=r"'layer3\.\*' matches no normalization layer of Net.*'bn1', 'gn'"):
        cbnorm.watch(Net(), tmp_path / "p", probe=x, layers=["layer3.*"])
    rec = cbnorm.watch(Net(), tmp_path / "p2", probe=x, layers="g*", every=10)
    assert rec.layers == ["gn"]
    rec.close()


def test_a_directory_holding_another_run_is_refused_unless_resumed(tmp_path):
    x, y = _data()
    model = Net()
    rec = cbnorm.watch(model, tmp_path / "r", probe=(x, y), every=5, early=0)
    _train(model, rec, 12, x, y)
    rec.close()
    with pytest.raises(ValueError, match="already holds a run of Net.*resume=True"):
        cbnorm.watch(Net(), tmp_path / "r", probe=x, every=5)
    # resuming from step 7 replaces what came after it (TensorBoard's purge_step)
    rec = cbnorm.watch(model, tmp_path / "r", probe=(x, y), every=5, early=0, resume=True)
    for step in range(8, 11):
        rec.step(step, loss=100.0 + step)
    rec.close()
    assert [s for s, _ in list_summaries(tmp_path / "r")] == [0, 5, 10]
    losses = {ln["step"]: ln["loss"] for ln in read_metric_lines(tmp_path / "r")}
    assert sorted(losses) == list(range(1, 11)) and losses[8] == 108.0 and losses[7] < 100
    with pytest.raises(ValueError, match="recording layers"):
        cbnorm.watch(model, tmp_path / "r", probe=x, layers="gn", resume=True)


def test_a_full_disk_stops_the_recording_once_and_training_goes_on(tmp_path, monkeypatch):
    x, y = _data()
    model = Net()
    rec = cbnorm.watch(model, tmp_path / "f", probe=(x, y), every=2, early=0)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(R, "atomic_write_bytes", full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, rec, 6, x, y)  # training is not interrupted
        rec.close()
    stopped = [w for w in caught if issubclass(w.category, R.RecordingStopped)]
    assert len(stopped) == 1 and "No space left on device" in str(stopped[0].message)
    assert not rec.active and "step 2" in rec.error
    run = load_run(tmp_path / "f")  # what was written before stays readable
    assert [s for s, _ in run.summaries] == [0]


def test_a_read_only_directory_is_a_clear_error_at_watch(tmp_path, monkeypatch):
    x, _ = _data()

    def readonly(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(R, "write_json_atomic", readonly)
    with pytest.raises(ValueError, match="cannot write the run directory .*Read-only file system"):
        cbnorm.watch(Net(), tmp_path / "ro", probe=x)


def test_non_finite_activations_are_counted_not_a_crash(tmp_path):
    model = Net()
    x, _ = _data()
    x = x.clone()
    x[0, 0, 0, 0] = float("inf")
    rec = cbnorm.watch(model, tmp_path / "n", probe=x, every=10)
    rec.close()
    s = read_summary(list_summaries(tmp_path / "n")[0][1])
    assert s.nonfinite("bn1")["input"] > 0
    assert s.nonfinite("gn")["input"] > 0


def test_compiled_model_is_probed_through_its_eager_module(tmp_path):
    torch.manual_seed(0)
    model = Net()
    compiled = torch.compile(model, backend="eager")
    x, y = _data()
    rec = cbnorm.watch(compiled, tmp_path / "c", probe=(x, y), every=2, early=0)
    _train(compiled, rec, 4, x, y)
    rec.close()
    assert [s for s, _ in list_summaries(tmp_path / "c")] == [0, 2, 4]


def test_find_runs_walks_nested_folders(tmp_path):
    x, _ = _data()
    for sub in ("a/r1", "a/b/r2", "r3"):
        cbnorm.watch(Net(), tmp_path / sub, probe=x).close()
    (tmp_path / ".hidden" / "r4").mkdir(parents=True)
    (tmp_path / ".hidden" / "r4" / "config.json").write_text("{}")
    assert [p.relative_to(tmp_path).as_posix() for p in find_runs(tmp_path)] == ["a/b/r2", "a/r1", "r3"]
    assert find_runs(tmp_path / "r3") == [tmp_path / "r3"]


def test_metric_lines_skip_a_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metric_lines(tmp_path) == [{"step": 1, "loss": 2.0}]
    assert metrics_from_lines(read_metric_lines(tmp_path))["loss"] == [[1, 2.0]]


# ============================================================================ other processes
WRITER = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, sys.argv[2])
    from test_record import Net, _data
    import cbnorm
    torch.set_num_threads(1)
    x, y = _data()
    model = Net()
    rec = cbnorm.watch(model, sys.argv[1], probe=(x, y), every=1, early=0, values_per_channel=4096)
    step = 0
    while step < int(sys.argv[3]):
        step += 1
        rec.step(step, loss=float(step))
        print(step, flush=True)
    rec.close()
""")


def _writer(logdir, steps, tests_dir):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(logdir), str(tests_dir), str(steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stacks = native_stacks([proc.pid])
        proc.kill()
        pytest.fail(f"recording process still running after {timeout} s; its stack:\n{stacks}", pytrace=False)


def test_a_reader_polling_while_the_recorder_writes_never_sees_a_partial_step(tmp_path):
    here = os.path.dirname(__file__)
    proc = _writer(tmp_path / "live", 60, here)
    seen, reads = set(), 0
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            for step, path in list_summaries(tmp_path / "live"):
                s = read_summary(path)  # raises on a partial file
                assert s.step == step and s.values("bn1", "x_hat").shape == (6, 4096)
                seen.add(step)
                reads += 1
            if (tmp_path / "live" / "config.json").exists():
                load_run(tmp_path / "live")
    finally:
        _wait(proc, 60)
    assert proc.returncode == 0, proc.stderr.read()
    assert reads > 20 and len(seen) > 5
    assert [s for s, _ in list_summaries(tmp_path / "live")] == list(range(0, 61))


def test_a_process_killed_with_sigkill_leaves_a_readable_run(tmp_path):
    here = os.path.dirname(__file__)
    proc = _writer(tmp_path / "k", 100000, here)
    deadline = time.monotonic() + 90
    while len(list_summaries(tmp_path / "k")) < 8:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"the writer did not get to 8 steps: {proc.stderr.read() if proc.poll() is not None else ''}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    _wait(proc, 30)
    run = load_run(tmp_path / "k")
    steps = [s for s, _ in run.summaries]
    assert len(steps) >= 8 and steps == list(range(steps[-1] + 1))
    for _, p in run.summaries:
        read_summary(p)
    assert run_status(run.path)["state"] == "running"  # never closed; "stopped" once it is stale
    assert run_status(run.path, now=time.time() + 3600)["state"] == "stopped"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, logdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = None
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(Net())
        x, y = _data(16, seed=rank)
        probe = _data(16, seed=9)
        rec = cbnorm.watch(model, logdir, probe=probe, every=2, early=0)
        assert rec.active == (rank == 0)
        _train(model, rec, 4, x, y)
        rec.close()
    finally:
        del model
        import gc

        gc.collect()
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_record_once(tmp_path):
    spawn_timeboxed(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, timeout=120)
    run = load_run(tmp_path / "ddp")
    assert [s for s, _ in run.summaries] == [0, 2, 4]
    assert [ln["step"] for ln in read_metric_lines(tmp_path / "ddp")] == [1, 2, 3, 4]  # one rank's lines
    assert [li["class"] for li in run.recorded_layers] == ["BatchNorm2d", "GroupNorm"]


# ============================================================================ CLIs and the example
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_example_records_its_own_model(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "own_loop.py"), "--out",
                           str(tmp_path / "own"), "--steps", "30", "--every", "10"],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = load_run(tmp_path / "own")
    assert run.config["model"]["class"] == "SmallNet" and run.model is None
    kinds = {li["path"]: li["kind"] for li in run.recorded_layers}
    assert kinds == {"bn1": "batchnorm2d", "bn2": "batchnorm2d", "bn3": "mn"}
    assert [s for s, _ in run.summaries][-3:] == [10, 20, 30] and "test_acc" in run.metrics
    assert f"cbnorm-view {tmp_path / 'own'}" in proc.stdout


def test_replay_computes_the_summaries_of_a_trainer_run(tmp_path):
    from cbnorm import train as train_mod

    out = tmp_path / "t"
    assert train_mod.main(["--dataset", "digits", "--width", "0.25", "--epochs", "1", "--batch-size", "64",
                           "--snapshot-every", "4", "--limit-train", "256", "--limit-test", "100", "--norm", "mn",
                           "--threads", "1", "--quiet", "--record-size", "0", "--out", str(out)]) == 0
    assert list_summaries(out) == []
    assert R.main([str(out), "--size", "50", "--values-per-channel", "64", "--layers", "blocks.conv3.norm"]) == 0
    run = load_run(out)
    assert [s for s, _ in run.summaries] == [s for s, _ in run.snapshots]
    s = run.read_summary(run.summaries[-1][0])
    m = s.values("blocks.conv3.norm", "x_hat").shape[1]  # 64, or every position when the probe has fewer
    assert s.layers() == ["blocks.conv3.norm"] and 0 < m <= 64
    assert s.tensors["blocks.conv3.norm::positions"].numel() == m
    assert len(s.array("labels")) == 50
    assert R.main([str(tmp_path / "nothing-here")]) == 1  # a clear message, exit status 1


def test_the_trainer_records_through_watch(tmp_path):
    from cbnorm import train as train_mod

    out = tmp_path / "t"
    assert train_mod.main(["--dataset", "digits", "--width", "0.25", "--epochs", "2", "--batch-size", "64",
                           "--snapshot-every", "3", "--snapshot-early", "1", "--limit-train", "192",
                           "--limit-test", "80", "--norm", "acn", "--threads", "1", "--quiet", "--out", str(out)]) == 0
    run = load_run(out)
    assert [s for s, _ in run.summaries] == [s for s, _ in run.snapshots]  # the same schedule
    lines = read_metric_lines(out)
    assert [ln["step"] for ln in lines if "loss" in ln] == list(range(1, 7))
    assert [ln["epoch"] for ln in lines if "epoch" in ln] == [1, 2]  # the epoch records, logged
    assert run.read_summary(6).array("labels").shape == (80,)
    assert run_status(out)["state"] == "finished"


def test_cbnorm_view_refuses_a_missing_directory(tmp_path, capsys):
    from cbnorm import view

    with pytest.raises(SystemExit) as e:
        view.main([str(tmp_path / "missing")])
    assert e.value.code == 2 and "is not a directory" in capsys.readouterr().err


def test_cbnorm_view_starts_the_app_on_a_logdir(tmp_path):
    import urllib.request

    x, _ = _data()
    cbnorm.watch(Net(), tmp_path / "logs" / "a" / "run", probe=x).close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cbnorm.view", str(tmp_path / "logs"), "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--browser.gatherUsageStats", "false"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                stacks = native_stacks([proc.pid]) if proc.poll() is None else ""
                pytest.fail(f"cbnorm-view did not serve the app: {stacks}")
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    assert "1 run(s) under" in out


def test_snapshots_option_keeps_the_weights_at_probe_steps(tmp_path):
    from cbnorm.runs import read_safetensors

    model = Net()
    x, y = _data()
    rec = cbnorm.watch(model, tmp_path / "w", probe=(x, y), every=3, early=0, snapshots=True)
    _train(model, rec, 3, x, y)
    rec.close()
    names = sorted(p.name for p in (tmp_path / "w" / "snapshots").iterdir())
    assert names == ["step_000000.safetensors", "step_000003.safetensors"]
    tensors, _ = read_safetensors(tmp_path / "w" / "snapshots" / names[-1])
    np.testing.assert_allclose(tensors["bn1.weight"].float().numpy(), model.bn1.weight.detach().numpy(), atol=1e-3)

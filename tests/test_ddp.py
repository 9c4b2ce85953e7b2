"""DDP on CPU (gloo, 2 processes): synced statistics (bn, cn, mode) equal the single-process joint batch; the
trainer runs unchanged under torchrun's environment and follows the single-process run."""
import gc
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import cbnorm
from cbnorm.runs import read_safetensors

from conftest import spawn_timeboxed

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
              pytest.mark.timeout(180)]  # the ranks themselves are boxed tighter (spawn_timeboxed)

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers use 1 thread each too: 2 processes on 2 cores
    yield
    torch.set_num_threads(before)


N, K = 8, 3  # joint batch size, contexts


class Tiny(nn.Module):
    """conv -> bn -> conv -> cn (context) -> conv -> [third] -> linear."""

    def __init__(self, third=None):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1)
        self.bn = cbnorm.build_norm("bn", 4)
        self.cn = cbnorm.build_norm("cn", 4, num_contexts=K, priors=[0.5, 0.3, 0.2])
        self.third = None if third is None else cbnorm.build_norm(third, 4, num_components=2)
        self.head = nn.Linear(4, 5)

    def forward(self, x, context=None):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.cn(self.c2(x), context=context))
        x = self.c3(x)
        x = torch.relu(x if self.third is None else self.third(x))
        return self.head(x.mean(dim=(2, 3)))


def joint_batch(it):
    g = torch.Generator().manual_seed(100 + it)
    x = torch.randn(N, 3, 7, 7, generator=g) * 2 + 0.5
    y = torch.randint(0, 5, (N,), generator=g)
    c = torch.arange(N) % K  # counts 3, 3, 2: each context has >= 2 samples in the joint batch
    return x, y, c


def run_steps(model, rank, world, iters=2):
    """SGD steps on this rank's slice of each joint batch; returns the norm layers' outputs of the last step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs = {}
    inner = model.module if hasattr(model, "module") else model
    for name in ("bn", "cn", "third"):
        if getattr(inner, name) is not None:
            getattr(inner, name).register_forward_hook(lambda m, a, o, name=name: outputs.__setitem__(name, o.detach()))
    per = N // world
    for it in range(iters):
        x, y, c = joint_batch(it)
        sl = slice(rank * per, (rank + 1) * per)
        opt.zero_grad()
        F.cross_entropy(model(x[sl], context=c[sl]), y[sl]).backward()
        if it < iters - 1:
            opt.step()
    grads = {f"grad.{k}": p.grad.detach().clone() for k, p in inner.named_parameters()}
    return {**{f"state.{k}": v for k, v in inner.state_dict().items()}, **grads,
            **{f"out.{k}": v for k, v in outputs.items()}}


def _stats_worker(rank, world, init_file, out_dir, third=None):
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DDP(Tiny(third))
        save_file({k: v.contiguous() for k, v in run_steps(model, rank, world).items()},
                  os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        model = None  # the DDP wrapper's reducer holds the group: release it first, or its destructor hangs
        gc.collect()
        dist.destroy_process_group()


def compare_with_joint_batch(tmp_path, third=None):
    torch.manual_seed(0)
    ref = run_steps(Tiny(third), 0, 1)  # one process, the joint batch of 8
    spawn_timeboxed(_stats_worker, (2, str(tmp_path / "store"), str(tmp_path), third), nprocs=2, timeout=120)
    for rank in range(2):
        got, _ = read_safetensors(tmp_path / f"rank{rank}.safetensors")
        for key in [k for k in ref if k.startswith("state.")]:  # running stats of bn, cn (per context), ...
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
        assert int(got["state.cn.num_batches_tracked"]) == 2
        for key in [k for k in ref if k.startswith("grad.")]:  # DDP-averaged grads == joint-batch grads
            torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
        for name in [k[4:] for k in ref if k.startswith("out.")]:  # this rank's half of the joint output
            torch.testing.assert_close(got[f"out.{name}"], ref[f"out.{name}"][rank * 4:(rank + 1) * 4],
                                       rtol=1e-4, atol=1e-5)
    return ref


def test_synced_statistics_equal_joint_batch(tmp_path):
    """bn, cn (per-context statistics) and mode: 2 ranks x 4 samples == 1 process x 8 samples, over 2 SGD steps:
    running statistics, normalized outputs and (DDP-averaged) gradients. (ModeNorm's variance is computed around
    a shift that must be the same on every rank.)"""
    ref = compare_with_joint_batch(tmp_path, "mode")
    assert "state.third.running_weights" in ref and "out.third" in ref
    # and the statistics are not those of the half batch alone
    assert not torch.allclose(ref["state.bn.running_mean"], run_steps_half_alone()["state.bn.running_mean"])


def run_steps_half_alone():
    torch.manual_seed(0)
    return run_steps(Tiny("mode"), 0, 2)  # no process group: rank 0's half only


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_worker(rank, world, port, opts):
    from cbnorm.train import train

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    train(opts)  # exactly what torchrun gives the trainer: the env, nothing else


def test_trainer_under_two_ranks_follows_single_process(tmp_path):
    from cbnorm.train import train

    opts = dict(dataset="digits", norm="cn", contexts="kmeans:2", width=0.125, epochs=1, batch_size=64,
                optimizer="sgd", lr=0.05,  # Adam would turn float-noise gradients (~0) into lr-sized steps
                limit_train=384, quiet=True, snapshot_every=0, device="cpu")
    spawn_timeboxed(_train_worker, (2, _free_port(), {**opts, "out": str(tmp_path / "ddp")}), nprocs=2, timeout=180)
    single = train({**opts, "out": str(tmp_path / "single")})
    md = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    ms = json.loads((single / "metrics.json").read_text())
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["training"]["world_size"] == 2
    assert [s for s, _ in md["loss"]] == [s for s, _ in ms["loss"]] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([l for _, l in md["loss"]]), torch.tensor([l for _, l in ms["loss"]]),
                               rtol=1e-4, atol=1e-4)
    assert abs(md["test_acc"] - ms["test_acc"]) <= 1 / 360 + 1e-9  # at most one test image flips
    wd, _ = read_safetensors(tmp_path / "ddp" / "model.safetensors")
    ws, _ = read_safetensors(single / "model.safetensors")
    for k in ws:
        torch.testing.assert_close(wd[k].float(), ws[k].float(), rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")


def _acn_init_worker(rank, world, init_file, out_dir):
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        layer = cbnorm.build_norm("acn", 4, num_components=2, init="data")
        g = torch.Generator().manual_seed(rank)  # each rank sees different data in its first step
        layer(torch.randn(6, 4, 3, 3, generator=g) * (1 + rank) + 5 * rank)
        save_file({k: v.detach().contiguous() for k, v in layer.state_dict().items()},
                  os.path.join(out_dir, f"acn{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_acn_data_init_is_broadcast_from_rank_0(tmp_path):
    """ACN's data-dependent initialisation fits on each rank's own minibatch; every rank must start from the
    same components (rank 0's), or DDP would train different models."""
    spawn_timeboxed(_acn_init_worker, (2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, timeout=120)
    s0, _ = read_safetensors(tmp_path / "acn0.safetensors")
    s1, _ = read_safetensors(tmp_path / "acn1.safetensors")
    assert int(s0["data_initialized"]) == int(s1["data_initialized"]) == 1
    for key in ("logits", "mean", "log_var"):
        torch.testing.assert_close(s1[key], s0[key], msg=lambda m: f"{key}: {m}")
    torch.manual_seed(0)
    alone = cbnorm.build_norm("acn", 4, num_components=2, init="data")  # rank 0's data, one process
    alone(torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(s0["mean"], alone.mean.detach())


def test_repeated_two_rank_runs_tear_down_without_hanging(tmp_path):
    """The DDP wrapper is released before the process group is destroyed, in the trainer (``_Dist.close``) and
    in the workers: two two-rank trainer runs and two synced-statistics runs in a row, each time-boxed (a
    rank stuck in ``ProcessGroupGloo``'s destructor fails with its native stack instead of hanging)."""
    opts = dict(dataset="digits", norm="bn", width=0.125, epochs=1, batch_size=64, optimizer="sgd", lr=0.05,
                limit_train=128, quiet=True, snapshot_every=0, device="cpu", eval_batch_size=512)
    for i in range(2):
        out = tmp_path / f"ddp{i}"
        spawn_timeboxed(_train_worker, (2, _free_port(), {**opts, "out": str(out)}), nprocs=2, timeout=90)
        assert json.loads((out / "config.json").read_text())["training"]["world_size"] == 2
        assert len(json.loads((out / "metrics.json").read_text())["loss"]) == 2
    for i in range(2):
        d = tmp_path / f"stats{i}"
        d.mkdir()
        spawn_timeboxed(_stats_worker, (2, str(d / "store"), str(d)), nprocs=2, timeout=60)
        assert (d / "rank0.safetensors").is_file() and (d / "rank1.safetensors").is_file()

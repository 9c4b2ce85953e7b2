import os

import pytest
import torch

# one thread: the test models are tiny, and with 2 threads OpenMP spin-waits make them ~8x slower on shared cores
torch.set_num_threads(int(os.environ.get("CBNORM_TEST_THREADS", "1")))

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

K_CONTEXTS = 3

# one entry per registry name: constructor keywords used by the generic tests
LAYER_KWARGS = {
    "bn": {},
    "ln": {},
    "gn": {"num_groups": 2},
    "mn": {"num_components": 3},
    "mode": {"num_components": 3},
    "cn": {"num_contexts": K_CONTEXTS},
    "cnx": {"num_contexts": K_CONTEXTS},
    "cn-embed": {"num_contexts": K_CONTEXTS},
    "acn": {"num_components": 3},
}


def make_layer(name, c=4, **kw):
    import cbnorm

    args = dict(LAYER_KWARGS[name])
    args.update(kw)
    return cbnorm.build_norm(name, c, **args)


def contexts_for(n, device="cpu", k=K_CONTEXTS):
    """Deterministic context ids with every context present at least twice when n >= 2k."""
    return (torch.arange(n, device=device) % k).long()


def call(layer, x, context="auto"):
    if context == "auto":
        context = contexts_for(x.shape[0], x.device) if layer.uses_context else None
    return layer(x, context=context)


def randomize(layer, seed=0):
    """Give affine/learned parameters non-trivial values so references check them too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))
    return layer


def warm_up(layer, c=4, steps=3, n=12, hw=(3, 3), seed=0, dtype=torch.float32):
    """A few training steps so running statistics / queues are filled."""
    g = torch.Generator().manual_seed(seed)
    layer.train()
    for _ in range(steps):
        x = torch.randn(n, c, *hw, generator=g, dtype=dtype) * 2 + 1
        call(layer, x)
    return layer


def native_stacks(pids) -> str:
    """The native + Python stacks of ``pids`` (``py-spy dump --native``), for the message of a hung test."""
    import shutil
    import subprocess

    spy = shutil.which("py-spy")
    if spy is None:
        return "(py-spy is not installed: no stacks)"
    out = []
    for pid in pids:
        try:
            r = subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True,
                               timeout=30)
            out.append(f"--- pid {pid} ---\n{r.stdout}{r.stderr}")
        except (OSError, subprocess.SubprocessError) as err:
            out.append(f"--- pid {pid}: py-spy failed: {err}")
    return "\n".join(out)


def spawn_timeboxed(fn, args=(), nprocs: int = 2, timeout: float = 120.0) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` that fails instead of hanging: when the ranks have not
    all exited after ``timeout`` seconds, their native stacks are dumped into the failure and they are killed.
    (``mp.spawn(join=True)`` waits forever for a rank stuck, e.g., in a process group's destructor.)"""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() > deadline:
            alive = [p.pid for p in ctx.processes if p.is_alive()]
            stacks = native_stacks(alive)
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"spawned ranks {alive} still running after {timeout:.0f} s; their stacks:\n{stacks}",
                        pytrace=False)

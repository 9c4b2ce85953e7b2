"""bench/reproduce_mn.py with ``--dataset cifar10``: the MN paper's full protocol, run end to end on a tiny
CIFAR-10 made here (the paper's data is not on this machine), and the protocol every run records."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from test_data import cifar_records as _records

ROOT = Path(__file__).resolve().parents[1]


def test_cifar10_protocol_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for i in range(1, 6):  # 5 batches of 60 images, every class 6 times: 300 > the batch of 256
        labels = np.tile(np.arange(10), 6)
        (folder / f"data_batch_{i}.bin").write_bytes(
            _records(rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8), labels))
    (folder / "test_batch.bin").write_bytes(
        _records(rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), np.tile(np.arange(10), 4)))
    out = tmp_path / "reproduce.json"
    cmd = [sys.executable, str(ROOT / "bench" / "reproduce_mn.py"), "--dataset", "cifar10", "--epochs", "2",
           "--width", "0.125", "--norms", "bn,mn", "--seeds", "0", "--eval-every", "1",
           "--eval-subset", "20", "--jobs", "2", "--runs", str(tmp_path / "runs"), "--out", str(out)]
    env = {"CBNORM_DATA": str(tmp_path / "data"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert not result["failed"] and set(result["runs"]) == {"small/bn/seed0", "small/mn/seed0", "large/bn/seed0",
                                                            "large/mn/seed0"}
    for setting, lr in (("small", 0.01), ("large", 0.05)):
        for norm in ("bn", "mn"):
            d = tmp_path / "runs" / setting / norm / "seed0"
            t = json.loads((d / "config.json").read_text())["training"]
            # the paper's protocol (Sec. 4.1): RMSprop 0.9, batch 256, wd 2e-5, lr x 0.93 every 2 epochs, conv3
            assert (t["dataset"], t["model"], t["layers"], t["optimizer"], t["momentum"], t["batch_size"],
                    t["weight_decay"], t["lr"], t["epochs"]) == ("cifar10", "shallow_cnn", "conv3", "rmsprop", 0.9,
                                                                 256, 2e-5, lr, 2)
            assert (t["schedule"], t["lr_factor"], t["lr_every"]) == ("exponential", 0.93, 2)
            assert t["limit_train"] is None  # any dataset but Fashion-MNIST: the whole training set, as the paper
            m = json.loads((d / "metrics.json").read_text())
            # every update evaluated on the 20-image subset, step 0 included; 0.93 applies from epoch 3 only
            steps = m["steps_done"]
            assert [e["step"] for e in m["evals"]] == list(range(steps + 1)) and all(e["n"] == 20 for e in m["evals"])
            assert steps >= 2 and m["lr"] == [[s, lr] for s in range(1, steps + 1)]
        mn_cfg = json.loads((tmp_path / "runs" / setting / "mn" / "seed0" / "config.json").read_text())
        # K = 3 and the paper's "EM iter." 2 = 1 k-means + 1 EM iteration (Sec. 4.1)
        assert mn_cfg["norm_kwargs"] == {"num_components": 3, "em_iters": 1, "kmeans_iters": 1}
    assert result["summary"]["settings"]["small"]["norms"]["mn"]["steps"] == list(range(steps + 1))
    assert result["protocol"]["common_args"][:2] == ["--dataset", "cifar10"]

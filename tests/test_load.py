"""bench/load.py, small: 2 Chromium sessions for ~15 s of random actions on the committed checkpoints/ must
hold to the end without an error, record their actions and the server's memory, write the JSON the README
describes, stop the server and remove the busy flag. Skipped without /usr/bin/chromium or Playwright.
Plus the script's parts that need no browser (upload files, memory of a process tree, the action table)."""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import load  # noqa: E402

pytestmark = pytest.mark.timeout(300)  # spawns servers and load sessions: a hang fails here with its stack


def test_upload_files_are_what_they_claim():
    from cbnorm.images import load_image

    files = load.upload_files(0)
    assert files["good"] and files["accepted"] and files["refused"]
    for f in files["good"] + files["accepted"]:
        img = load_image(f["buffer"])
        assert img.width >= 1 and img.height >= 1, f["name"]
    for f in files["refused"]:
        with pytest.raises(ValueError):
            load_image(f["buffer"])
    names = [f["name"] for kind in files.values() for f in kind]
    assert len(names) == len(set(names))  # the refusal check looks for the file's name


def _own_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_tree_rss_counts_the_process_and_its_children():
    import subprocess

    me = _own_rss()
    assert 0.5 * me < load.tree_rss(os.getpid()) < 4 * me + 200 * 2 ** 20
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(150 * 2**20); time.sleep(30)"])
    try:
        import time

        deadline = time.time() + 20
        while time.time() < deadline and load.tree_rss(child.pid) < 150 * 2 ** 20:
            time.sleep(0.1)
        assert load.tree_rss(child.pid) >= 150 * 2 ** 20
        assert load.tree_rss(os.getpid()) >= load.tree_rss(child.pid)  # the child is counted with its parent
    finally:
        child.kill()
        child.wait()
    assert load.tree_rss(child.pid) is None  # gone


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_tree_cpu_counts_cpu_seconds():
    import time

    before = load.tree_cpu(os.getpid())
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:
        sum(i * i for i in range(10_000))
    spent = load.tree_cpu(os.getpid()) - before
    assert 0.2 <= spent <= 5.0
    assert load.tree_cpu(os.getpid(), exclude=os.getpid()) == 0


def test_action_table_statistics():
    r = load.Report()
    for v in [1.0, 2.0, 3.0, 4.0, 100.0]:
        r.action(0, "a", v)
    r.action(1, "b", 0.5)
    rows = {row["action"]: row for row in r.table()}
    assert rows["a"] == {"action": "a", "count": 5, "median_s": 3.0, "p95_s": 100.0, "worst_s": 100.0,
                         "mean_s": 22.0}
    assert rows["b"]["count"] == 1 and rows["b"]["median_s"] == rows["b"]["worst_s"] == 0.5


@pytest.mark.slow
def test_two_sessions_under_load(tmp_path):
    pytest.importorskip("playwright.async_api")
    if not Path(load.CHROMIUM).exists():
        pytest.skip(f"{load.CHROMIUM} is missing (apt-get install chromium)")
    out, flag = tmp_path / "load.json", tmp_path / "busy"
    rc = load.main(["--sessions", "2", "--duration", "12", "--warmup", "first", "--out", str(out),
                    "--busy-flag", str(flag), "--think-min", "0.2", "--think-max", "0.8", "--action-timeout", "90",
                    "--sample", "2"])
    data = json.loads(out.read_text())
    s = data["summary"]
    assert not data["errors"], json.dumps(data["errors"], indent=1)[:3000]
    assert s["errors"] == 0
    assert s["sessions_started"] == 2 and s["sessions_alive_at_end"] == 2
    assert all(x["alive_at_end"] and x["actions"] >= 1 for x in data["sessions"]), data["sessions"]
    assert not flag.exists()  # the busy flag is removed
    # session 0 visited every page in the warm-up (--warmup first), session 1 opened the app; then random actions
    warm = {row["action"]: row for row in data["warm_up"]}
    assert warm["warm-up: open the app (home)"]["count"] == 2, warm
    for page in ("histograms", "evolution", "day_night", "compare"):
        assert warm[f"warm-up: first visit of {page}"]["count"] == 1, warm
    assert s["actions"] == sum(row["count"] for row in data["actions"]) >= 4
    for row in data["actions"] + data["warm_up"]:
        assert set(row) == {"action", "count", "median_s", "p95_s", "worst_s", "mean_s"}
        assert 0 < row["median_s"] <= row["p95_s"] <= row["worst_s"] < 90, row
    # memory: samples of the server's process tree, start after the warm-up, end after the last action
    assert s["memory_start_mb"] > 50 and s["memory_end_mb"] > 50
    assert s["memory_growth_pct"] == pytest.approx(100 * (s["memory_end_mb"] / s["memory_start_mb"] - 1), abs=0.1)
    phases = [m["phase"] for m in data["memory"]]
    assert "start (every session warmed up)" in phases and "end" in phases and phases.count("load") >= 3
    m = data["machine"]
    assert m["cpu_count"] == os.cpu_count() and len(m["loadavg_start"]) == 3 and m["cpu"]
    assert data["parameters"]["sessions"] == 2 and data["parameters"]["duration_s"] == 12
    assert s["server_cpu_s"] > 0 and s["browser_and_driver_cpu_s"] > 0
    assert s["server_cpu_s"] + s["browser_and_driver_cpu_s"] <= 1.2 * s["cores_s"]
    assert rc == (0 if s["goal_met"] else 1)
    assert s["goal_met"] == (s["memory_growth_pct"] < 20)  # no error and every session alive, checked above
    # the server's own count of its caches (its heap janitor writes it every 15 s; the warm-up takes longer)
    reports = [r for r in data["caches"].values() if r.get("caches")]
    assert reports and all({"cache", "kind", "entries", "mb"} <= set(c) for r in reports for c in r["caches"])
    assert any(c["cache"].startswith("cbnorm.app.") for r in reports for c in r["caches"])
    with socket.socket() as sock:  # the server is stopped
        sock.settimeout(2)
        assert sock.connect_ex(("127.0.0.1", data["parameters"]["port"])) != 0


# ----------------------------------------------------------------------------- the memory bounds it led to
class _FakeCached:
    def __init__(self):
        self.cleared = []

    def clear(self, *args):
        self.cleared.append(args)


def test_byte_budget_drops_least_recently_used_but_never_pinned_or_newest(monkeypatch):
    import numpy as np

    from cbnorm.app import shared as S

    monkeypatch.setitem(S.BUDGET_MB, "snapshot_features", 3)
    b, f = S._ByteBudget("snapshot_features"), _FakeCached()
    mb = lambda n: {"features": np.zeros(n * 2 ** 18, np.float32)}  # noqa: E731  (n MB)
    b.note(f, ("a",), mb(1))
    b.note(f, ("b",), mb(1))
    b.note(f, ("a",), mb(1))  # a used again: b is now the oldest
    b.note(f, ("c",), mb(1))
    assert f.cleared == [] and b.total() == 3 * 2 ** 20
    b.note(f, ("d",), mb(1))
    assert f.cleared == [("b",)] and list(b.entries) == [("a",), ("c",), ("d",)]
    with b.pinned([("a",), ("c",)]):
        b.note(f, ("e",), mb(2))  # over budget, but a and c are pinned and e is the newest
        assert f.cleared == [("b",), ("d",)] and b.total() == 4 * 2 ** 20
    assert f.cleared[-1] == ("a",) and b.total() == 3 * 2 ** 20  # unpinned: back within the budget
    b.note(f, ("big",), mb(10))  # larger than the whole budget: kept alone
    assert list(b.entries) == [("big",)]


def test_evolution_reruns_need_no_features_even_with_no_budget(monkeypatch):
    """A colour change or snapshot move reruns E.evolution with the same parameters: with a budget of 0 bytes
    every snapshot's features are dropped right after the projection, yet the rerun computes none."""
    from cbnorm.app import evolution as E
    from cbnorm.app import shared as S

    runs = ROOT / "checkpoints"
    if not (runs / "fmnist-bn" / "config.json").is_file():
        pytest.skip("needs the committed checkpoints/fmnist-bn")
    monkeypatch.setenv("CBNORM_RUNS", str(runs))
    monkeypatch.setitem(S.BUDGET_MB, "snapshot_features", 0)
    S.clear_caches()
    from cbnorm.app import activations as A

    calls = []
    real = A.capture
    monkeypatch.setattr(A, "capture", lambda *a, **k: calls.append(1) or real(*a, **k))
    run = S.run_by_name("fmnist-bn")
    p = E.EvolutionParams(run=str(run.path), layer=S.studied_layer(run), size=100, seed=5, max_snapshots=3)
    first = E.evolution(p)
    assert len(first["steps"]) == 3 and len(calls) == 3  # one model run per snapshot, none repeated
    assert S.cache_bytes()["snapshot_features"] == 0  # all dropped once the projection no longer pins them
    calls.clear()
    again = E.evolution(p)
    assert calls == []  # nothing recomputed
    assert all((a == b).all() for a, b in zip(first["coords"], again["coords"]))
    assert again["feature_dim"] == first["feature_dim"] and len(again["predictions"]) == 3
    S.clear_caches()


def _count_held(monkeypatch, budget):
    """Record (entries counted, keys pinned) after every note of ``budget``."""
    held = []
    real = budget.note

    def note(func, args, value):
        real(func, args, value)
        held.append((len(budget.entries), len(budget.pins)))

    monkeypatch.setattr(budget, "note", note)
    return held


def test_a_projection_holds_one_snapshots_features_at_a_time(monkeypatch):
    """Cluster evolution and the embedding grid project one snapshot at a time: with a budget of 0 bytes, the
    features held while 6 snapshots are projected never exceed two (PCA: the one projected and the newest;
    t-SNE: also the next, computed in the background), and the PCA equals the one fitted on all features at
    once (analysis.embed_snapshots)."""
    from dataclasses import replace

    import numpy as np

    from cbnorm import analysis
    from cbnorm.app import evolution as E
    from cbnorm.app import shared as S
    from cbnorm.app import source as SRC
    from cbnorm.app import training as T

    runs = ROOT / "checkpoints"
    if not (runs / "fmnist-bn" / "config.json").is_file():
        pytest.skip("needs the committed checkpoints/fmnist-bn")
    monkeypatch.setenv("CBNORM_RUNS", str(runs))
    monkeypatch.setitem(S.BUDGET_MB, "snapshot_features", 0)
    monkeypatch.setitem(S.BUDGET_MB, SRC.BUDGET, 0)
    S.clear_caches()
    T.clear_caches()
    run = S.run_by_name("fmnist-bn")
    layer = S.studied_layer(run)
    p = E.EvolutionParams(run=str(run.path), layer=layer, size=100, seed=5, max_snapshots=6)
    held = _count_held(monkeypatch, S.BUDGETS["snapshot_features"])
    ev = E.evolution(p)
    assert len(ev["steps"]) == 6 and max(e for e, _ in held) <= 2 and max(k for _, k in held) <= 1
    feats = [SRC.features(SRC.activations(str(run.path), S.device(), s, layer, 100, 5, every_position=True),
                          "output", pool=False) for s in ev["steps"]]
    whole = analysis.embed_snapshots(feats, "pca", seed=5)
    for a, b in zip(ev["coords"], whole.coords):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert ev["info"]["explained_variance_pct"] == whole.info["explained_variance_pct"]
    held.clear()
    E.evolution(replace(p, method="tsne", first_iters=50, refine_iters=10))
    assert max(e for e, _ in held) <= 3 and max(k for _, k in held) <= 2  # + the last, for the reducer
    held = _count_held(monkeypatch, S.BUDGETS[SRC.BUDGET])
    grid = T.embedding_grid(T.GridParams(runs=(str(run.path),), layer=layer, size=100, seed=5, columns=6))
    assert len(grid["rows"][0]["steps"]) == 6 and max(e for e, _ in held) <= 2 and max(k for _, k in held) <= 1
    S.clear_caches()
    T.clear_caches()


def test_cache_report_counts_what_each_cache_holds_and_the_janitor_writes_it(tmp_path, monkeypatch):
    """shared.cache_report: a data cache counted as its pickled bytes, a resource cache by its arrays,
    tensors and models (each once); the janitor's file is the same report, written whole."""
    import json

    import numpy as np
    import streamlit as st
    import torch

    from cbnorm.app import shared as S

    @st.cache_data(max_entries=4)
    def four_mb_data(n):
        return np.zeros(n * 2 ** 18, np.float32)

    @st.cache_resource(max_entries=4)
    def eight_mb_resource(n):
        a = np.zeros(n * 2 ** 18, np.float32)
        return {"a": a, "again": a, "t": torch.zeros(n * 2 ** 18), "m": torch.nn.Linear(1024, 1024, bias=False)}

    four_mb_data(4)
    eight_mb_resource(4)
    rows = {r["cache"].rsplit(".", 1)[-1]: r for r in S.cache_report()}
    assert rows["four_mb_data"]["kind"] == "data" and rows["four_mb_data"]["entries"] == 1
    assert 4.0 <= rows["four_mb_data"]["mb"] < 4.1  # the pickle: the array and a few header bytes
    assert rows["eight_mb_resource"]["entries"] == 1
    assert rows["eight_mb_resource"]["mb"] == 12.0  # 4 (a, once) + 4 (t) + 4 (the Linear's weight)
    out = tmp_path / "caches.json"
    monkeypatch.setenv(S.REPORT_ENV, str(out))
    S._write_cache_report()
    rep = json.loads(out.read_text())
    assert {r["cache"] for r in rep["caches"]} >= {rows["four_mb_data"]["cache"], rows["eight_mb_resource"]["cache"]}
    assert set(rep["budgets_mb"]) >= set(S.BUDGET_MB) and not (tmp_path / "caches.json.tmp").exists()
    four_mb_data.clear()
    eight_mb_resource.clear()

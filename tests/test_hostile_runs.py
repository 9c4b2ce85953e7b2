"""Hostile run directories beyond tests/test_runs.py: every case of bench.hostile.RUN_CASES is refused by
load_run with a ValueError and a message, nothing is unpickled, absurd sizes are refused before any memory
is allocated, and random damage to config.json / the safetensors header / metrics.json never escapes as
anything but ValueError.

Newly covered here (test_runs.py has the basic pickled / truncated / mismatched / ``..`` / absolute / symlinked
weights cases): headers claiming huge sizes, negative or non-integer shapes and offsets, unhashable dtypes,
overlapping tensors; transposed tensors and NaN weights; absurd widths / classes / contexts / ViT dims and
depths, zero patch size, heads not dividing dim, infinite or absurd image sizes; config.json, metrics.json
and the snapshots directory as symlinks leaving the run directory; metrics.json malformed, nested 100000
deep, not UTF-8, of the wrong types; empty directories and directories without files.
"""
import json
import pickle
import random
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import hostile  # noqa: E402
from cbnorm import runs  # noqa: E402
from cbnorm.runs import load_run  # noqa: E402

CASES = [(cat, name) for cat, named in hostile.RUN_CASES.items() for name in named]

#: message expected for some cases (the rest: any ValueError with a non-empty message)
MESSAGES = {
    "length_2**63": "not a safetensors file",
    "shape_2**40_squared": "truncated: tensors need",
    "negative_shape": "bad header entry",
    "string_offsets": "bad header entry",
    "list_dtype": "unsupported dtype",
    "overlapping_tensors": "corrupt",
    "transposed_tensor": r"head\.weight: \(\d+, 4\) in the file, \(4, \d+\) in the model",
    "nan_in_weights": r"NaN or inf values in 1 tensor\(s\) \(\['blocks\.conv3\.norm\.running_var'\]\)",
    "negative_running_var": r"negative values in 1 tensor\(s\) \(\['blocks\.conv3\.norm\.running_var'\]\)",
    "width_50": "over the limit of 100,000,000",
    "width_1e9": "cannot be built",
    "width_inf": "cannot be built",
    "num_classes_1e9": "over the limit",
    "num_classes_1e30": "cannot be built",
    "num_contexts_1e9": "over the limit",
    "vit_dim_1e6": "over the limit",
    "vit_depth_1e6": "depth 1000000, over the limit of 256",
    "vit_patch_0": "cannot be built",
    "vit_heads_not_dividing": "cannot be built",
    "image_size_1e9": "preprocessing' is inconsistent",
    "image_size_inf": "preprocessing' must hold",
    "model_name_list": "unknown model",
    "nested_100000_deep": "nested too deeply",
    "config_symlink_outside": r"config\.json .* outside the run directory",
    "metrics_symlink_outside": r"files\.metrics .* outside the run directory",
    "snapshots_dir_symlink_outside": r"files\.snapshots .* outside the run directory",
    "metrics_absolute": "relative path inside the run directory",
    "snapshots_dotdot": "relative path inside the run directory",
    "empty_directory": "config.json is missing",
    "only_subdirectories": "config.json is missing",
    "loss_not_a_list": "'loss' must be a list",
    "pickle_protocol_5": "Refusing to load it",
}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return hostile.make_template_run(tmp_path_factory.mktemp("hostile") / "template")


@pytest.fixture(autouse=True)
def nothing_is_unpickled(monkeypatch):
    def trap(*a, **k):
        raise AssertionError("something tried to unpickle")

    for mod, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load"),
                      (torch.serialization, "load")):
        monkeypatch.setattr(mod, name, trap)


def damaged(template, tmp_path, category, name):
    d = tmp_path / "run"
    shutil.copytree(template, d)
    hostile.RUN_CASES[category][name](d, tmp_path)
    return d


def test_template_loads_with_its_snapshots(template):
    assert hostile.check_load_run(template, snapshot=True, expect_refusal=False) == "accepted"


@pytest.mark.parametrize("category,name", CASES, ids=[f"{c}-{n}" for c, n in CASES])
def test_hostile_run_is_refused_with_a_message(template, tmp_path, category, name):
    d = damaged(template, tmp_path, category, name)
    assert hostile.check_load_run(d, snapshot=name in hostile.SNAPSHOT_CASES) == "refused"
    if name in MESSAGES:
        with pytest.raises(ValueError, match=MESSAGES[name]):
            run = load_run(d)
            for step, _ in run.snapshots:
                run.load_snapshot(step)


@pytest.mark.parametrize("name", ["width_50", "num_classes_1e9", "num_contexts_1e9", "vit_dim_1e6",
                                  "vit_depth_1e6", "width_1e9"])
def test_absurd_sizes_are_refused_before_allocating(template, tmp_path, monkeypatch, name):
    """Sizes are counted on the meta device: no real tensor larger than the template's own is created (a
    width of 50 used to allocate ~3 GB per conv, 1e9 raised RuntimeError from the allocator)."""
    d = damaged(template, tmp_path, "config", name)
    largest = [0]
    for fn in ("empty", "zeros", "ones", "full", "randn", "rand", "tensor", "as_tensor"):
        orig = getattr(torch, fn)

        def wrapped(*a, _orig=orig, **k):
            t = _orig(*a, **k)
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                largest[0] = max(largest[0], t.numel())
            return t
        monkeypatch.setattr(torch, fn, wrapped)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="over the limit|cannot be built"):
        load_run(d)
    assert time.perf_counter() - t0 < 5.0
    assert largest[0] < 10_000


def test_size_limits_are_checked_before_reading(template, tmp_path, monkeypatch):
    d = damaged(template, tmp_path, "empty", "no_config")  # any copy
    shutil.copy(template / "config.json", d / "config.json")
    monkeypatch.setattr(runs, "MAX_JSON_BYTES", 100)
    with pytest.raises(ValueError, match=r"config\.json .* bytes, over the limit of 100"):
        load_run(d)
    monkeypatch.setattr(runs, "MAX_JSON_BYTES", 1 << 20)
    monkeypatch.setattr(runs, "MAX_SAFETENSORS_BYTES", 1000)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read {self} despite its size"))
    with pytest.raises(ValueError, match=r"model\.safetensors .* over the limit of 1000"):
        load_run(d)


def test_the_unpickling_trap_is_armed():
    with pytest.raises(AssertionError, match="unpickle"):
        pickle.loads(pickle.dumps(1))
    with pytest.raises(AssertionError, match="unpickle"):
        torch.load("whatever.pt", weights_only=True)  # the trap refuses even the safe form
    with hostile.no_unpickling(), pytest.raises(hostile.ContractViolation):
        pickle.loads(b"")


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32))
def test_random_damage_is_loaded_or_refused(template, tmp_path, seed):
    """Random edits of config.json, the safetensors header (and length) and metrics.json: a Run or a
    ValueError, never anything else (a list as model name, string offsets, ... used to raise TypeError)."""
    d = tmp_path / f"r{seed}"
    hostile.random_run_mutation(template, d, random.Random(seed))
    try:
        assert hostile.check_load_run(d, snapshot=True, expect_refusal=False) in ("accepted", "refused")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("entry", [{"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]},
                                   {"dtype": {"a": 1}, "shape": [4], "data_offsets": [0, 16]},
                                   {"dtype": "F32", "shape": [4], "data_offsets": [0, None]},
                                   {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]},
                                   {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]},
                                   {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]},
                                   ["F32", [4], [0, 16]]])
def test_read_safetensors_refuses_malformed_entries(tmp_path, entry):
    header = json.dumps({"t": entry}).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(ValueError, match=r"x\.safetensors .*(bad header entry|unsupported dtype)"):
        runs.read_safetensors(p)

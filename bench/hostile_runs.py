"""Hostile-input cases for the run loader (``cbnorm.load_run``): a template run and its tampered copies,
unpickling trapped, random mutations of config.json and of safetensors headers (bench/hostile.py's docstring).
"""
from __future__ import annotations

import contextlib
import copy
import json
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cbnorm import runs  # noqa: E402
from bench.hostile_common import ContractViolation  # noqa: E402


# ============================================================================================ runs
TEMPLATE_CONFIG: dict = {
    "format_version": 1, "task": "classify",
    "model": {"name": "shallow_cnn", "kwargs": {"in_channels": 1, "num_classes": 4, "width": 0.0625}},
    "norm": "cn", "norm_kwargs": {"num_contexts": 2, "priors": [0.6, 0.4]},
    "layers": ["conv3"], "input_norm": None,
    "dataset": {"name": "fashion-mnist", "limit_train": None, "limit_test": None, "subset_seed": 0},
    "contexts": {"spec": "superclass", "num_contexts": 2, "names": ["a", "b"], "label_derived": True,
                 "label_to_context": [0, 1, 0, 1], "kmeans": None},
    "class_names": ["w", "x", "y", "z"],
    "preprocessing": {"channels": 1, "image_size": [8, 8], "mean": [0.5], "std": [0.25]},
    "training": {"epochs": 1}, "files": dict(runs.DEFAULT_FILES),
}


def make_template_run(path: Path) -> Path:
    """A small valid run directory (cn at conv3 of a tiny CNN) with two snapshots."""
    cfg = copy.deepcopy(TEMPLATE_CONFIG)
    torch.manual_seed(0)
    model = runs.build_model_from_config(cfg).train()
    runs.save_snapshot(path, model, 0)
    for _ in range(2):
        model(torch.randn(8, 1, 8, 8), context=torch.arange(8) % 2)
    runs.save_run(path, cfg, model.eval(), {"loss": [[1, 1.4]], "epochs": [], "test_acc": 0.25})
    runs.save_snapshot(path, model, 2)
    return path


def _edit_config(d: Path, fn: Callable[[dict], Any]) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _set_header(d: Path, fn: Callable[[dict], Any], name: str = "model.safetensors") -> None:
    w = d / name
    data = w.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    fn(header)
    h = json.dumps(header).encode()
    w.write_bytes(len(h).to_bytes(8, "little") + h + data[8 + n:])


def _first_tensor(header: dict) -> dict:
    return header[next(k for k in sorted(header) if k != "__metadata__")]


def _torch_save(d: Path, legacy: bool) -> None:
    torch.save({"w": torch.zeros(3)}, d / "model.safetensors", _use_new_zipfile_serialization=not legacy)


def _symlink_weights(d: Path, tmp: Path) -> None:
    outside = tmp / "outside.safetensors"
    shutil.copy(d / "model.safetensors", outside)
    (d / "link.safetensors").symlink_to(outside)
    _edit_config(d, lambda c: c["files"].update(weights="link.safetensors"))


def _symlink_file(name: str):
    """A case that moves the run's ``name`` outside the run and leaves a symlink to it in its place."""
    def case(d: Path, tmp: Path) -> None:
        outside = tmp / f"outside_{name}"
        shutil.copy(d / name, outside)
        (d / name).unlink()
        (d / name).symlink_to(outside)
    return case


def _symlink_snapshots_dir(d: Path, tmp: Path) -> None:
    outside = tmp / "outside_snapshots"
    shutil.copytree(d / "snapshots", outside)
    shutil.rmtree(d / "snapshots")
    (d / "snapshots").symlink_to(outside, target_is_directory=True)


def _empty_dir(d: Path, tmp: Path) -> None:
    shutil.rmtree(d)
    d.mkdir()


def _only_subdirs(d: Path, tmp: Path) -> None:
    shutil.rmtree(d)
    (d / "snapshots").mkdir(parents=True)


def _nan_running_var(d: Path, tmp: Path) -> None:
    tensors, meta = runs.read_safetensors(d / "model.safetensors")
    tensors["blocks.conv3.norm.running_var"][0, 0] = float("nan")
    runs._save_safetensors(d / "model.safetensors", tensors, meta)


def _negative_running_var(d: Path, tmp: Path) -> None:
    tensors, meta = runs.read_safetensors(d / "model.safetensors")
    tensors["blocks.conv3.norm.running_var"][0, 1] = -2.0
    runs._save_safetensors(d / "model.safetensors", tensors, meta)


def _swap_shapes(d: Path, tmp: Path) -> None:
    tensors, meta = runs.read_safetensors(d / "model.safetensors")
    tensors["head.weight"] = tensors["head.weight"].t().contiguous()  # same bytes, transposed shape
    runs._save_safetensors(d / "model.safetensors", tensors, meta)


def _bytes_case(fn: Callable[[bytes], bytes], name: str = "model.safetensors"):
    def apply(d: Path, tmp: Path) -> None:
        p = d / name
        p.write_bytes(fn(p.read_bytes()))
    return apply


def _cfg_case(fn: Callable[[dict], Any]):
    return lambda d, tmp: _edit_config(d, fn)


def _hdr_case(fn: Callable[[dict], Any]):
    return lambda d, tmp: _set_header(d, fn)


def _write(name: str, text: bytes):
    def apply(d: Path, tmp: Path) -> None:
        (d / name).write_bytes(text)
    return apply


#: category -> {case name: function(run_dir, tmp_dir) that damages a copy of the template run}
RUN_CASES: dict[str, dict[str, Callable[[Path, Path], None]]] = {
    "pickled": {
        "torch_save_zip": lambda d, tmp: _torch_save(d, legacy=False),
        "torch_save_legacy": lambda d, tmp: _torch_save(d, legacy=True),
        "pickle_protocol_0": _write("model.safetensors", pickle.dumps({"a": 1}, protocol=0)),
        "pickle_protocol_2": _write("model.safetensors", pickle.dumps({"a": 1}, protocol=2)),
        "pickle_protocol_5": _write("model.safetensors", pickle.dumps({"a": [1.0] * 8}, protocol=5)),
        "pickle_as_snapshot": lambda d, tmp: (d / "snapshots" / "step_000002.safetensors").write_bytes(
            pickle.dumps({"a": 1}, protocol=4)),
    },
    "truncated": {
        "empty_file": _write("model.safetensors", b""),
        "4_bytes": _bytes_case(lambda b: b[:4]),
        "inside_header": _bytes_case(lambda b: b[:40]),
        "inside_data": _bytes_case(lambda b: b[:len(b) - 17]),
        "one_byte_short": _bytes_case(lambda b: b[:-1]),
    },
    "header": {
        "length_2**63": _bytes_case(lambda b: (2**63).to_bytes(8, "little") + b[8:]),
        "length_2**64-1": _bytes_case(lambda b: b"\xff" * 8 + b[8:]),
        "length_zero": _bytes_case(lambda b: (0).to_bytes(8, "little") + b[8:]),
        "shape_2**40_squared": _hdr_case(lambda h: _first_tensor(h).update(
            shape=[2**40, 2**40], data_offsets=[0, 2**80 * runs._ITEMSIZE[_first_tensor(h)["dtype"]]])),
        "offsets_past_end": _hdr_case(lambda h: _first_tensor(h).update(
            data_offsets=[10**12, 10**12 + 8 * max(1, int(np.prod(_first_tensor(h)["shape"])))])),
        "negative_offsets": _hdr_case(lambda h: _first_tensor(h).update(data_offsets=[-8, 0])),
        "negative_shape": _hdr_case(lambda h: _first_tensor(h).update(shape=[-2, -2])),
        "string_offsets": _hdr_case(lambda h: _first_tensor(h).update(data_offsets=["0", "8"])),
        "float_shape": _hdr_case(lambda h: _first_tensor(h).update(shape=[2.5])),
        "list_dtype": _hdr_case(lambda h: _first_tensor(h).update(dtype=["F32"])),
        "unknown_dtype": _hdr_case(lambda h: _first_tensor(h).update(dtype="F8_E4M3")),
        "overlapping_tensors": _hdr_case(lambda h: [v.update(data_offsets=[0, v["data_offsets"][1]
                                                                           - v["data_offsets"][0]])
                                                    for k, v in h.items() if k != "__metadata__"]),
        "metadata_not_strings": _hdr_case(lambda h: h.update(__metadata__={"format": 1})),
        "header_is_list": _bytes_case(lambda b: (2).to_bytes(8, "little") + b"[]" + b[8 + int.from_bytes(b[:8], "little"):]),
        "header_not_utf8": _bytes_case(lambda b: b[:8] + b"{\xff\xfe" + b[11:]),
    },
    "architecture": {
        "wider_model": _cfg_case(lambda c: c["model"]["kwargs"].update(width=0.125)),
        "more_classes": _cfg_case(lambda c: c["model"]["kwargs"].update(num_classes=5)),
        "other_norm": _cfg_case(lambda c: c.update(norm="bn")),
        "more_contexts": _cfg_case(lambda c: c["norm_kwargs"].update(num_contexts=3, priors=None)),
        "more_norm_layers": _cfg_case(lambda c: c.update(layers=["conv2", "conv3"])),
        "vit_instead": _cfg_case(lambda c: c["model"].update(name="vit", kwargs={"in_channels": 1, "num_classes": 4,
                                                                                 "image_size": 8})),
        "transposed_tensor": _swap_shapes,
        "nan_in_weights": _nan_running_var,
        "negative_running_var": _negative_running_var,
    },
    "config": {
        "unknown_norm": _cfg_case(lambda c: c.update(norm="supernorm")),
        "unknown_model": _cfg_case(lambda c: c["model"].update(name="resnet50")),
        "model_name_list": _cfg_case(lambda c: c["model"].update(name=["vit"])),
        "width_1e9": _cfg_case(lambda c: c["model"]["kwargs"].update(width=1e9)),
        "width_50": _cfg_case(lambda c: c["model"]["kwargs"].update(width=50)),
        "width_inf": _cfg_case(lambda c: c["model"]["kwargs"].update(width=float("inf"))),
        "num_classes_1e9": _cfg_case(lambda c: c["model"]["kwargs"].update(num_classes=10**9)),
        "num_classes_1e30": _cfg_case(lambda c: c["model"]["kwargs"].update(num_classes=10**30)),
        "num_classes_negative": _cfg_case(lambda c: c["model"]["kwargs"].update(num_classes=-3)),
        "num_contexts_1e9": _cfg_case(lambda c: c["norm_kwargs"].update(num_contexts=10**9, priors=None)),
        "vit_dim_1e6": _cfg_case(lambda c: c["model"].update(name="vit", kwargs={"in_channels": 1, "num_classes": 4,
                                                                                 "image_size": 8, "dim": 10**6})),
        "vit_depth_1e6": _cfg_case(lambda c: c["model"].update(name="vit", kwargs={
            "in_channels": 1, "num_classes": 4, "image_size": 8, "depth": 10**6})),
        "vit_patch_0": _cfg_case(lambda c: c["model"].update(name="vit", kwargs={
            "in_channels": 1, "num_classes": 4, "image_size": 8, "patch_size": 0})),
        "vit_heads_not_dividing": _cfg_case(lambda c: c["model"].update(name="vit", kwargs={
            "in_channels": 1, "num_classes": 4, "image_size": 8, "dim": 10, "heads": 3})),
        "image_size_1e9": _cfg_case(lambda c: c["preprocessing"].update(image_size=[10**9, 10**9])),
        "image_size_inf": _cfg_case(lambda c: c["preprocessing"].update(image_size=[float("inf"), 8])),
        "std_zero": _cfg_case(lambda c: c["preprocessing"].update(std=[0.0])),
        "priors_negative": _cfg_case(lambda c: c["norm_kwargs"].update(priors=[-1.0, 2.0])),
        "format_version_99": _cfg_case(lambda c: c.update(format_version=99)),
        "not_an_object": _write("config.json", b"[1, 2, 3]"),
        "malformed_json": _write("config.json", b'{"format_version": 1,,}'),
        "nested_100000_deep": _write("config.json", b"[" * 100_000 + b"]" * 100_000),
        "not_utf8": _write("config.json", b"\xff\xfe{\x00}"),
    },
    "paths": {
        "weights_dotdot": _cfg_case(lambda c: c["files"].update(weights="../outside.safetensors")),
        "weights_nested_dotdot": _cfg_case(lambda c: c["files"].update(weights="snapshots/../../x.safetensors")),
        "weights_absolute": _cfg_case(lambda c: c["files"].update(weights="/etc/passwd")),
        "weights_windows_drive": _cfg_case(lambda c: c["files"].update(weights="C:\\weights.safetensors")),
        "metrics_dotdot": _cfg_case(lambda c: c["files"].update(metrics="../metrics.json")),
        "metrics_absolute": _cfg_case(lambda c: c["files"].update(metrics="/proc/self/environ")),
        "snapshots_dotdot": _cfg_case(lambda c: c["files"].update(snapshots="..")),
        "snapshots_absolute": _cfg_case(lambda c: c["files"].update(snapshots="/tmp")),
        "weights_symlink_outside": _symlink_weights,
        "config_symlink_outside": _symlink_file("config.json"),
        "metrics_symlink_outside": _symlink_file("metrics.json"),
        "snapshots_dir_symlink_outside": _symlink_snapshots_dir,
        "snapshot_symlink_outside": lambda d, tmp: (
            shutil.copy(d / "model.safetensors", tmp / "snap.safetensors"),
            (d / "snapshots" / "step_000099.safetensors").symlink_to(tmp / "snap.safetensors")),
        "files_not_object": _cfg_case(lambda c: c.update(files=["model.safetensors"])),
        "weights_empty_path": _cfg_case(lambda c: c["files"].update(weights="")),
    },
    "metrics": {
        "malformed_json": _write("metrics.json", b'{"loss": [[1, 2.0],]}'),
        "not_an_object": _write("metrics.json", b"[]"),
        "loss_not_a_list": _write("metrics.json", b'{"loss": "low"}'),
        "epochs_not_a_list": _write("metrics.json", b'{"epochs": 3}'),
        "nested_100000_deep": _write("metrics.json", b'{"loss": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "not_utf8": _write("metrics.json", b'{"loss": "\xff"}'),
        "empty_file": _write("metrics.json", b""),
        "missing": lambda d, tmp: (d / "metrics.json").unlink(),
    },
    "empty": {
        "empty_directory": _empty_dir,
        "only_subdirectories": _only_subdirs,
        "no_weights": lambda d, tmp: (d / "model.safetensors").unlink(),
        "no_config": lambda d, tmp: (d / "config.json").unlink(),
        "weights_is_a_directory": lambda d, tmp: ((d / "model.safetensors").unlink(),
                                                  (d / "model.safetensors").mkdir()),
    },
}
#: cases refused only when the snapshot is opened (Run.load_snapshot), not by load_run itself
SNAPSHOT_CASES = {"pickle_as_snapshot"}


@contextlib.contextmanager
def no_unpickling():
    """Make every unpickling entry point raise ContractViolation for the duration."""
    def trap(*a, **k):
        raise ContractViolation("something tried to unpickle")

    class TrapUnpickler:
        def __init__(self, *a, **k):
            trap()

    saved = (pickle.loads, pickle.load, pickle.Unpickler, torch.load)
    pickle.loads, pickle.load, pickle.Unpickler, torch.load = trap, trap, TrapUnpickler, trap
    try:
        yield
    finally:
        pickle.loads, pickle.load, pickle.Unpickler, torch.load = saved


def check_load_run(run_dir: Path, *, snapshot: bool = False, expect_refusal: bool = True) -> str:
    """``"refused"`` (ValueError with a message) or ``"accepted"``; ContractViolation when a case that must be
    refused loads, or when anything but ValueError escapes. ``snapshot``: also open every snapshot."""
    try:
        with no_unpickling():
            run = runs.load_run(run_dir)
            if snapshot:
                for step, _ in run.snapshots:
                    run.load_snapshot(step)
    except ValueError as err:
        if not str(err).strip():
            raise ContractViolation("load_run raised ValueError with an empty message") from None
        return "refused"
    if expect_refusal:
        raise ContractViolation(f"{run_dir} was loaded but must be refused")
    return "accepted"


# ------------------------------------------------------------------------------- random run mutations
_JSON_VALUES = [None, True, False, 0, -1, 1, 2, 3, 10**9, 10**30, 1e9, 1.5, -1e300, float("nan"), float("inf"),
                "", "x", "cn", "bn", "vit", "..", "/etc/passwd", [], [1], ["conv3"], [[1]], {}, {"a": 1},
                {"name": "vit"}, [0.5], "daynight", "classify", 0.0, 1e-300, [2**63, 0], "F32", "I64", [-2, 2]]


def _json_paths(o: Any, pre: tuple = ()):
    yield pre
    if isinstance(o, dict):
        for k, v in o.items():
            yield from _json_paths(v, pre + (k,))
    elif isinstance(o, list):
        for i, v in enumerate(o[:4]):
            yield from _json_paths(v, pre + (i,))


def mutate_json(obj: Any, r: random.Random, edits: int = 3) -> Any:
    """A deep copy of ``obj`` with 1..``edits`` random values replaced, keys dropped or list items added."""
    obj = json.loads(json.dumps(obj))
    for _ in range(r.randint(1, edits)):
        paths = [p for p in _json_paths(obj) if p]
        if not paths:
            break
        p = r.choice(paths)
        parent = obj
        for k in p[:-1]:
            parent = parent[k]
        value = json.loads(json.dumps(r.choice(_JSON_VALUES)))
        if r.random() < 0.8:
            parent[p[-1]] = value
        elif isinstance(parent, dict):
            parent.pop(p[-1], None)
        else:
            parent.append(value)
    return obj


def random_run_mutation(template: Path, d: Path, r: random.Random) -> str:
    """Copy ``template`` to ``d`` and damage it at random (config, safetensors header, or bytes); the kind."""
    shutil.copytree(template, d)
    kind = r.choice(["config", "config", "header", "header", "bytes", "metrics"])
    if kind == "config":
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(mutate_json(cfg, r)))
    elif kind == "header":
        _set_header(d, lambda h: h.update(mutate_json(h, r)))
        if r.random() < 0.3:
            w = d / "model.safetensors"
            b = w.read_bytes()
            w.write_bytes(b[:r.randrange(len(b))] if r.random() < 0.5 else b + bytes(r.randrange(64)))
    elif kind == "metrics":
        m = json.loads((d / "metrics.json").read_text())
        (d / "metrics.json").write_text(json.dumps(mutate_json(m, r)))
    else:
        w = d / "model.safetensors"
        b = bytearray(w.read_bytes())
        for _ in range(r.randint(1, 16)):
            b[r.randrange(min(len(b), 400))] = r.randrange(256)  # mostly in the header
        w.write_bytes(bytes(b))
    return kind

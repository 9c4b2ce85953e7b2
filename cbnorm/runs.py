"""The run-directory format: what ``cbnorm.watch`` and ``python -m cbnorm.train`` write and ``cbnorm.load_run``
reads.

Format version 2 (this one) adds what ``cbnorm.watch`` records from any training loop (``cbnorm.record``);
version 1 runs (no recording) load unchanged::

    config.json              format_version 2; "recorder": {"by": "cbnorm.watch", "cbnorm_version", "every",
                             "early_steps", "mode", "values_per_channel", "seed", "probe": {"n", "shape", "dtype",
                             "labels", "context"}, "layers": [{"path", "class", "kind", "width", "has_mixture",
                             "uses_context", "num_components", "channel_last"}, ...]}. A user's model that cbnorm
                             cannot rebuild: task "record", "model": {"class", "module"}, "hyperparameters",
                             "class_names" (or null), "contexts" (or null). Our trainer: its own config (below) with
                             the recorder section added.
    metrics.jsonl            append-only scalar lines {"step": int, "wall": unix time, name: value, ...}; a torn
                             last line (a killed process) is skipped on reading
    summaries/step_XXXXXXXX.safetensors
                             one file per probe step, written whole (temporary file + rename): per recorded layer
                             "<path>::input" / "::x_hat" / "::output" (C, M) values at fixed positions
                             ("::positions" (M,)), "::pooled_input" / "::pooled_x_hat" / "::pooled_output" (N, C)
                             per-sample channel means, "::mixture_weights" / "::mixture_means" / "::mixture_vars"
                             (K, C) where the layer has its own mixture, "::components" (N,), "::nonfinite" (3,)
                             counts; "predictions", "labels", "context" (N,) of the probe batch. Float16 (float32
                             where float16 would overflow); metadata {"format": "cbnorm-summary", "step", "wall",
                             "layers", "mode"}.
    status.json              {"state": "running" | "finished", "pid", "host", "time", "last_step"}; a run left
                             "running" with nothing written for STALE_SECONDS reads as "stopped"

Format version 1 (our trainers' files, still written beside the above)::

    config.json              how to rebuild the model and its inputs (see below); no git information
    metrics.json             per-step loss, per-epoch records, summary (test_acc, test_acc_oracle, ...)
    model.safetensors        the weights: every parameter AND buffer of ``model.state_dict()``, float32
    snapshots/step_000200.safetensors
                             float16 copies of the float tensors at that step (integers kept as they are;
                             a tensor that float16 cannot hold, e.g. > 65504, stays float32); step 0 is
                             the initialisation. For the cluster-evolution view.
    resume.safetensors       written by the trainer at the end of each epoch: model, optimizer tensors and
                             RNG states, with the rest of the trainer state (optimizer param_groups, epoch,
                             step, ...) as JSON in the safetensors metadata; one file, so it is always
                             consistent with itself.

Nothing is ever unpickled: tensors are read with ``safetensors`` only, after their header has been checked
here (a pickled or ``torch.save`` file renamed ``.safetensors`` is refused with a message saying so).

``config.json`` keys::

    format_version   1
    task             "classify" | "daynight" | "gan" (gan: cbnorm.train.gan; model = the generator "dcgan" of
                     cbnorm.models.GAN_MODELS, "latent" {"dim", "num_fixed"} and "evaluation" instead of
                     contexts, class_names = the feature classifier's classes; cbnorm.models.dcgan.check_gan_config.
                     daynight: day<->night translators of cbnorm.train.daynight: no class_names;
                     "contexts" {"names": ["day", "night"], "num_contexts": 2, ...}, "renderer" (the
                     cbnorm.daynight.NightParams of the night context) and "translator" ("input" | "feature")
                     are required; model "daynight_siamese" | "daynight_ae" of cbnorm.models.DAYNIGHT_MODELS)
    cbnorm_version   version of the library that wrote it (informative)
    model            {"name": "shallow_cnn" | "vit" | "resnet20" | "resnet56" | "densenet40" | "densenet_bc100"
                      (cbnorm.models.MODELS), "kwargs": architecture keywords (in_channels, num_classes,
                      width / image_size, patch_size, dim, growth_rate, ...); the norm keywords below are
                      merged in by build_model_from_config}
    norm             canonical norm name of the studied layers ("acn", "cn", ...)
    norm_kwargs      keywords of those layers (num_components, num_contexts, priors, ...), JSON values
    layers           which layers carry ``norm``: block names for the CNN (["conv3"] = blocks.conv3.norm),
                     ["patch_norm"] for the ViT, fnmatch patterns on module paths for the ResNets and
                     DenseNets (["layer3.*"], ["transition*", "final"]; cbnorm.convert.select_layers)
    input_norm       norm on the image channels in front of the CNN, or null
    dataset          {"name", "train_samples", "test_samples", "limit_train", "limit_test", "subset_seed"}
    contexts         {"spec": "superclass" | "kmeans:K" | "none" | "domain", "num_contexts", "names",
                      "label_derived": bool, "label_to_context": [context id of each class] or null,
                      "kmeans": KMeansContexts.state_dict() or null}
    class_names      list of the class names, in label order
    preprocessing    {"channels", "image_size": [H, W], "mean": [per channel], "std": [per channel]}:
                     x = (uint8 / 255 - mean) / std
    training         the trainer's arguments (epochs, batch_size, lr, optimizer, seed, ...)
    files            {"weights", "metrics", "snapshots", "resume"}: paths relative to the run directory

``metrics.json``: ``loss`` [[step, loss], ...] (step = number of optimizer updates so far, from 1),
``epochs`` [{epoch, step, train_acc, test_acc, test_acc_oracle?, test_loss, time_per_step_s, wall}, ...]
and the summary ``test_acc`` (last epoch, inferred contexts: CN+ mixing with context=None), ``test_acc_oracle``
(last epoch, true label-derived contexts; null when not applicable), ``best_test_acc``, ``params``,
``epochs_done``, ``steps_done``.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .data import DATASETS, KMeansContexts
from .daynight.render import CONTEXTS, NightParams
from .models import DAYNIGHT_MODELS, GAN_MODELS, MODELS, PATH_MODELS, build_model
from .models.dcgan import check_gan_config
from .norms import NORMS, NormBase, resolve_name

__all__ = ["FORMAT_VERSION", "Run", "load_run", "Summary", "read_summary", "list_summaries", "read_metric_lines",
           "metrics_from_lines", "run_status", "summary_name", "atomic_write_bytes", "find_runs", "METRICS_LINES",
           "STATUS_NAME", "SUMMARY_DIR", "save_run", "save_config", "save_metrics", "save_weights",
           "save_snapshot", "snapshot_name", "save_resume_state", "load_resume_state", "read_safetensors",
           "validate_config", "build_model_from_config", "preprocess_images", "read_json", "write_json_atomic",
           "DEFAULT_FILES", "CONFIG_NAME", "count_parameters"]

FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
#: "record": a run written by cbnorm.watch from a model the library cannot rebuild (a user's own)
TASKS = ("classify", "daynight", "gan", "record")
METRICS_LINES = "metrics.jsonl"
STATUS_NAME = "status.json"
SUMMARY_DIR = "summaries"
_SUMMARY_RE = re.compile(r"^step_(\d+)\.safetensors$")
#: the views a summary keeps of each layer (values (C, M) per view)
SUMMARY_VIEWS = ("input", "x_hat", "output")
#: a run whose status says "running" but has written nothing for this long is shown as stopped
STALE_SECONDS = 600.0
CONFIG_NAME = "config.json"
DEFAULT_FILES: dict[str, str] = {"weights": "model.safetensors", "metrics": "metrics.json",
                                 "snapshots": "snapshots", "resume": "resume.safetensors"}
_SNAPSHOT_RE = re.compile(r"^step_(\d+)\.safetensors$")
_REQUIRED_CONFIG = ("format_version", "task", "model", "norm", "layers", "class_names", "preprocessing")
#: task "daynight" (cbnorm.train.daynight): no classes; contexts, renderer and translator instead
_REQUIRED_DAYNIGHT = ("format_version", "task", "model", "norm", "layers", "contexts", "preprocessing", "renderer",
                      "translator")
#: task "gan" (cbnorm.train.gan): the model is the generator; latent instead of classes
_REQUIRED_GAN = ("format_version", "task", "model", "norm", "layers", "preprocessing", "latent")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
#: the largest model a config may describe (parameters + buffers, counted on the "meta" device before any
#: memory is allocated): a tampered width / num_classes / dim cannot make load_run allocate terabytes
MAX_MODEL_ELEMENTS = 100_000_000
#: deepest ViT a config may describe (its layers are built one by one, even on the "meta" device)
MAX_VIT_DEPTH = 256
#: larger files are refused before they are read (a model at MAX_MODEL_ELEMENTS in float32, with AdamW's
#: two moments in resume.safetensors, is ~1.2 GB)
MAX_SAFETENSORS_BYTES = 16 * MAX_MODEL_ELEMENTS + (64 << 20)
MAX_JSON_BYTES = 256 << 20
#: image sides / channels a config may ask inputs to be resized to
MAX_IMAGE_SIDE, MAX_CHANNELS = 16384, 64

PathLike = str | os.PathLike


# ============================================================================ small file helpers
def read_json(path: Path, what: Optional[str] = None) -> Any:
    """Parse a JSON file; ``ValueError`` naming the file when it is missing, unreadable or malformed."""
    what = what or path.name
    if not path.is_file():
        raise ValueError(f"{what} is missing: expected a file at {path}")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{what} at {path} is {size} bytes, over the limit of {MAX_JSON_BYTES} for a JSON file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} at {path} cannot be read as UTF-8 text ({err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} at {path} is malformed JSON: {err.msg} at line {err.lineno} "
                         f"column {err.colno}") from None
    except RecursionError:
        raise ValueError(f"{what} at {path} is malformed: its JSON is nested too deeply") from None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


#: public name of the atomic writer (the recorder writes summaries and metrics through it)
atomic_write_bytes = _atomic_write_bytes


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON via a temporary file and ``os.replace`` (never half-written)."""
    _atomic_write_bytes(Path(path), (json.dumps(obj, indent=1, allow_nan=True) + "\n").encode("utf-8"))


def _inside(root: Path, rel: Any, what: str) -> Path:
    """``root / rel`` after checking that ``rel`` is a relative path that stays inside ``root``."""
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{what} must be a non-empty relative path string, got {rel!r}")
    p = Path(rel)
    if p.is_absolute() or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        raise ValueError(f"{what} = {rel!r} is an absolute path; paths in config.json must stay inside the "
                         f"run directory")
    if ".." in p.parts or ".." in rel.replace("\\", "/").split("/"):
        raise ValueError(f"{what} = {rel!r} contains '..'; paths in config.json must stay inside the run "
                         f"directory")
    full = root / p
    try:
        full.resolve().relative_to(root.resolve())
    except ValueError:
        raise ValueError(f"{what} = {rel!r} resolves to {full.resolve()}, outside the run directory {root} "
                         f"(a symbolic link?)") from None
    return full


# ============================================================================ safetensors
def _sniff_foreign(head: bytes) -> Optional[str]:
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (the format of torch.save)"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return "a Python pickle (e.g. torch.save with _use_new_zipfile_serialization=False)"
    if head[:2] == b"\x80\x01" or head[:1] in (b"(", b"]", b"}", b"c") and b"\n" in head[:64]:
        return "a Python pickle (protocol 0 or 1)"
    return None


def read_safetensors(path: PathLike, what: Optional[str] = None, device: str | torch.device = "cpu",
                     ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, after validating its header by hand.

    ``ValueError`` (naming the file) for: missing file, pickled / torch.save files, truncated files, a
    header that is not the safetensors JSON, tensors whose byte ranges do not fit the file, and anything the
    safetensors library itself refuses. Nothing is unpickled, ever.
    """
    path = Path(path)
    what = what or path.name
    if not path.is_file():
        raise ValueError(f"{what} is missing: expected a file at {path}")
    size = path.stat().st_size
    if size > MAX_SAFETENSORS_BYTES:
        raise ValueError(f"{what} at {path} is {size} bytes, over the limit of {MAX_SAFETENSORS_BYTES} "
                         f"(cbnorm.runs.MAX_SAFETENSORS_BYTES); refusing to read it")
    data = path.read_bytes()
    foreign = None if data[8:9] == b"{" else _sniff_foreign(data[:64])  # safetensors: JSON header at byte 8
    if foreign:
        raise ValueError(f"{what} at {path} is not a safetensors file: it looks like {foreign}. Refusing to "
                         f"load it (unpickling can run arbitrary code); re-save the weights with safetensors")
    if len(data) < 8:
        raise ValueError(f"{what} at {path} is truncated or not a safetensors file ({len(data)} bytes, a "
                         f"safetensors file starts with an 8-byte header length)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        if n > 100_000_000:
            raise ValueError(f"{what} at {path} is not a safetensors file (its first 8 bytes give a header of "
                             f"{n} bytes)")
        raise ValueError(f"{what} at {path} is truncated: header of {n} bytes but only {len(data) - 8} bytes "
                         f"follow")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} at {path} is corrupt or not a safetensors file: its header is not JSON "
                         f"({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{what} at {path} is corrupt: the safetensors header is not a JSON object")
    payload = len(data) - 8 - n
    end_max = 0
    for key, info in header.items():
        if key == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise ValueError(f"{what} at {path} is corrupt: __metadata__ must map strings to strings")
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)
                    and type(begin) is int and type(end) is int):
                raise TypeError("shape and data_offsets must hold non-negative integers")
            numel = math.prod(shape)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{what} at {path} is corrupt: bad header entry for tensor {key!r}") from None
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise ValueError(f"{what} at {path}: tensor {key!r} has unsupported dtype {dtype!r}")
        if end - begin != numel * _ITEMSIZE[dtype] or begin < 0:
            raise ValueError(f"{what} at {path} is corrupt: tensor {key!r} of shape {shape} ({dtype}) has byte "
                             f"range [{begin}, {end})")
        end_max = max(end_max, end)
    if end_max > payload:
        raise ValueError(f"{what} at {path} is truncated: tensors need {end_max} bytes of data, the file has "
                         f"{payload}")
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as err:
        raise ValueError(f"{what} at {path} is corrupt: safetensors refused it ({err})") from None
    meta = header.get("__metadata__") or {}
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, dict(meta)


def _save_safetensors(path: Path, tensors: Mapping[str, Tensor], metadata: Optional[Mapping[str, str]] = None,
                      ) -> None:
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write_bytes(path, save(flat, metadata=dict(metadata) if metadata else None))


#: the options of the classification trainer (``python -m cbnorm.train``) and their defaults: a run's config.json
#: "training" holds the experiment's; an option it lacks (written by an older trainer) had this value
TRAINING_DEFAULTS: dict[str, Any] = {
    "dataset": "fashion-mnist", "model": "shallow_cnn", "norm": "bn", "components": 3, "contexts": None,
    "context_priors": "data", "layers": None, "width": 1.0, "input_norm": None, "norm_kwargs": None,
    "model_kwargs": None, "epochs": 10, "batch_size": 128, "lr": 1e-3, "weight_decay": 1e-4,
    "optimizer": "adamw", "momentum": 0.9, "nesterov": False, "schedule": "constant", "lr_factor": 0.1,
    "lr_every": 1, "milestones": None, "warmup_steps": 0, "seed": 0, "snapshot_every": 200, "snapshot_early": 0,
    "eval_every": 0, "eval_subset": 1000, "amp": False, "limit_train": None,
    "limit_test": None, "eval_batch_size": 1000, "out": None, "resume": False, "device": "auto",
    "threads": None, "quiet": False, "context_head": False, "max_skipped": 10, "record_size": 256,
    "record_values": 512, "record_scan": False,
}

# ============================================================================ config
def _norm_name(name: Any, what: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"config.json {what} must be a norm name string, got {name!r}")
    try:
        return resolve_name(name)
    except (ValueError, TypeError) as err:
        raise ValueError(f"config.json {what}: {err}") from None


def validate_config(config: Any) -> dict:
    """Check a config dict (format, task, model, norms, files, preprocessing); return it. ``ValueError``."""
    if not isinstance(config, dict):
        raise ValueError(f"config.json must hold a JSON object, got {type(config).__name__}")
    if config.get("task") == "record":
        return _validate_recorded(config)
    if "recorder" in config:
        _validate_recorder(config["recorder"])
    daynight = config.get("task") == "daynight"
    gan = config.get("task") == "gan"
    if "task" in config and config["task"] not in TASKS:
        raise ValueError(f"config.json has unknown task {config['task']!r}; supported: {list(TASKS)}")
    missing = [k for k in (_REQUIRED_DAYNIGHT if daynight else _REQUIRED_GAN if gan else _REQUIRED_CONFIG)
               if k not in config]
    if missing:
        raise ValueError(f"config.json is missing the keys {missing}")
    version = config["format_version"]
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        raise ValueError(f"config.json has unknown format_version {version!r}; this cbnorm reads "
                         f"{list(SUPPORTED_VERSIONS)} (written by a newer cbnorm?)")
    if config["task"] not in TASKS:
        raise ValueError(f"config.json has unknown task {config['task']!r}; supported: {list(TASKS)}")
    model = config["model"]
    if not isinstance(model, dict) or not isinstance(model.get("kwargs", {}), dict):
        raise ValueError("config.json 'model' must be {\"name\": ..., \"kwargs\": {...}}")
    models = DAYNIGHT_MODELS if daynight else GAN_MODELS if gan else MODELS
    if not isinstance(model.get("name"), str) or model["name"] not in models:
        raise ValueError(f"config.json has unknown model {model.get('name')!r}; choose one of {sorted(models)}")
    _norm_name(config["norm"], "norm")
    if config.get("input_norm") is not None:
        _norm_name(config["input_norm"], "input_norm")
    if model.get("kwargs", {}).get("base_norm") is not None:
        _norm_name(model["kwargs"]["base_norm"], "model.kwargs.base_norm")
    if not isinstance(config.get("norm_kwargs", {}), dict):
        raise ValueError("config.json 'norm_kwargs' must be a JSON object")
    layers = config["layers"]
    if not isinstance(layers, list) or not all(isinstance(s, str) for s in layers):
        raise ValueError(f"config.json 'layers' must be a list of layer names, got {layers!r}")
    names = config.get("class_names")
    if not daynight and not gan and (not isinstance(names, list) or not names):
        raise ValueError("config.json 'class_names' must be a non-empty list")
    pre = config["preprocessing"]
    try:
        c = int(pre["channels"])
        h, w = (int(s) for s in pre["image_size"])
        mean = np.asarray(pre["mean"], dtype=np.float64).reshape(-1)
        std = np.asarray(pre["std"], dtype=np.float64).reshape(-1)
    except (KeyError, TypeError, ValueError, OverflowError):
        raise ValueError("config.json 'preprocessing' must hold channels, image_size [H, W], mean and std "
                         "lists") from None
    if c < 1 or h < 1 or w < 1 or mean.shape != (c,) or std.shape != (c,) or not (std > 0).all() \
            or not np.isfinite(mean).all() or not np.isfinite(std).all() or c > MAX_CHANNELS \
            or max(h, w) > MAX_IMAGE_SIDE:
        raise ValueError(f"config.json 'preprocessing' is inconsistent: channels={c}, image_size={[h, w]}, "
                         f"mean={mean.tolist()}, std={std.tolist()} (one positive finite std per channel, at most "
                         f"{MAX_CHANNELS} channels and {MAX_IMAGE_SIDE} pixels a side)")
    files = config.get("files", DEFAULT_FILES)
    if not isinstance(files, dict):
        raise ValueError("config.json 'files' must be a JSON object of relative paths")
    for key, rel in files.items():
        # checks the form of the path only; the directory is checked again on load
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or rel.startswith(("/", "\\")) \
                or ".." in rel.replace("\\", "/").split("/") or re.match(r"^[A-Za-z]:", rel):
            raise ValueError(f"config.json files.{key} = {rel!r} must be a relative path inside the run "
                             f"directory (no '..', not absolute)")
    ctx = config.get("contexts") or {}
    if not isinstance(ctx, dict):
        raise ValueError("config.json 'contexts' must be a JSON object or null")
    if ctx.get("label_derived") and not isinstance(ctx.get("label_to_context"), list):
        raise ValueError("config.json contexts.label_derived is true but contexts.label_to_context is not a list")
    if not daynight and not gan:
        _validate_classify_data(config, ctx)
    if daynight:
        _validate_daynight(config)
    if gan:
        check_gan_config(config)
    return config


def _validate_classify_data(config: dict, ctx: dict) -> None:
    """A classification config names a dataset the library knows, and its label-derived contexts give every
    class a context id in range (a hand-written config claiming a built-in model is checked like ours)."""
    ds = config.get("dataset")
    if ds is not None:
        if not isinstance(ds, dict) or not isinstance(ds.get("name"), str):
            raise ValueError("config.json 'dataset' must be {\"name\": ..., ...}")
        if ds["name"] not in DATASETS:
            raise ValueError(f"config.json dataset {ds['name']!r} is not one cbnorm can load; choose one of "
                             f"{list(DATASETS)} (a run of your own data: record it with cbnorm.watch)")
    names = config["class_names"]
    table = ctx.get("label_to_context")
    if ctx.get("label_derived"):
        k = ctx.get("num_contexts")
        if len(table) != len(names):
            raise ValueError(f"config.json contexts.label_to_context has {len(table)} entries for {len(names)} "
                             f"classes")
        if type(k) is not int or k < 1 or not all(type(c) is int and 0 <= c < k for c in table):
            raise ValueError(f"config.json contexts.label_to_context must hold context ids in [0, {k}) "
                             f"(contexts.num_contexts = {k!r})")


def _validate_recorder(rec: Any) -> None:
    """The "recorder" section cbnorm.watch writes: who recorded, and each recorded layer's path, class, kind
    and width."""
    if not isinstance(rec, dict):
        raise ValueError("config.json 'recorder' must be a JSON object")
    layers = rec.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ValueError("config.json recorder.layers must be a non-empty list of the recorded layers")
    for i, li in enumerate(layers):
        if not (isinstance(li, dict) and isinstance(li.get("path"), str) and isinstance(li.get("class"), str)
                and isinstance(li.get("kind"), str) and type(li.get("width")) is int and li["width"] >= 1):
            raise ValueError(f"config.json recorder.layers[{i}] must hold path, class, kind (strings) and width "
                             f"(int >= 1), got {li!r}")
    paths = [li["path"] for li in layers]
    if len(set(paths)) != len(paths):
        raise ValueError("config.json recorder.layers names a layer twice")


def _validate_recorded(config: dict) -> dict:
    """Task "record" (cbnorm.watch on a model the library cannot rebuild): format_version 2, the model's
    class name, the recorder section; class_names and contexts optional."""
    missing = [k for k in ("format_version", "task", "model", "recorder") if k not in config]
    if missing:
        raise ValueError(f"config.json is missing the keys {missing}")
    version = config["format_version"]
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool) or version < 2:
        raise ValueError(f"config.json has format_version {version!r}; recorded runs (task 'record') are format "
                         f"2 (this cbnorm reads {list(SUPPORTED_VERSIONS)})")
    model = config["model"]
    if not isinstance(model, dict) or not isinstance(model.get("class"), str):
        raise ValueError("config.json 'model' of a recorded run must be {\"class\": <the model's class name>, ...}")
    names = config.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ValueError("config.json 'class_names' must be a list of strings or null")
    ctx = config.get("contexts")
    if ctx is not None and not isinstance(ctx, dict):
        raise ValueError("config.json 'contexts' must be a JSON object or null")
    _validate_recorder(config["recorder"])
    return config


def _validate_daynight(config: dict) -> None:
    """Task "daynight" (cbnorm.train.daynight / cbnorm.daynight.transfer): two contexts named day and night, a
    context norm, 3 channels, valid renderer parameters, translator matching the model."""
    ctx = config["contexts"]
    if not isinstance(ctx, dict) or ctx.get("names") != list(CONTEXTS) or ctx.get("num_contexts") != len(CONTEXTS):
        raise ValueError(f"config.json contexts of a daynight run must be {{\"names\": {list(CONTEXTS)}, "
                         f"\"num_contexts\": {len(CONTEXTS)}, ...}}, got {ctx!r}")
    norm = _norm_name(config["norm"], "norm")
    if not NORMS[norm].uses_context:
        raise ValueError(f"config.json norm of a daynight run must be a context layer (cn, cnx, cn-embed), "
                         f"got {config['norm']!r}")
    k = (config.get("norm_kwargs") or {}).get("num_contexts", len(CONTEXTS))
    if k != len(CONTEXTS):
        raise ValueError(f"config.json norm_kwargs.num_contexts of a daynight run must be {len(CONTEXTS)}, got {k!r}")
    if int(config["preprocessing"]["channels"]) != 3:
        raise ValueError("config.json preprocessing.channels of a daynight run must be 3 (RGB)")
    try:
        NightParams.from_dict(config["renderer"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"config.json renderer: {err}") from None
    expected = {"daynight_siamese": "input", "daynight_ae": "feature"}[config["model"]["name"]]
    if config["translator"] != expected:
        raise ValueError(f"config.json translator must be {expected!r} for model {config['model']['name']!r}, "
                         f"got {config['translator']!r}")


def _model_kwargs(config: Mapping) -> dict:
    name = config["model"]["name"]
    kw = dict(config["model"].get("kwargs") or {})
    norm = _norm_name(config["norm"], "norm")
    norm_kwargs = dict(config.get("norm_kwargs") or {})
    if config["task"] == "daynight":
        kw.update({"input_norm" if name == "daynight_siamese" else "norm": norm}, norm_kwargs=norm_kwargs)
    elif config["task"] == "gan":
        kw.update(norm=norm, norm_layers=tuple(config["layers"]), norm_kwargs=norm_kwargs)
    elif name == "shallow_cnn":
        kw.update(norm=norm, norm_layers=tuple(config["layers"]), norm_kwargs=norm_kwargs,
                  input_norm=config.get("input_norm"))
    elif name in PATH_MODELS:
        if config.get("input_norm"):
            raise ValueError(f"config.json: input_norm is not supported by the {name} model")
        kw.update(norm=norm, norm_layers=tuple(config["layers"]), norm_kwargs=norm_kwargs)
    elif name == "vit":
        if config.get("input_norm"):
            raise ValueError("config.json: input_norm is not supported by the vit model")
        kw.update(patch_norm=norm, norm_kwargs=norm_kwargs)
    else:  # pragma: no cover - validate_config refuses it
        raise ValueError(f"unknown model {name!r}")
    return kw


def build_model_from_config(config: Mapping) -> nn.Module:
    """A fresh (randomly initialised) model of the architecture described by ``config``."""
    validate_config(config)
    depth = (config["model"].get("kwargs") or {}).get("depth", 0)
    if config["model"]["name"] == "vit" and isinstance(depth, int) and depth > MAX_VIT_DEPTH:
        raise ValueError(f"config.json describes a ViT of depth {depth}, over the limit of {MAX_VIT_DEPTH}")

    def build() -> nn.Module:
        if config["task"] == "daynight":
            return DAYNIGHT_MODELS[config["model"]["name"]](**_model_kwargs(config))
        if config["task"] == "gan":
            return GAN_MODELS[config["model"]["name"]](**_model_kwargs(config))
        return build_model(config["model"]["name"], **_model_kwargs(config))

    try:
        with torch.device("meta"):  # sizes first, no memory: a tampered config cannot allocate terabytes
            size = sum(t.numel() for t in build().state_dict().values())
        if size > MAX_MODEL_ELEMENTS:
            raise ValueError(f"it has {size:,} parameters and buffers, over the limit of {MAX_MODEL_ELEMENTS:,} "
                             f"(cbnorm.runs.MAX_MODEL_ELEMENTS; a tampered width, num_classes or dim?)")
        return build()
    except Exception as err:  # an untrusted config: any failure of a constructor means it is invalid
        raise ValueError(f"config.json describes a model that cannot be built: {err}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ============================================================================ weights
def _state_tensors(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items() if isinstance(v, Tensor)}


def _match_state(model: nn.Module, tensors: Mapping[str, Tensor], what: str, config: Mapping) -> None:
    """``ValueError`` when ``tensors`` do not fit ``model``'s state dict (names, shapes, kinds of dtype)."""
    expected = _state_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad = []
    for k in sorted(set(expected) & set(tensors)):
        e, g = expected[k], tensors[k]
        if tuple(e.shape) != tuple(g.shape):
            bad.append(f"{k}: {tuple(g.shape)} in the file, {tuple(e.shape)} in the model")
        elif e.is_floating_point() != g.is_floating_point():
            bad.append(f"{k}: dtype {g.dtype} in the file, {e.dtype} in the model")
    if missing or unexpected or bad:
        arch = (f"model {config['model']['name']!r}, norm {config['norm']!r}, layers {config['layers']}, "
                f"kwargs {config['model'].get('kwargs')}")
        parts = []
        if bad:
            parts.append(f"{len(bad)} mismatched shape(s)/dtype(s): " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
        if missing:
            parts.append(f"{len(missing)} missing: {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
        raise ValueError(f"{what} does not match the architecture in config.json ({arch}): " + "; ".join(parts))


#: state entries that a layer can only ever hold >= 0 (variances, mixture weights, counters)
NONNEGATIVE_STATE = frozenset({"running_var", "queue_vars", "queue_fit_vars", "running_weights", "queue_weights",
                               "queue_fit_weights", "num_batches_tracked", "running_batches_tracked", "queue_count",
                               "queue_ptr", "priors"})


def _with_legacy_buffers(model: nn.Module, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` of a file written by an older version, in this version's layout: every cbnorm layer of
    ``model`` upgrades its own entries (``NormBase.upgrade_state_dict``: ACN's data_initialized = 1, MN's queue
    fits from its queued moments, CN's per-context counts from num_batches_tracked, num_batches_tracked dropped
    from layers without running statistics). Safetensors files carry no state-dict version; the hooks only
    fill keys that are missing and drop keys the layer no longer has, so a current file is unchanged."""
    out = dict(tensors)
    for name, module in model.named_modules():
        if isinstance(module, NormBase):
            module.upgrade_state_dict(out, f"{name}." if name else "")
    return out


def _load_into(model: nn.Module, tensors: Mapping[str, Tensor], what: str, config: Mapping) -> nn.Module:
    tensors = _with_legacy_buffers(model, tensors)
    _match_state(model, tensors, what, config)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{what} holds NaN or inf values in {len(bad)} tensor(s) ({bad[:5]}): a diverged or "
                         f"tampered file")
    neg = [k for k, v in tensors.items() if k.rsplit(".", 1)[-1] in NONNEGATIVE_STATE and bool((v < 0).any())]
    if neg:
        raise ValueError(f"{what} holds negative values in {len(neg)} tensor(s) ({neg[:5]}) that are variances, "
                         f"mixture weights or counters: a tampered file")
    state = model.state_dict()
    with torch.no_grad():
        for k, v in tensors.items():
            state[k].copy_(v.to(dtype=state[k].dtype, device=state[k].device))
    for module in model.modules():  # flags derived from the buffers just written (ACN: fitted already)
        if isinstance(module, NormBase):
            module.refresh_host_state()
    return model


def save_weights(path: PathLike, model: nn.Module, metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Every parameter and buffer of ``model.state_dict()`` (full precision) into a safetensors file."""
    path = Path(path)
    _save_safetensors(path, _state_tensors(model), {"format": "pt", **(metadata or {})})
    return path


def snapshot_name(step: int) -> str:
    return f"step_{int(step):06d}.safetensors"


def save_snapshot(run_dir: PathLike, model: nn.Module, step: int, files: Optional[Mapping[str, str]] = None,
                  ) -> Path:
    """Write ``snapshots/step_XXXXXX.safetensors``: float tensors as float16 (float32 where float16 would
    overflow), integer tensors unchanged."""
    files = files or DEFAULT_FILES
    out = {}
    for k, v in _state_tensors(model).items():
        if v.is_floating_point():
            h = v.to(torch.float16)
            out[k] = h if bool(torch.isfinite(h).all()) or not bool(torch.isfinite(v).all()) else v.float()
        else:
            out[k] = v
    path = Path(run_dir) / files.get("snapshots", "snapshots") / snapshot_name(step)
    _save_safetensors(path, out, {"format": "pt", "step": str(int(step))})
    return path


# ============================================================================ config / metrics writers
def save_config(run_dir: PathLike, config: Mapping) -> Path:
    cfg = validate_config(dict(config))
    path = Path(run_dir) / CONFIG_NAME
    write_json_atomic(path, cfg)
    return path


def save_metrics(run_dir: PathLike, metrics: Mapping, files: Optional[Mapping[str, str]] = None) -> Path:
    path = Path(run_dir) / (files or DEFAULT_FILES).get("metrics", "metrics.json")
    write_json_atomic(path, dict(metrics))
    return path


def save_run(run_dir: PathLike, config: Mapping, model: nn.Module, metrics: Optional[Mapping] = None) -> Path:
    """Write (or overwrite) ``config.json``, ``model.safetensors`` and ``metrics.json`` of a run directory.

    ``config`` must pass :func:`validate_config`; the model must be the one it describes (checked).
    Returns the run directory.
    """
    run_dir = Path(run_dir)
    config = dict(config)
    config.setdefault("files", dict(DEFAULT_FILES))
    validate_config(config)
    _match_state(build_model_from_config(config), _state_tensors(model), "the model passed to save_run", config)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run_dir, config)
    save_weights(_inside(run_dir, config["files"].get("weights", DEFAULT_FILES["weights"]), "files.weights"),
                 model)
    m = dict(metrics or {})
    m.setdefault("params", count_parameters(model))
    save_metrics(run_dir, m, config["files"])
    return run_dir


# ============================================================================ trainer state (resume)
def save_resume_state(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                      state: Mapping[str, Any], rng: Optional[Mapping[str, Tensor]] = None) -> Path:
    """One safetensors file with the model (``model.*``), the optimizer tensors (``optim.<param>.<name>``)
    and RNG states (``rng.<name>``); optimizer param_groups, scalar state and ``state`` go into the
    metadata as JSON. Read back with :func:`load_resume_state`."""
    tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in _state_tensors(model).items()}
    opt_json: dict[str, Any] = {}
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for pid, st in sd["state"].items():
            for name, val in st.items():
                if isinstance(val, Tensor):
                    tensors[f"optim.{pid}.{name}"] = val
                else:
                    scalars.setdefault(str(pid), {})[name] = val
        opt_json = {"class": type(optimizer).__name__, "param_groups": sd["param_groups"], "scalars": scalars}
    for name, t in (rng or {}).items():
        tensors[f"rng.{name}"] = t
    meta = {"format": "pt", "format_version": str(FORMAT_VERSION),
            "trainer_state": json.dumps(dict(state)), "optimizer": json.dumps(opt_json)}
    path = Path(path)
    _save_safetensors(path, tensors, meta)
    return path


def load_resume_state(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                      config: Mapping) -> tuple[dict, dict[str, Tensor]]:
    """Load what :func:`save_resume_state` wrote into ``model`` and ``optimizer``; return (state, rng)."""
    tensors, meta = read_safetensors(path, "resume state")
    try:
        state = json.loads(meta["trainer_state"])
        opt_json = json.loads(meta["optimizer"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"resume state at {path} has malformed metadata ({err})") from None
    model_t = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    _load_into(model, model_t, f"resume state at {path}", config)
    if optimizer is not None:
        if opt_json.get("class") != type(optimizer).__name__:
            raise ValueError(f"resume state at {path} holds a {opt_json.get('class')} optimizer, "
                             f"not {type(optimizer).__name__}")
        st: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                st.setdefault(int(pid), {})[name] = v
        for pid, d in opt_json.get("scalars", {}).items():
            st.setdefault(int(pid), {}).update(d)
        st = dict(sorted(st.items()))
        groups = opt_json["param_groups"]
        for g in groups:
            if "betas" in g and isinstance(g["betas"], list):
                g["betas"] = tuple(g["betas"])
        optimizer.load_state_dict({"state": st, "param_groups": groups})
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    return state, rng


# ============================================================================ preprocessing
def preprocess_images(images: Any, mean: Sequence[float], std: Sequence[float], channels: int,
                      image_size: Sequence[int], device: str | torch.device = "cpu") -> Tensor:
    """uint8 images (N, H, W) or (N, H, W, C) (or one image (H, W)) -> float32 (N, C, H, W):
    scaled to [0, 1], then ``(x - mean) / std`` per channel. Grey images for a 3-channel run are repeated in
    each channel (a grey dataset such as Fashion-MNIST fed to an RGB model)."""
    if isinstance(images, Tensor):
        arr = images
    else:
        arr = torch.from_numpy(np.ascontiguousarray(np.asarray(images)))
    if arr.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (0..255), got dtype {arr.dtype}")
    if arr.dim() == 2:
        arr = arr.unsqueeze(0)
    h, w = (int(s) for s in image_size)
    if arr.dim() == 3:
        if channels not in (1, 3):
            raise ValueError(f"images of shape {tuple(arr.shape)} are grey (N, H, W) but this run expects "
                             f"{channels} channels: pass (N, H, W, {channels})")
        # grey images for a 3-channel run (a grey dataset fed to an RGB model): the grey value in each channel
        arr = arr.unsqueeze(1).expand(-1, channels, -1, -1)
    elif arr.dim() == 4:
        if arr.shape[-1] != channels:
            raise ValueError(f"images have {arr.shape[-1]} channels (last axis of {tuple(arr.shape)}) but this "
                             f"run expects {channels}")
        arr = arr.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got shape {tuple(arr.shape)}")
    if tuple(arr.shape[-2:]) != (h, w):
        raise ValueError(f"images are {tuple(arr.shape[-2:])} pixels but this run was trained on {(h, w)}; "
                         f"resize them first (cbnorm.data.resize_images)")
    m = torch.as_tensor(np.asarray(mean, np.float32)).view(1, -1, 1, 1)
    s = torch.as_tensor(np.asarray(std, np.float32)).view(1, -1, 1, 1)
    x = arr.to(device=device, dtype=torch.float32).div_(255.0)
    return ((x - m.to(x.device)) / s.to(x.device)).contiguous()


# ============================================================================ Run
@dataclass
class Run:
    """A loaded run directory. ``model`` is in eval mode on ``device``; treat it as shared (read-only)."""

    path: Path
    config: dict
    metrics: dict
    #: None for a recorded run of a model the library cannot rebuild (task "record"): its views read summaries
    model: Optional[nn.Module]
    snapshots: list[tuple[int, Path]] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: (step, path) of the recorded summaries (cbnorm.watch), in step order
    summaries: list[tuple[int, Path]] = field(default_factory=list)

    @property
    def rebuildable(self) -> bool:
        """Whether the library can rebuild this run's model (live views: resampling, snapshots, translation)."""
        return self.model is not None

    @property
    def recorded_layers(self) -> list[dict]:
        """The layers cbnorm.watch recorded (path, class, kind, width, ...); [] for runs without summaries."""
        return list((self.config.get("recorder") or {}).get("layers") or [])

    def refresh(self) -> "Run":
        """Re-read what a run still being written adds: summaries, metrics, snapshots (the model is kept)."""
        files = {**DEFAULT_FILES, **(self.config.get("files") or {})}
        self.summaries = list_summaries(self.path)
        self.metrics = _read_metrics(self.path, self.config, files)
        if self.model is not None:
            self.snapshots = _list_snapshots(self.path, files)
        return self

    def read_summary(self, step: int) -> "Summary":
        paths = dict(self.summaries)
        if int(step) not in paths:
            raise ValueError(f"no recorded summary at step {step} in {self.path}; recorded steps: {sorted(paths)}")
        return read_summary(paths[int(step)])

    def _need_model(self, what: str) -> nn.Module:
        if self.model is None:
            cls = (self.config.get("model") or {}).get("class", "?")
            raise ValueError(f"{what} needs the model, and run {self.path.name} was recorded from a {cls} that "
                             f"cbnorm cannot rebuild: only its recorded summaries can be shown")
        return self.model

    # -------------------------------------------------------------- descriptors
    @property
    def class_names(self) -> list[str]:
        return list(self.config.get("class_names") or [])  # none for task "daynight"

    @property
    def contexts(self) -> dict:
        return dict(self.config.get("contexts") or {})

    @property
    def context_names(self) -> list[str]:
        return list(self.contexts.get("names") or [])

    @property
    def uses_context(self) -> bool:
        if self.model is None:
            return any(li.get("uses_context") for li in self.recorded_layers)
        return bool(getattr(self.model, "uses_context", False))

    @property
    def norm(self) -> str:
        """The studied norm; for a recorded run of a user's model, the kinds of its recorded layers."""
        if "norm" in self.config:
            return self.config["norm"]
        kinds = list(dict.fromkeys(li.get("kind", "?") for li in self.recorded_layers))
        return "+".join(kinds) if kinds else "?"

    # -------------------------------------------------------------- models
    def new_model(self) -> nn.Module:
        """A fresh model of this run's architecture (random init) on ``device``."""
        self._need_model("a new model")
        return build_model_from_config(self.config).to(self.device)

    def load_snapshot(self, step: int) -> nn.Module:
        """A NEW model (eval mode) with the weights of snapshot ``step``; ``self.model`` is left untouched."""
        paths = dict(self.snapshots)
        if int(step) not in paths:
            raise ValueError(f"no snapshot at step {step} in {self.path}; available steps: {sorted(paths)}")
        tensors, _ = read_safetensors(paths[int(step)], f"snapshot {paths[int(step)].name}")
        model = self.new_model()
        _load_into(model, tensors, f"snapshot {paths[int(step)].name}", self.config)
        return model.eval()

    # -------------------------------------------------------------- inputs
    def preprocess(self, images: Any) -> Tensor:
        """uint8 images (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) on ``device``, normalized exactly
        as in training (scale to [0, 1], then the stored per-channel mean/std)."""
        pre = self.config["preprocessing"]
        return preprocess_images(images, pre["mean"], pre["std"], int(pre["channels"]), pre["image_size"],
                                 self.device)

    def context_of(self, labels: Any) -> Tensor:
        """Context ids (N,) long of samples with class ``labels``, for label-derived (superclass) contexts.

        ``ValueError`` when this run's contexts are not a function of the label (k-means, none, domain).
        """
        ctx = self.contexts
        if not ctx.get("label_derived"):
            raise ValueError(f"the contexts of this run ({ctx.get('spec', 'none')!r}) are not derived from "
                             f"class labels; context_of(labels) only works for superclass contexts")
        table = torch.as_tensor(ctx["label_to_context"], dtype=torch.long)
        lab = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= len(table)):
            raise ValueError(f"labels must be in [0, {len(table) - 1}], got {int(lab.min())}..{int(lab.max())}")
        return table[lab].to(self.device)

    def kmeans(self):
        """The stored :class:`cbnorm.data.KMeansContexts` (k-means contexts), else None."""
        state = self.contexts.get("kmeans")
        if not state:
            return None
        return KMeansContexts.from_state(state)

    def context_of_images(self, images: Any) -> Tensor:
        """Context ids from the stored k-means model (k-means contexts only; honest: uses the image only)."""
        km = self.kmeans()
        if km is None:
            raise ValueError(f"the contexts of this run ({self.contexts.get('spec', 'none')!r}) are not k-means "
                             f"clusters of the images")
        return torch.as_tensor(km.predict(np.asarray(images)), dtype=torch.long, device=self.device)

    # -------------------------------------------------------------- outputs
    @torch.no_grad()
    def logits(self, images: Any, context: Any = None, batch_size: int = 512, model: Optional[nn.Module] = None,
               ) -> Tensor:
        """Logits (N, num_classes) for uint8 ``images``; ``context`` ids (N,) or None (CN+ inference)."""
        model = self._need_model("running images through the run") if model is None else model
        x = self.preprocess(images)
        ctx = None if context is None else torch.as_tensor(np.asarray(context) if not isinstance(context, Tensor)
                                                           else context, dtype=torch.long).to(self.device)
        if ctx is not None and ctx.shape != (x.shape[0],):
            raise ValueError(f"context must have shape (N,) = ({x.shape[0]},), got {tuple(ctx.shape)}")
        was_training = model.training
        model.eval()
        try:
            out = [model(x[i:i + batch_size], context=None if ctx is None else ctx[i:i + batch_size])
                   for i in range(0, x.shape[0], batch_size)]
        finally:
            model.train(was_training)
        return torch.cat(out) if out else x.new_zeros(0, len(self.class_names))

    def predict(self, images: Any, context: Any = None, batch_size: int = 512) -> Tensor:
        """Predicted class ids (N,) long."""
        return self.logits(images, context, batch_size).argmax(dim=1)


def _list_snapshots(run_dir: Path, files: Mapping[str, str]) -> list[tuple[int, Path]]:
    sdir = _inside(run_dir, files.get("snapshots", DEFAULT_FILES["snapshots"]), "files.snapshots")
    out = _step_files(sdir, _SNAPSHOT_RE)
    for _, p in out:
        _inside(run_dir, str(p.relative_to(run_dir)), f"snapshot {p.name}")
    return out


def _step_files(folder: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    """(step, path) of the files in ``folder`` whose names match ``pattern`` (the step its group 1), sorted."""
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _read_metrics(run_dir: Path, config: Mapping, files: Mapping[str, str]) -> dict:
    """metrics.json when the run has one (our trainers), with the scalar lines of metrics.jsonl (cbnorm.watch)
    merged in (``metrics_from_lines``): keys of metrics.json win."""
    metrics_path = _inside(run_dir, files["metrics"], "files.metrics")
    lines_path = run_dir / METRICS_LINES
    metrics: dict = {}
    if metrics_path.is_file() or config.get("task") != "record":
        metrics = read_json(metrics_path, "metrics.json")
        if not isinstance(metrics, dict):
            raise ValueError(f"metrics.json at {metrics_path} must hold a JSON object")
        for key in ("loss", "epochs"):
            if key in metrics and not isinstance(metrics[key], list):
                raise ValueError(f"metrics.json '{key}' must be a list")
    if lines_path.is_file():
        from_lines = metrics_from_lines(read_metric_lines(run_dir))
        metrics = {**from_lines, **metrics, "scalars": from_lines["scalars"]}
    return metrics


def load_run(path: PathLike, device: str | torch.device = "cpu") -> Run:
    """Load and validate a run directory; ``ValueError`` with the reason when anything is wrong.

    A run recorded by ``cbnorm.watch`` from a model the library cannot rebuild (task "record") loads with
    ``model=None``: its summaries and metrics are what there is to show."""
    run_dir = Path(path).expanduser()
    if not run_dir.exists():
        raise ValueError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a directory (a run is a directory holding config.json, "
                         f"metrics.json and model.safetensors)")
    config = validate_config(read_json(_inside(run_dir, CONFIG_NAME, "config.json"), "config.json"))
    files = {**DEFAULT_FILES, **(config.get("files") or {})}
    device = torch.device(device)
    metrics = _read_metrics(run_dir, config, files)
    summaries = list_summaries(run_dir)
    if config["task"] == "record":
        return Run(path=run_dir, config=config, metrics=metrics, model=None, device=device, summaries=summaries)
    weights_path = _inside(run_dir, files["weights"], "files.weights")
    if not weights_path.is_file():
        raise ValueError(f"weights are missing: expected {weights_path}")
    model = build_model_from_config(config)
    tensors, _ = read_safetensors(weights_path, "model.safetensors")
    _load_into(model, tensors, "model.safetensors", config)
    model.to(device).eval()
    return Run(path=run_dir, config=config, metrics=metrics, model=model,
               snapshots=_list_snapshots(run_dir, files), device=device, summaries=summaries)


# ============================================================================ recorded runs (format 2)
def summary_name(step: int) -> str:
    return f"step_{int(step):08d}.safetensors"


def list_summaries(run_dir: PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete summary files of a run, in step order (temporary files of a step being
    written are never listed: they are renamed into place whole)."""
    return _step_files(Path(run_dir) / SUMMARY_DIR, _SUMMARY_RE)


def read_metric_lines(run_dir: PathLike) -> list[dict]:
    """The scalar lines of ``metrics.jsonl`` (one JSON object per line, each with "step"). A last line
    without its newline (a process killed while appending) and lines that are not such objects are skipped."""
    path = Path(run_dir) / METRICS_LINES
    if not path.is_file():
        return []
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{METRICS_LINES} at {path} is {size} bytes, over the limit of {MAX_JSON_BYTES}")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise ValueError(f"{METRICS_LINES} at {path} cannot be read ({err})") from None
    parts = text.split("\n")
    out = []
    for line in parts[:-1]:  # the part after the last newline is incomplete (or empty)
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(obj, dict) and type(obj.get("step")) is int:
            out.append(obj)
    return out


def metrics_from_lines(lines: Sequence[Mapping]) -> dict:
    """The metrics dict of scalar lines: ``scalars`` {name: [[step, value], ...]}, ``loss`` [[step, loss]],
    ``steps_done`` (the largest step), and the last value of test_acc / best_test_acc (the max of test_acc)
    when logged. Non-numeric values are dropped."""
    scalars: dict[str, list[list[float]]] = {}
    for line in lines:
        for k, v in line.items():
            if k in ("step", "wall") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            scalars.setdefault(k, []).append([int(line["step"]), float(v)])
    for v in scalars.values():
        v.sort(key=lambda sv: sv[0])
    out: dict[str, Any] = {"scalars": scalars, "loss": scalars.get("loss", []),
                           "steps_done": max((int(ln["step"]) for ln in lines), default=0)}
    acc = [v for _, v in scalars.get("test_acc", []) if math.isfinite(v)]
    if acc:
        out.update(test_acc=acc[-1], best_test_acc=max(acc))
    return out


def run_status(run_dir: PathLike, now: Optional[float] = None) -> dict:
    """{"state": "running" | "finished" | "stopped" | None, "age_s": seconds since the run last wrote}.
    "stopped": the status says running but nothing was written for ``STALE_SECONDS`` (a killed process)."""
    import time

    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    paths = [run_dir / METRICS_LINES, run_dir / STATUS_NAME, run_dir / CONFIG_NAME]
    summ = list_summaries(run_dir)
    if summ:
        paths.append(summ[-1][1])
    mtimes = [p.stat().st_mtime for p in paths if p.exists()]
    age = now - max(mtimes) if mtimes else None
    try:
        state = read_json(run_dir / STATUS_NAME).get("state")
    except (ValueError, AttributeError):
        state = None
    if state == "running" and age is not None and age > STALE_SECONDS:
        state = "stopped"
    return {"state": state, "age_s": age}


@dataclass
class Summary:
    """One recorded step (``summaries/step_XXXXXXXX.safetensors``): per layer, values (C, M) of the input,
    x_hat and output at fixed positions of the probe batch, per-sample channel means (N, C) of input and
    output, the layer's mixture (K, C) where it has one, per-sample components (N,), counts of non-finite
    values; predictions (N,), labels (N,), context (N,) of the probe batch when recorded."""

    step: int
    tensors: dict[str, Tensor]
    meta: dict[str, str]

    def layers(self) -> list[str]:
        return sorted({k.split("::", 1)[0] for k in self.tensors if "::" in k})

    def _get(self, layer: str, name: str) -> Optional[Tensor]:
        return self.tensors.get(f"{layer}::{name}")

    def values(self, layer: str, view: str) -> np.ndarray:
        """(C, M) float32 values of ``view`` ("input", "x_hat", "output") of ``layer``."""
        if view not in SUMMARY_VIEWS:
            raise ValueError(f"view must be one of {SUMMARY_VIEWS}, got {view!r}")
        t = self._get(layer, view)
        if t is None:
            raise ValueError(f"step {self.step} holds no {view} of layer {layer!r} (recorded: {self.layers()})")
        return t.float().numpy()

    def features(self, layer: str, which: str = "output") -> np.ndarray:
        """(N, C) float32 per-sample channel means of the layer's ``which`` ("input" | "output")."""
        t = self._get(layer, f"pooled_{which}")
        if t is None:
            raise ValueError(f"step {self.step} holds no pooled {which} of layer {layer!r}")
        return t.float().numpy()

    def mixture(self, layer: str) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The layer's own mixture per channel: weights, means, variances, each (K, C) float64; None when the
        layer has none."""
        parts = [self._get(layer, f"mixture_{n}") for n in ("weights", "means", "vars")]
        if any(p is None for p in parts):
            return None
        return tuple(p.double().numpy() for p in parts)  # type: ignore[return-value]

    def components(self, layer: str) -> Optional[np.ndarray]:
        t = self._get(layer, "components")
        return None if t is None else t.numpy().astype(np.int64)

    def nonfinite(self, layer: str) -> dict[str, int]:
        t = self._get(layer, "nonfinite")
        if t is None:
            return {v: 0 for v in SUMMARY_VIEWS}
        return {v: int(c) for v, c in zip(SUMMARY_VIEWS, t.tolist())}

    def array(self, name: str) -> Optional[np.ndarray]:
        """A probe-level array: "predictions", "labels", "context" (N,) int64, or None."""
        t = self.tensors.get(name)
        return None if t is None else t.numpy().astype(np.int64)


def read_summary(path: PathLike) -> Summary:
    """One summary file (safe: :func:`read_safetensors`); ``ValueError`` for a foreign or damaged file."""
    path = Path(path)
    m = _SUMMARY_RE.match(path.name)
    tensors, meta = read_safetensors(path, f"summary {path.name}")
    if meta.get("format") != "cbnorm-summary":
        raise ValueError(f"summary {path.name} at {path} is not a cbnorm summary (its metadata has format "
                         f"{meta.get('format')!r})")
    step = int(m.group(1)) if m else int(meta.get("step", -1))
    for k, t in tensors.items():
        if "::" in k and k.rsplit("::", 1)[1] in SUMMARY_VIEWS and t.dim() != 2:
            raise ValueError(f"summary {path.name}: {k} must be (C, M), got shape {tuple(t.shape)}")
    return Summary(step=step, tensors=tensors, meta=meta)


def find_runs(root: PathLike, max_depth: int = 6, limit: int = 500) -> list[Path]:
    """Run directories (holding config.json) under ``root``, nested folders included (as ``tensorboard
    --logdir``); ``root`` itself when it is a run. Hidden folders are skipped; a run's own folders are not
    searched; at most ``limit`` runs."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    out: list[Path] = []
    stack = [(root, 0)]
    while stack and len(out) < limit:
        d, depth = stack.pop()
        if (d / CONFIG_NAME).is_file():
            out.append(d)
            continue
        if depth >= max_depth:
            continue
        try:
            kids = sorted((p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True)
        except OSError:
            continue
        stack.extend((k, depth + 1) for k in kids)
    return sorted(out)

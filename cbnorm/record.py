"""Recording the normalization layers of any training loop: ``cbnorm.watch`` (the ``wandb.watch`` /
TensorBoard ``SummaryWriter`` shape).

```python
rec = cbnorm.watch(model, "runs/my-resnet-mn", probe=(x, y), every=100)   # x (N, ...), y (N,) optional
for step, (x, y) in enumerate(loader, 1):
    ...; loss.backward(); opt.step()
    rec.step(step, loss=loss.item(), lr=sched.get_last_lr()[0])   # scalars; the probe every `every` steps
rec.log(step, test_acc=acc)        # any scalar, any time
rec.close()                        # also a context manager
```

What is computed, and when
--------------------------
At each probe step (step 0 when ``watch`` is called, ``early`` log-spaced steps in [1, every), then every
``every`` steps, and the last step at ``close``) the model runs once on the fixed probe batch, under
``torch.no_grad()``, in eval mode by default (``mode="train"`` uses minibatch statistics and puts every
running buffer and the RNG back afterwards, so the probe never changes training). Forward hooks on each
recorded layer (``cbnorm.probe.capture`` with a ``reduce``) keep, on the training device:

* ``values_per_channel`` values per channel of the layer's input, x_hat (the normalized values before the
  affine, ``cbnorm.probe.normalized``) and output, at the same fixed positions for every step (a seeded draw
  over the N * positions of the probe batch), float16 (float32 where float16 would overflow);
* per-sample channel means of the input, x_hat and output (N, C): the features of the embedding views;
* the layer's own mixture marginalised per channel (``channel_mixture_parameters``: weights, means,
  variances (K, C)) where it has one, and each probe sample's component (``analysis.sample_components``);
* counts of non-finite values in each view (they are kept in the values and counted, never a crash);
* with ``scan=True``, the multimodality scan of the input and x_hat of every channel (``cbnorm.scan``: the
  number of 1-D Gaussian components with the lowest BIC, the BIC gain, ...), computed on the host on
  ``scan_values`` values per channel (default: the values kept), of which the first ``values_per_channel``
  are kept; it costs a batched GMM fit per layer and K at each probe step (``bench/multimodality.py``
  measures it: ~1 s per probe of a ResNet-20 on 1,024 values per channel);

and the model's predictions (argmax of a (N, classes) output). These go to CPU once per probe step and into
``summaries/step_XXXXXXXX.safetensors``, written whole (temporary file + rename). No host synchronisation
happens outside probe steps: scalars given as tensors are kept on their device and read at the next probe
step (or when 1,000 are pending, or at ``close``).

Robustness: rank 0 records under ``torch.distributed`` (the other ranks get a recorder that does nothing); a
``torch.compile``d, DDP-wrapped or Lightning module is probed through its eager module; a disk that is full
or read-only stops the recording with one warning (``Recorder.error``), never the training; a directory that
holds another run is refused unless ``resume=True`` (then steps from the first new step on are replaced, as
TensorBoard's ``purge_step``). The format is described in :mod:`cbnorm.runs`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
import warnings
from fnmatch import fnmatchcase
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save
from torch import Tensor, nn

from . import probe as P
from .analysis import sample_components
from .convert import route_contexts
from .data import load_dataset
from .runs import (CONFIG_NAME, FORMAT_VERSION, METRICS_LINES, STATUS_NAME, SUMMARY_DIR, SUMMARY_VIEWS,
                   atomic_write_bytes, list_summaries, load_run, read_json, read_metric_lines, save_snapshot,
                   summary_name, write_json_atomic)
from .scan import MAX_COMPONENTS as SCAN_COMPONENTS
from .scan import SCAN_VIEWS, scan_meta_entry, scan_tensors

__all__ = ["watch", "Recorder", "RecordingStopped", "probe_schedule", "describe_layer", "recorded_layers",
           "DEFAULT_VALUES_PER_CHANNEL", "DEFAULT_EARLY"]

log = logging.getLogger("cbnorm.record")

#: values per channel kept of each view (input, x_hat, output) at each probe step
DEFAULT_VALUES_PER_CHANNEL = 2048
#: log-spaced probe steps in [1, every) before ``every`` takes over
DEFAULT_EARLY = 6
#: scalar lines buffered before they are written (tensors among them are read then: one host sync)
MAX_PENDING = 1000
#: seconds between writes of buffered scalar lines that hold no tensor
FLUSH_SECONDS = 5.0
_F16_MAX = 65504.0


class RecordingStopped(UserWarning):
    """Warned once when a recorder stops (a full or read-only disk, ...); training goes on."""


def probe_schedule(every: int, early: int = DEFAULT_EARLY) -> tuple[int, set[int]]:
    """(every, early steps): a step s > 0 is probed when ``s % every == 0`` or s is one of ``early``
    log-spaced steps in [1, every) (dense where training moves fast; the trainer's ``--snapshot-early``)."""
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be a positive int (steps between probes), got {every!r}")
    if not isinstance(early, int) or isinstance(early, bool) or early < 0:
        raise ValueError(f"early must be an int >= 0 (log-spaced probes before `every`), got {early!r}")
    steps: set[int] = set()
    if early and every > 1:
        steps = {int(s) for s in np.unique(np.round(np.geomspace(1, every, early + 1)[:-1])) if 1 <= s < every}
    return every, steps


def describe_layer(path: str, module: nn.Module) -> dict:
    """What a run records of one normalization layer: its path, class, kind (cbnorm's name, or torch's
    class), width (channels), whether it has its own mixture or uses contexts, K, channel_last."""
    cls = type(module)
    kind = getattr(cls, "names", (cls.__name__.lower(),))[0]
    k = getattr(module, "num_components", None) or getattr(module, "num_contexts", None)
    return {"path": path, "class": cls.__name__, "kind": kind, "width": P.num_features(module),
            "has_mixture": bool(getattr(module, "has_mixture", False)),
            "uses_context": bool(getattr(module, "uses_context", False)),
            "num_components": None if k is None else int(k),
            "channel_last": bool(getattr(module, "channel_last", isinstance(module, nn.LayerNorm)))}


def _eager(model: nn.Module) -> nn.Module:
    """The module that runs eagerly under ``model``: unwraps torch.compile and DDP / DataParallel."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            break
    return model


def recorded_layers(model: nn.Module, layers: Any = None) -> list[str]:
    """Paths of the normalization layers to record: every one (torch's BatchNorm 1d/2d/3d, SyncBatchNorm,
    GroupNorm, LayerNorm and every cbnorm layer) or those matched by ``layers`` (fnmatch patterns on module
    paths, as ``convert``'s ``include``). ``ValueError`` naming the layers when a pattern matches none."""
    names = P.layer_names(_eager(model), torch_layers=True)
    if not names:
        raise ValueError(f"{type(_eager(model)).__name__} has no normalization layer to record (looked for torch's "
                         f"BatchNorm1d/2d/3d, SyncBatchNorm, GroupNorm, LayerNorm and cbnorm layers)")
    if layers is None:
        return names
    pats = [layers] if isinstance(layers, str) else list(layers)
    if not pats or not all(isinstance(p, str) for p in pats):
        raise ValueError(f"layers must be a pattern string or a list of them, got {layers!r}")
    for p in pats:
        if not any(fnmatchcase(n, p) for n in names):
            shown = ", ".join(repr(n) for n in names[:40]) + (" ..." if len(names) > 40 else "")
            raise ValueError(f"layers pattern {p!r} matches no normalization layer of "
                             f"{type(_eager(model)).__name__}; its normalization layers are: {shown}")
    return [n for n in names if any(fnmatchcase(n, p) for p in pats)]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (np.floating, np.integer)):
        return _jsonable(v.item())
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def _scalar(name: str, v: Any) -> Any:
    """A float (or a detached 0-d tensor, read later) of a logged scalar; ``TypeError`` otherwise."""
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise TypeError(f"scalar {name!r} must be a number or a one-element tensor, got a tensor of shape "
                            f"{tuple(v.shape)}")
        return v.detach().reshape(())
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    raise TypeError(f"scalar {name!r} must be a number or a one-element tensor, got {type(v).__name__}")


class Recorder:
    """What :func:`watch` returns: ``step(step, **scalars)``, ``log(step, **scalars)``, ``probe(step)``,
    ``close()``; a context manager. ``active`` is False on ranks other than 0 and after a failure
    (``error`` says why). See the module docstring."""

    def __init__(self, model: nn.Module, logdir: Any, probe: Any = None, *, every: int = 100,
                 early: int = DEFAULT_EARLY, layers: Any = None, context: Any = None, config: Optional[Mapping] = None,
                 class_names: Optional[Sequence[str]] = None, context_names: Optional[Sequence[str]] = None,
                 mode: str = "eval", values_per_channel: int = DEFAULT_VALUES_PER_CHANNEL, snapshots: bool = False,
                 resume: bool = False, seed: int = 0, run_config: Optional[Mapping] = None,
                 probe_init: bool = True, scan: bool = False, scan_values: Optional[int] = None) -> None:
        self.every, self.early_steps = probe_schedule(every, early)
        self.error: Optional[str] = None
        self.rank = _rank()
        self.active = self.rank == 0
        self.model = model
        self.logdir = Path(logdir).expanduser()
        self.last_step: Optional[int] = None
        self.last_probe: Optional[int] = None
        self._pending: list[dict] = []
        self._last_flush = time.monotonic()
        self._purge_from: Optional[int] = None
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        if not isinstance(values_per_channel, int) or values_per_channel < 16:
            raise ValueError(f"values_per_channel must be an int >= 16, got {values_per_channel!r}")
        self.mode, self.values_per_channel, self.snapshots, self.seed = mode, values_per_channel, snapshots, int(seed)
        if scan_values is not None and (not isinstance(scan_values, int) or isinstance(scan_values, bool)
                                        or scan_values < 16):
            raise ValueError(f"scan_values must be an int >= 16 or None, got {scan_values!r}")
        self.scan = bool(scan)
        #: values per channel the scan is computed on (the first values_per_channel of them are kept)
        self.scan_values = max(values_per_channel, scan_values or values_per_channel) if self.scan \
            else values_per_channel
        self.layers = recorded_layers(model, layers)
        modules = dict(_eager(model).named_modules())
        self.info = [describe_layer(n, modules[n]) for n in self.layers]
        self.x, self.y, self.context = self._check_probe(probe, context)
        self._index: dict[str, Tensor] = {}
        if not self.active:
            return
        self._open(config, class_names, context_names, resume, run_config)
        if probe_init and self._purge_from is None:
            self.probe(0)

    # ------------------------------------------------------------------ set-up
    def _device(self) -> torch.device:
        for t in _eager(self.model).parameters():
            return t.device
        for t in _eager(self.model).buffers():
            return t.device
        return torch.device("cpu")

    def _check_probe(self, probe: Any, context: Any) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        if probe is None:
            raise ValueError("probe is required: a fixed batch x (N, ...) or (x, y) with labels y (N,) that the "
                             "recorder runs the model on at every probe step")
        x, y = (probe, None) if isinstance(probe, Tensor) else (tuple(probe) + (None,))[:2] \
            if isinstance(probe, (tuple, list)) and 1 <= len(probe) <= 2 else (probe, None)
        if not isinstance(x, Tensor):
            raise TypeError(f"probe must be a tensor x (N, ...) or a pair (x, y), got {type(probe).__name__}")
        if x.dim() < 2 or x.shape[0] < 1:
            raise ValueError(f"probe x must be a batch (N, ...) with N >= 1, got shape {tuple(x.shape)}")
        if x.is_meta:
            raise ValueError("probe x is on the 'meta' device (it holds no values)")
        if not (x.is_floating_point() or x.dtype in (torch.long, torch.int32, torch.uint8)):
            raise TypeError(f"probe x has dtype {x.dtype}; expected a float tensor (or integer token ids)")
        n = x.shape[0]
        dev = self._device()
        if y is not None:
            y = torch.as_tensor(y)
            if y.shape != (n,):
                raise ValueError(f"probe labels y must have shape (N,) = ({n},), got {tuple(y.shape)}")
            y = y.to(torch.long).cpu()
        if context is not None:
            context = torch.as_tensor(context)
            if context.shape != (n,) or context.is_floating_point():
                raise ValueError(f"context must be integer ids of shape (N,) = ({n},), got "
                                 f"{tuple(context.shape)} {context.dtype}")
            context = context.to(device=dev, dtype=torch.long)
        # the probe lives on the training device (moved once here): a CPU batch for a CUDA model is fine
        return x.detach().to(dev), y, context

    def _open(self, config, class_names, context_names, resume: bool, run_config) -> None:
        d = self.logdir
        cfg_path = d / CONFIG_NAME
        if d.exists() and not d.is_dir():
            raise ValueError(f"logdir {d} exists and is not a directory")
        existing = cfg_path.is_file() or (d / METRICS_LINES).exists() or (d / SUMMARY_DIR).is_dir()
        if existing and not resume:
            what = "a run"
            try:
                old = read_json(cfg_path, "config.json")
                what = f"a run of {old.get('model', {}).get('class') or old.get('model', {}).get('name', '?')}"
            except (ValueError, AttributeError):
                pass
            raise ValueError(f"logdir {d} already holds {what}; choose another directory, or pass resume=True to "
                             f"continue it (steps from the first new one on are replaced)")
        recorder = {"by": "cbnorm.watch", "cbnorm_version": _version(), "every": self.every,
                    "early_steps": sorted(self.early_steps), "mode": self.mode,
                    "values_per_channel": self.values_per_channel, "seed": self.seed,
                    "scan": {"values": self.scan_values, "max_components": SCAN_COMPONENTS,
                             "views": list(SCAN_VIEWS)} if self.scan else None,
                    "probe": {"n": int(self.x.shape[0]), "shape": list(self.x.shape[1:]), "dtype": str(self.x.dtype),
                              "labels": self.y is not None, "context": self.context is not None},
                    "layers": self.info, "torch_version": torch.__version__}
        base = _eager(self.model)
        if run_config is not None:  # our trainer: its own (rebuildable) config, with the recorder added
            cfg = dict(run_config)
        else:
            cfg = {"task": "record", "model": {"class": type(base).__name__, "module": type(base).__module__},
                   "hyperparameters": _jsonable(dict(config or {})),
                   "class_names": [str(c) for c in class_names] if class_names is not None else None}
            if context_names is not None or self.context is not None:
                names = list(context_names) if context_names is not None else None
                cfg["contexts"] = {"names": names, "num_contexts": len(names) if names else None}
        cfg["format_version"] = FORMAT_VERSION
        cfg["recorder"] = recorder
        try:
            d.mkdir(parents=True, exist_ok=True)
            if existing and resume:
                old = read_json(cfg_path, "config.json") if cfg_path.is_file() else {}
                old_layers = [li.get("path") for li in (old.get("recorder") or {}).get("layers", [])]
                if old_layers and old_layers != self.layers:
                    raise ValueError(f"logdir {d} holds a run recording layers {old_layers}, not {self.layers}; "
                                     f"resume it with the same layers or choose another directory")
                self._purge_from = -1  # set at the first step
            write_json_atomic(cfg_path, cfg)
            self._write_status("running")
        except OSError as err:
            raise ValueError(f"cannot write the run directory {d}: {err}") from None

    # ------------------------------------------------------------------ user API
    def step(self, step: int, **scalars: Any) -> None:
        """End of optimizer step ``step`` (from 1): log ``scalars`` and probe when the schedule says so."""
        step = self._accept(step)
        if step is None:
            return
        if scalars:
            self._add_line(step, scalars)
        self.last_step = step if self.last_step is None else max(self.last_step, step)
        if step % self.every == 0 or step in self.early_steps:
            self.probe(step)
        elif time.monotonic() - self._last_flush > FLUSH_SECONDS and not self._has_tensors():
            self.flush()

    def log(self, step: int, **scalars: Any) -> None:
        """Log any scalars at ``step`` (test accuracy, an epoch's mean, ...); no probe."""
        step = self._accept(step)
        if step is None:
            return
        if scalars:
            self._add_line(step, scalars)
            if not self._has_tensors():
                self.flush()

    def probe(self, step: int, model: Optional[nn.Module] = None) -> None:
        """Compute and write the summaries of ``step`` now (``model``: another module of the same
        architecture, e.g. a snapshot being replayed; default the watched model)."""
        if not self.active:
            return
        step = self._check_step(step)
        try:
            tensors, meta = self._summaries(step, self.model if model is None else model)
            self.flush()
            atomic_write_bytes(self.logdir / SUMMARY_DIR / summary_name(step), save(tensors, metadata=meta))
            if self.snapshots and model is None:
                save_snapshot(self.logdir, _eager(self.model), step)
            self.last_probe = step
        except OSError as err:
            self._fail(f"writing the summaries of step {step} to {self.logdir} failed ({err})")
        except Exception as err:  # noqa: BLE001 - after the first probe, a failure stops the recording, not training
            if self.last_probe is None:
                raise  # the first probe: a probe or model the recorder cannot work with, said at once
            self._fail(f"computing the summaries of step {step} failed ({type(err).__name__}: {err})")

    def flush(self) -> None:
        """Write the buffered scalar lines (one host sync for those given as tensors)."""
        if not self.active or not self._pending:
            return
        lines, self._pending = self._pending, []
        tensors = [(i, k) for i, line in enumerate(lines) for k, v in line.items() if isinstance(v, Tensor)]
        if tensors:
            vals = torch.stack([lines[i][k].float().cpu() for i, k in tensors]).tolist()
            for (i, k), v in zip(tensors, vals):
                lines[i][k] = v
        text = "".join(json.dumps(_jsonable(line), allow_nan=False) + "\n" for line in lines)
        try:
            with open(self.logdir / METRICS_LINES, "a", encoding="utf-8") as f:
                f.write(text)
            self._last_flush = time.monotonic()
        except OSError as err:
            self._fail(f"appending metrics to {self.logdir / METRICS_LINES} failed ({err})")

    def close(self) -> None:
        """Probe the last step (if it was not), write what is buffered and mark the run finished."""
        if not self.active:
            return
        if self.last_step is not None and self.last_probe != self.last_step:
            self.probe(self.last_step)
        self.flush()
        if self.active:
            try:
                self._write_status("finished")
            except OSError as err:
                self._fail(f"writing {STATUS_NAME} failed ({err})")
        self.active = False

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _accept(self, step: Any) -> Optional[int]:
        """The checked step, after a resumed run's purge (at its first step); None when the recorder is not
        (or no longer) active."""
        if not self.active:
            return None
        step = self._check_step(step)
        if self._purge_from == -1:
            self._purge(step)
        return step if self.active else None

    def _check_step(self, step: Any) -> int:
        if isinstance(step, Tensor) and step.numel() == 1:
            step = int(step)
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an int >= 0 (optimizer steps so far), got {step!r}")
        return int(step)

    def _add_line(self, step: int, scalars: Mapping[str, Any]) -> None:
        line: dict[str, Any] = {"step": step, "wall": round(time.time(), 3)}
        for k, v in scalars.items():
            if k in ("step", "wall"):
                raise ValueError(f"scalar name {k!r} is reserved")
            line[k] = _scalar(k, v)
        self._pending.append(line)
        if len(self._pending) >= MAX_PENDING:
            self.flush()

    def _has_tensors(self) -> bool:
        return any(isinstance(v, Tensor) for line in self._pending for v in line.values())

    def _fail(self, message: str) -> None:
        self.error = message
        self.active = False
        self._pending = []
        msg = f"cbnorm recorder stopped recording: {message}. Training goes on; the run keeps what was written."
        log.warning(msg)
        warnings.warn(msg, RecordingStopped, stacklevel=3)

    def _write_status(self, state: str) -> None:
        write_json_atomic(self.logdir / STATUS_NAME,
                          {"state": state, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                           "last_step": self.last_step})

    def _purge(self, first_new: int) -> None:
        """Resuming: drop summaries and metric lines at steps >= ``first_new`` (TensorBoard's purge_step)."""
        self._purge_from = first_new
        try:
            for s, p in list_summaries(self.logdir):
                if s >= first_new:
                    p.unlink(missing_ok=True)
            lines = [ln for ln in read_metric_lines(self.logdir) if ln.get("step", 0) < first_new]
            text = "".join(json.dumps(ln) + "\n" for ln in lines)
            atomic_write_bytes(self.logdir / METRICS_LINES, text.encode("utf-8"))
        except (OSError, ValueError) as err:
            self._fail(f"resuming {self.logdir} at step {first_new} failed ({err})")

    def _positions(self, name: str, total: int, device: torch.device) -> Tensor:
        """The fixed positions of ``name``'s values: a seeded draw of ``scan_values`` of the ``total``
        positions whose first ``values_per_channel`` (sorted) are the ones kept; the rest (sorted) only feed
        the scan."""
        idx = self._index.get(name)
        if idx is None or int(idx.numel()) > total:
            g = torch.Generator().manual_seed(self.seed + len(self._index))
            perm = torch.randperm(total, generator=g)[:min(total, self.scan_values)]
            keep = min(total, self.values_per_channel)
            idx = torch.cat([perm[:keep].sort().values, perm[keep:].sort().values])
            self._index[name] = idx
        return idx.to(device)

    @torch.no_grad()
    def _summaries(self, step: int, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
        base = _eager(model)
        out: dict[str, Tensor] = {}
        counts: dict[str, list[Tensor]] = {}
        infos = {i["path"]: i for i in self.info}

        def reduce(name: str, module: nn.Module, inp: Tensor, xh: Optional[Tensor], y: Tensor):
            ch_last = infos[name]["channel_last"]
            views = {"input": inp, "x_hat": xh if xh is not None else y, "output": y}
            n = inp.shape[0]
            flat = {}
            for v, t in views.items():
                a = t.detach().float()
                a = a.movedim(-1, 1) if ch_last else a
                a = a.reshape(n, a.shape[1], -1)  # (N, C, P)
                flat[v] = a
            c, p = flat["input"].shape[1], flat["input"].shape[2]
            idx = self._positions(name, n * p, flat["input"].device)
            counts[name] = []
            for v, a in flat.items():
                vals = a.transpose(0, 1).reshape(c, n * p).index_select(1, idx)  # (C, M), sample-major positions
                out[f"{name}::{v}"] = vals
                counts[name].append((~torch.isfinite(a)).sum())
            for v in ("input", "x_hat", "output"):
                out[f"{name}::pooled_{v}"] = flat[v].mean(2)
            if infos[name]["has_mixture"]:
                try:
                    w, mu, var = module.channel_mixture_parameters()
                    out[f"{name}::mixture_weights"] = w.detach().float()
                    out[f"{name}::mixture_means"] = mu.detach().float()
                    out[f"{name}::mixture_vars"] = var.detach().float()
                except NotImplementedError:
                    pass
            comps = sample_components(module, inp)
            if comps is not None:
                out[f"{name}::components"] = torch.as_tensor(comps)
            return None

        was_training = base.training
        saved = contextlib.ExitStack()
        with saved:
            if self.mode == "train":
                saved.enter_context(P.preserved_state(base))
            base.train(self.mode == "train")
            try:
                with route_contexts(base, self.context):
                    result: dict = {}
                    P.capture(base, self.x, self.layers, allow_train=True, reduce=reduce, result=result)
                if not counts:
                    raise ValueError(f"none of the recorded layers ran when {type(base).__name__} was called on "
                                     f"the probe")
            except (RuntimeError, ValueError, TypeError, IndexError) as err:
                if self.last_probe is None and step == 0:
                    raise ValueError(f"the probe batch of shape {tuple(self.x.shape)} does not run through "
                                     f"{type(base).__name__}: {err}") from None
                raise
            finally:
                base.train(was_training)
        logits = result.get("output")
        if isinstance(logits, (tuple, list)) and logits and isinstance(logits[0], Tensor):
            logits = logits[0]
        if isinstance(logits, Tensor) and logits.dim() == 2 and logits.shape[0] == self.x.shape[0] \
                and logits.shape[1] > 1:
            out["predictions"] = logits.argmax(1)
        for name, cs in counts.items():
            out[f"{name}::nonfinite"] = torch.stack(cs)
        cpu: dict[str, Tensor] = {}
        keep = self.values_per_channel
        scan_in: dict[str, dict[str, Tensor]] = {}
        for k, v in out.items():
            v = v.detach().cpu()
            name, _, part = k.rpartition("::")
            if part in SUMMARY_VIEWS:
                if self.scan and part in SCAN_VIEWS:
                    scan_in.setdefault(name, {})[part] = v
                v = v[:, :keep]
            if v.is_floating_point() and k.rsplit("::", 1)[-1] in ("input", "x_hat", "output", "pooled_input",
                                                                   "pooled_x_hat", "pooled_output"):
                fin = v[torch.isfinite(v)]
                v = v.half() if fin.numel() == 0 or float(fin.abs().max()) <= _F16_MAX else v
            cpu[k] = v.contiguous()
        if self.y is not None:
            cpu["labels"] = self.y
        if self.context is not None:
            cpu["context"] = self.context.cpu()
        for name in counts:
            cpu[f"{name}::positions"] = self._index[name][:keep].to(torch.int64)
        meta = {"format": "cbnorm-summary", "step": str(step), "wall": f"{time.time():.3f}",
                "layers": json.dumps(self.layers), "mode": self.mode}
        if self.scan:
            cpu.update(scan_tensors(scan_in, SCAN_COMPONENTS, self.seed))
            m = min((int(t.shape[1]) for vs in scan_in.values() for t in vs.values()), default=0)
            meta["scan"] = scan_meta_entry(m, SCAN_COMPONENTS, self.seed)
        return cpu, meta


def _version() -> str:
    try:
        return version("cbnorm")
    except PackageNotFoundError:
        return "unknown"


def watch(model: nn.Module, logdir: Any, probe: Any = None, *, every: int = 100, **kwargs: Any) -> Recorder:
    """Record ``model``'s normalization layers into the run directory ``logdir`` (see the module docstring).

    ``probe``: a fixed batch x (N, ...) or (x, y) with labels y (N,); ``every``: steps between probes
    (``early`` log-spaced probes come before); ``layers``: fnmatch patterns on module paths (default every
    normalization layer); ``context``: context ids (N,) for the probe; ``config``: hyperparameters;
    ``class_names``; ``mode``: "eval" (default) or "train"; ``values_per_channel``; ``snapshots``: also the
    weights at probe steps; ``resume``: continue the run in ``logdir``; ``scan``: also the multimodality scan
    of every layer's input and x_hat (on ``scan_values`` values per channel).
    """
    return Recorder(model, logdir, probe, every=every, **kwargs)



# ============================================================================ replaying a run's snapshots
def replay(run_dir: Any, *, size: int = 256, seed: int = 0, values_per_channel: int = DEFAULT_VALUES_PER_CHANNEL,
           layers: Any = None, scan: bool = False, scan_values: Optional[int] = None,
           steps: Optional[Sequence[int]] = None) -> list[int]:
    """Compute the summaries of an existing classification run from its snapshots (``python -m
    cbnorm.record RUN_DIR``): the probe is ``size`` test images drawn with ``seed``, contexts inferred by the
    model (as at test time). ``steps``: only these snapshot steps (default all). Summaries written before are
    replaced. Returns the steps written."""
    only = steps
    run = load_run(run_dir)
    if run.config.get("task") != "classify":
        raise ValueError(f"{run.path} is a {run.config.get('task')!r} run; replaying snapshots needs a "
                         f"classification run (its test images are the probe)")
    if not run.snapshots:
        raise ValueError(f"{run.path} has no snapshots to replay (train with --snapshot-every)")
    ds = load_dataset(run.config["dataset"]["name"], "test")
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=min(int(size), len(ds)), replace=False))
    x = run.preprocess(np.asarray(ds.images[idx]))
    y = torch.as_tensor(np.asarray(ds.labels[idx]), dtype=torch.long)
    training = run.config.get("training") or {}
    steps = [s for s, _ in run.snapshots]
    every = int(training.get("snapshot_every") or 0) or max(1, steps[-1])
    if only is not None:
        missing = sorted(set(int(s) for s in only) - set(steps))
        if missing:
            raise ValueError(f"{run.path} has no snapshot at step(s) {missing} (snapshots: {steps})")
        steps = [s for s in steps if s in set(int(x) for x in only)]
    cfg = {k: v for k, v in run.config.items() if k != "recorder"}
    shutil.rmtree(run.path / SUMMARY_DIR, ignore_errors=True)
    rec = Recorder(run.model, run.path, (x, y), every=every, early=0, layers=layers,
                   values_per_channel=values_per_channel, resume=True, run_config=cfg, probe_init=False, seed=seed,
                   scan=scan, scan_values=scan_values)
    rec.early_steps = set(steps) - {s for s in steps if s % every == 0}
    for step in steps:
        rec.probe(step, model=run.load_snapshot(step))
        if not rec.active:
            raise ValueError(f"replaying {run.path} stopped: {rec.error}")
    rec.close()
    return steps


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cbnorm.record RUN_DIR [RUN_DIR ...]``: the summaries of existing runs from their snapshots."""
    p = argparse.ArgumentParser(prog="python -m cbnorm.record", description=main.__doc__)
    p.add_argument("runs", nargs="+", help="run directories written by python -m cbnorm.train")
    p.add_argument("--size", type=int, default=256, help="test images in the probe batch (256)")
    p.add_argument("--seed", type=int, default=0, help="draws the probe batch and the kept positions (0)")
    p.add_argument("--values-per-channel", type=int, default=DEFAULT_VALUES_PER_CHANNEL,
                   help=f"values kept per channel and view ({DEFAULT_VALUES_PER_CHANNEL})")
    p.add_argument("--layers", nargs="*", help="fnmatch patterns of the layers to record (default: all)")
    p.add_argument("--scan", action="store_true", help="also the multimodality scan (cbnorm.scan) of each layer")
    p.add_argument("--steps", type=int, nargs="*", help="only these snapshot steps (default: every snapshot)")
    p.add_argument("--scan-values", type=int, help="values per channel the scan is computed on (default: the "
                                                   "values kept; more are drawn, only --values-per-channel kept)")
    a = p.parse_args(argv)
    status = 0
    for d in a.runs:
        t0 = time.perf_counter()
        try:
            steps = replay(d, size=a.size, seed=a.seed, values_per_channel=a.values_per_channel, layers=a.layers,
                           scan=a.scan, scan_values=a.scan_values, steps=a.steps)
        except ValueError as err:
            print(f"{d}: {err}", file=sys.stderr)
            status = 1
            continue
        print(f"{d}: {len(steps)} steps recorded in {time.perf_counter() - t0:.1f} s", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())

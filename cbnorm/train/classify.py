"""Training CLI: ``python -m cbnorm.train ... --out checkpoints/NAME`` writes a run directory (cbnorm.runs).

    python -m cbnorm.train --dataset fashion-mnist --model shallow_cnn --norm acn --components 3 \\
        --contexts superclass --layers conv3 --width 0.5 --epochs 2 --batch-size 128 --lr 1e-3 \\
        --weight-decay 1e-4 --optimizer adamw --seed 0 --snapshot-every 200 --out checkpoints/acn
    python -m cbnorm.train --out checkpoints/acn --resume --epochs 4      # continue to epoch 4
    torchrun --nproc_per_node=2 -m cbnorm.train ...                        # DDP (gloo on CPU, nccl on CUDA)

* ``--components K`` -> ``num_components`` of mixture layers (mn, mode, acn); ``--contexts`` builds per-sample
  context ids from the dataset ("superclass": 4 for Fashion-MNIST, 20 for CIFAR-100; "kmeans:K"; "none")
  and gives ``num_contexts`` (and the priors lambda_k = share of training samples per context, unless
  ``--context-priors uniform``) to context layers (cn, cnx, cn-embed), which get the ids during training.
* Per step: the loss (averaged over DDP ranks). Per epoch: train accuracy (train mode, on the training
  batches), test accuracy with inferred contexts (``context=None``: the model's context predictor with
  ``--context-head``, else CN+ mixing; the honest number, ``test_acc``), CN+ mixing beside the predictor
  (``test_acc_mixed``), with the true contexts where they derive from the labels (``test_acc_oracle``: leaks
  the label, never the headline), test loss, seconds per step, wall time.
* ``--context-head``: a small CNN predicts the context from the image, trained with a second cross-entropy
  on the training contexts; at test time its prediction replaces the true context (cbnorm.models).
* Snapshots (float16) at step 0, every ``--snapshot-every`` steps and at the end, for the cluster-evolution view.
* ``--resume`` continues from the last finished epoch (model, optimizer, RNG, metrics) and gives the same
  results as an uninterrupted run; arguments not given are taken from the stored run.
* ``--batch-size`` is the global batch: under DDP each of the W ranks takes batch_size / W samples of the
  same global batch a single process would see (DistributedSampler), and layers with ``sync_stats`` compute
  their statistics over the whole global batch, so the run follows the single-process one.

Training batches drop the last incomplete batch (the same in every epoch: ``floor(N / batch_size)`` steps).
Weight decay applies to conv/linear weights only (not to biases or normalization-layer parameters).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._version import __version__
from ..data import ArrayDataset, KMeansContexts, apply_contexts, compute_mean_std, load_dataset, subset
from ..evaluate import load_split, score
from ..models import MODELS, PATH_MODELS
from .options import given_options, json_opt
from ..guard import StepGuard
from ..record import Recorder
from ..norms import NORMS, NonFiniteError, NormBase, accepted_kwargs, check_deferred, resolve_name
from .schedules import SCHEDULES, check_schedule, lr_at, parse_milestones, snapshot_steps
from ..runs import (CONFIG_NAME, DEFAULT_FILES, FORMAT_VERSION, METRICS_LINES, STATUS_NAME, SUMMARY_DIR,
                   TRAINING_DEFAULTS, build_model_from_config, count_parameters, load_resume_state, preprocess_images,
                   read_json, save_config, save_metrics, save_resume_state, save_snapshot, save_weights, snapshot_name,
                   validate_config)

__all__ = ["train", "main", "build_parser", "DEFAULTS"]

#: every option of the CLI (dest name -> default): the run format's (``cbnorm.runs.TRAINING_DEFAULTS``)
DEFAULTS = TRAINING_DEFAULTS
#: options that describe the environment, not the experiment (not stored in config.json "training")
_RUNTIME = ("out", "resume", "device", "threads", "quiet", "max_skipped", "record_size", "record_values",
            "record_scan")
#: options that may differ when resuming
_RESUMABLE = ("epochs", "snapshot_every", "eval_batch_size")
OPTIMIZERS = ("adamw", "sgd", "rmsprop")


def build_parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS  # absent options stay absent (resume fills them from the stored run)
    p = argparse.ArgumentParser(prog="python -m cbnorm.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=S)
    d = DEFAULTS
    g = p.add_argument_group("experiment")
    g.add_argument("--dataset", help=f"fashion-mnist, mnist, cifar10, cifar100, svhn, digits ({d['dataset']})")
    g.add_argument("--model", choices=sorted(MODELS), help=f"({d['model']}; resnet20/56: He et al.'s CIFAR "
                                                          f"ResNets, densenet40: the MN paper's DenseNet)")
    g.add_argument("--norm", help=f"norm of the studied layers: bn ln gn mn mode cn cnx cn-embed acn (or an "
                                  f"alias) ({d['norm']})")
    g.add_argument("--components", type=int, help=f"num_components of mixture layers ({d['components']})")
    g.add_argument("--contexts", help="none | superclass | kmeans:K (default: superclass where the dataset "
                                      "has superclasses, else none)")
    g.add_argument("--context-priors", choices=("data", "uniform"),
                   help="priors lambda_k of context layers: share of training samples per context, or uniform "
                        f"({d['context_priors']})")
    g.add_argument("--layers", help="which norm layers get --norm: for shallow_cnn comma-separated blocks among "
                                    "conv1..conv4 (conv3); for resnet*/densenet* comma-separated fnmatch patterns "
                                    "on module paths, e.g. 'layer3.*' or 'transition*,final' (all: '*'); the ViT "
                                    "always uses its patch norm")
    g.add_argument("--width", type=float, help=f"channel multiplier of the CNN / ResNet / DenseNet ({d['width']})")
    g.add_argument("--input-norm", help="norm on the image channels in front of the CNN (e.g. cn)")
    g.add_argument("--norm-kwargs", help='extra JSON keywords for the norm layers, e.g. \'{"update": '
                                         '"moving_average"}\'')
    g.add_argument("--context-head", action="store_true",
                   help="give a context model a small context predictor, trained on the contexts, used at test "
                        "time instead of the (label-derived) true context")
    g.add_argument("--model-kwargs", help='extra JSON keywords for the model, e.g. \'{"dim": 64, "depth": 2}\'')
    t = p.add_argument_group("optimisation")
    t.add_argument("--epochs", type=int, help=f"({d['epochs']})")
    t.add_argument("--batch-size", type=int, help=f"global batch size ({d['batch_size']})")
    t.add_argument("--lr", type=float, help=f"({d['lr']})")
    t.add_argument("--weight-decay", type=float, help=f"({d['weight_decay']})")
    t.add_argument("--optimizer", choices=OPTIMIZERS, help=f"({d['optimizer']})")
    t.add_argument("--momentum", type=float, help=f"momentum of sgd / rmsprop ({d['momentum']})")
    t.add_argument("--nesterov", action="store_true", help="Nesterov momentum for --optimizer sgd (the "
                                                            "DenseNet / ResNet protocol)")
    t.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule (cbnorm.train.schedules): "
                   "constant, exponential (x --lr-factor every --lr-every epochs; the MN paper: 0.93 every 2), "
                   f"step (x --lr-factor at --milestones), cosine ({d['schedule']})")
    t.add_argument("--lr-factor", type=float, help=f"factor of the exponential / step schedules ({d['lr_factor']})")
    t.add_argument("--lr-every", type=int, help=f"epochs between exponential decays ({d['lr_every']})")
    t.add_argument("--milestones", help="step schedule: fractions of the epochs, e.g. 0.5,0.75")
    t.add_argument("--warmup-steps", type=int, help=f"linear warm-up over this many updates ({d['warmup_steps']})")
    t.add_argument("--amp", action="store_true", help="mixed precision: float16 autocast + GradScaler on CUDA "
                                                       "(bfloat16 autocast on CPU)")
    t.add_argument("--seed", type=int, help=f"({d['seed']})")
    t.add_argument("--snapshot-every", type=int, help=f"steps between snapshots, 0 = only first and last "
                                                      f"({d['snapshot_every']})")
    t.add_argument("--snapshot-early", type=int, help="also this many log-spaced snapshots before the first "
                                                      "regular one (dense where training moves fast) (0)")
    t.add_argument("--record-size", type=int, help="test images of the probe batch that cbnorm.watch records every "
                                                   "normalization layer on at each snapshot step (summaries for the "
                                                   f"app); 0 = no recording ({d['record_size']})")
    t.add_argument("--record-values", type=int, help=f"values kept per channel and view ({d['record_values']})")
    t.add_argument("--record-scan", action="store_true", default=None,
                   help="also record the multimodality scan of every layer (cbnorm.scan) at each probe step")
    t.add_argument("--eval-every", type=int, help="evaluate every this many steps (and at step 0) on a fixed "
                                                  "stratified test subset of --eval-subset images; the full test "
                                                  "set is scored at every epoch end (0 = epoch ends only)")
    t.add_argument("--eval-subset", type=int, help=f"size of that subset ({d['eval_subset']})")
    t.add_argument("--limit-train", type=int, help="train on a stratified subset of this many images")
    t.add_argument("--limit-test", type=int, help="test on a stratified subset of this many images")
    t.add_argument("--eval-batch-size", type=int, help=f"({d['eval_batch_size']})")
    t.add_argument("--max-skipped", type=int,
                   help="a step whose batch is not finite is skipped (parameters, optimizer state and buffers as "
                        "before it, as GradScaler skips inf gradients); stop after this many in a row "
                        f"({d['max_skipped']})")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, help="run directory to write (e.g. checkpoints/NAME)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    r.add_argument("--device", help="auto | cpu | cuda | cuda:N (auto)")
    r.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    r.add_argument("--quiet", action="store_true", help="no progress bar, no per-epoch lines")
    return p


# ============================================================================ arguments
def _given(args_or_config: Any) -> dict[str, Any]:
    given = given_options(args_or_config, build_parser, DEFAULTS, "train()", "training options")
    if not given.get("out"):
        raise ValueError("the output run directory 'out' is required")
    if given.get("milestones") is not None:
        given["milestones"] = parse_milestones(given["milestones"])
    return given


def _check_args(a: dict) -> None:
    for k in ("epochs", "batch_size", "components", "eval_batch_size"):
        if isinstance(a[k], bool) or not isinstance(a[k], int) or a[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be a positive integer, got {a[k]!r}")
    for k in ("limit_train", "limit_test"):
        if a[k] is not None and (not isinstance(a[k], int) or a[k] < 1):
            raise ValueError(f"--{k.replace('_', '-')} must be a positive integer, got {a[k]!r}")
    for k in ("snapshot_every", "snapshot_early", "eval_every"):
        if isinstance(a[k], bool) or not isinstance(a[k], int) or a[k] < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be an integer >= 0, got {a[k]!r}")
    if isinstance(a["eval_subset"], bool) or not isinstance(a["eval_subset"], int) or a["eval_subset"] < 1:
        raise ValueError(f"--eval-subset must be a positive integer, got {a['eval_subset']!r}")
    check_schedule(a["schedule"], a["lr_factor"], a["lr_every"], a["milestones"], a["warmup_steps"])
    if a["milestones"] is not None:
        a["milestones"] = parse_milestones(a["milestones"])
    if a["nesterov"] and (a["optimizer"] != "sgd" or not a["momentum"] > 0):
        raise ValueError("--nesterov needs --optimizer sgd and --momentum > 0")
    if a["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {a['optimizer']!r}")
    if not (a["lr"] > 0 and math.isfinite(a["lr"])) or a["weight_decay"] < 0:
        raise ValueError(f"--lr must be > 0 and --weight-decay >= 0, got {a['lr']!r}, {a['weight_decay']!r}")
    if a["context_priors"] not in ("data", "uniform"):
        raise ValueError(f"--context-priors must be 'data' or 'uniform', got {a['context_priors']!r}")
    resolve_name(a["norm"])
    if a["input_norm"]:
        resolve_name(a["input_norm"])
    json_opt(a["norm_kwargs"], "norm_kwargs")
    json_opt(a["model_kwargs"], "model_kwargs")


# ============================================================================ distributed
class _Dist:
    """World info; initialises the default process group from torchrun's env (WORLD_SIZE, RANK, ...)."""

    def __init__(self, device_arg: str) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.owns_group = False
        self.ddp: Optional[nn.Module] = None
        world = int(os.environ.get("WORLD_SIZE", "1"))
        want_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if want_cuda else "gloo")
            self.owns_group = True
        self.enabled = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world = dist.get_world_size() if self.enabled else 1
        self.rank = dist.get_rank() if self.enabled else 0
        if want_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device(device_arg if device_arg.startswith("cuda:") else
                                       f"cuda:{local if self.enabled else torch.cuda.current_device()}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> list[float]:
        """Host numbers summed over ranks (:meth:`sum_tensor`)."""
        return self.sum_tensor(torch.tensor(list(values), dtype=torch.float64))

    def sum_tensor(self, t: torch.Tensor) -> list[float]:
        """``t`` (a small 1-D tensor, on any device) summed over ranks, read back in one transfer (the
        collective runs on the training device under NCCL, on the CPU under gloo)."""
        t = t.detach().to(device=self.device if self.device.type == "cuda" else "cpu", dtype=torch.float64)
        if self.enabled:
            self.dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            self.dist.barrier()

    def wrap(self, model: nn.Module, find_unused_parameters: bool) -> nn.Module:
        """The model under DDP, held here only: ``close`` releases it before the process group goes."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.ddp = DDP(model, device_ids=[self.device] if self.device.type == "cuda" else None,
                       find_unused_parameters=find_unused_parameters)
        return self.ddp

    def net(self, model: nn.Module) -> nn.Module:
        """What the training step calls: the DDP wrapper when there is one, else ``model``."""
        return model if self.ddp is None else self.ddp

    def close(self) -> None:
        """Release the DDP wrapper, then the process group we created. The order matters: a wrapper
        deallocated after ``destroy_process_group`` joins the gloo group's threads in its reducer's destructor
        and hangs there forever (seen in a spawned rank's native stack)."""
        self.ddp = None
        gc.collect()  # the reducer sits in reference cycles: free it now, not at some later collection
        if self.owns_group and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _needs_unused_detection(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx, dist: _Dist) -> bool:
    """Whether some parameter gets no gradient (DDP's find_unused_parameters): one probe step on a copy."""
    probe = copy.deepcopy(model).train()
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        F.cross_entropy(probe(x, context=ctx), y).backward()
    unused = any(p.requires_grad and p.grad is None for p in probe.parameters())
    return dist.sum([float(unused)])[0] > 0


# ============================================================================ data / config
def _prepare(a: dict, stored: Optional[dict]):
    """Training split (ArrayDataset with contexts) and the config of the run."""
    train = load_dataset(a["dataset"], "train")
    n_full = len(train)
    if a["limit_train"] is not None:
        train = subset(train, a["limit_train"], seed=a["seed"])
    spec = a["contexts"]
    if spec is None:
        spec = "superclass" if train.name in ("fashion-mnist", "cifar100") else "none"
    a["contexts"] = str(spec).strip().lower()
    km_state = (stored or {}).get("contexts", {}).get("kmeans") if stored else None
    if km_state:  # resume: the stored clustering, not a new fit
        km = KMeansContexts.from_state(km_state)
        train = train.with_contexts(km.predict(train.images), [f"cluster {i}" for i in range(km.n_contexts)])
    else:
        (train,), km = apply_contexts(spec, train, seed=a["seed"])
    norm = resolve_name(a["norm"])
    needs_ctx = [n for n in (norm, a["input_norm"]) if n and NORMS[resolve_name(n)].uses_context]
    if needs_ctx and train.contexts is None:
        raise ValueError(f"norm {needs_ctx[0]!r} needs per-sample contexts; pass --contexts superclass or "
                         f"kmeans:K (got --contexts {spec})")
    label_derived = train.contexts is not None and km is None
    table = None
    if label_derived:
        probe = ArrayDataset(np.zeros((train.num_classes, 1, 1), np.uint8), np.arange(train.num_classes),
                             train.class_names, name=train.name)
        (probe,), _ = apply_contexts(spec, probe)
        table = probe.contexts.tolist()
    k_ctx = train.num_contexts
    norm_kwargs: dict[str, Any] = {}
    used = {resolve_name(n) for n in (norm, a["input_norm"]) if n}
    accepted = set().union(*(accepted_kwargs(NORMS[n]) for n in used))
    if "num_components" in accepted:
        norm_kwargs["num_components"] = a["components"]
    if "num_contexts" in accepted and train.contexts is not None:
        norm_kwargs["num_contexts"] = k_ctx
        if a["context_priors"] == "data":
            counts = np.bincount(train.contexts, minlength=k_ctx).astype(np.float64)
            norm_kwargs["priors"] = [float(c) for c in np.maximum(counts, 1) / max(counts.sum(), 1)]
    norm_kwargs.update(json_opt(a["norm_kwargs"], "norm_kwargs"))
    if stored:
        pre = stored["preprocessing"]
    else:
        mean, std = compute_mean_std(train.images)
        pre = {"channels": train.channels, "image_size": [int(s) for s in train.images.shape[1:3]],
               "mean": [float(m) for m in mean], "std": [float(max(s, 1e-8)) for s in std]}
    model_kwargs = {"in_channels": train.channels, "num_classes": train.num_classes}
    if a["input_norm"] and a["model"] != "shallow_cnn":
        raise ValueError("--input-norm is only supported by --model shallow_cnn")
    if a["model"] in ("shallow_cnn",) + PATH_MODELS:
        model_kwargs["width"] = a["width"]
        default = "conv3" if a["model"] == "shallow_cnn" else "*"
        layers = [s.strip() for s in str(a["layers"] or default).split(",") if s.strip()]
        if not layers:
            raise ValueError(f"--layers holds no layer name or pattern: {a['layers']!r}")
    else:
        h, w = pre["image_size"]
        if h != w:
            raise ValueError(f"the vit model needs square images, got {h}x{w}")
        model_kwargs.update(image_size=h, patch_size=4 if h % 4 == 0 else (2 if h % 2 == 0 else 1))
        layers = ["patch_norm"]
    if a.get("context_head"):
        if not needs_ctx:
            raise ValueError("--context-head needs a context norm (cn, cnx, cn-embed) as --norm or --input-norm")
        model_kwargs["predict_contexts"] = int(k_ctx)
    model_kwargs.update(json_opt(a["model_kwargs"], "model_kwargs"))
    config = {
        "format_version": FORMAT_VERSION, "task": "classify", "cbnorm_version": __version__,
        "model": {"name": a["model"], "kwargs": model_kwargs},
        "norm": norm, "norm_kwargs": norm_kwargs, "layers": layers,
        "input_norm": resolve_name(a["input_norm"]) if a["input_norm"] else None,
        "dataset": {"name": train.name, "train_samples": len(train), "full_train_samples": n_full,
                    "limit_train": a["limit_train"], "limit_test": a["limit_test"], "subset_seed": a["seed"]},
        "contexts": {"spec": str(spec), "num_contexts": k_ctx, "names": train.context_names,
                     "label_derived": label_derived, "label_to_context": table,
                     "kmeans": km.state_dict() if km is not None else None},
        "class_names": list(train.class_names),
        "preprocessing": pre,
        "training": {k: a[k] for k in DEFAULTS if k not in _RUNTIME},
        "files": dict(DEFAULT_FILES),
    }
    return train, validate_config(config)



def _make_optimizer(model: nn.Module, a: dict) -> torch.optim.Optimizer:
    in_norm = {id(p) for m in model.modules() if isinstance(m, NormBase) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in in_norm else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": a["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if a["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=a["lr"])
    if a["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=a["lr"], momentum=a["momentum"], nesterov=bool(a["nesterov"]))
    return torch.optim.RMSprop(groups, lr=a["lr"], momentum=a["momentum"])


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def _summary(metrics: dict, params: int) -> dict:
    ep = metrics["epochs"]
    last = ep[-1] if ep else {}
    accs = [e["test_acc"] for e in ep]
    metrics.update(test_acc=last.get("test_acc"), test_acc_oracle=last.get("test_acc_oracle"),
                   test_acc_kmeans=last.get("test_acc_kmeans"), test_acc_mixed=last.get("test_acc_mixed"),
                   train_acc=last.get("train_acc"),
                   best_test_acc=max(accs) if accs else None, params=params, epochs_done=len(ep),
                   steps_done=last.get("step", 0))
    return metrics


# ============================================================================ training
def train(args_or_config: Any) -> Path:
    """Train (or resume) a run; returns its directory. Takes a Namespace, a dict of options (the CLI's
    names with underscores, e.g. ``{"norm": "acn", "limit_train": 512, "out": "runs/x"}``) or CLI args."""
    from tqdm import tqdm
    from torch.utils.data.distributed import DistributedSampler

    given = _given(args_or_config)
    out = Path(given["out"])
    resume = bool(given.get("resume", False))
    stored = None
    if (out / CONFIG_NAME).exists():
        if not resume:
            raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        stored = validate_config(read_json(out / CONFIG_NAME, "config.json"))
        stored_args = dict(stored.get("training") or {})
        diff = {k: (stored_args.get(k), v) for k, v in given.items()
                if k not in _RUNTIME and k not in _RESUMABLE and k in stored_args and stored_args[k] != v}
        if diff:
            raise ValueError(f"--resume with options that differ from the stored run {out}: "
                             + ", ".join(f"{k}: stored {s!r}, given {g!r}" for k, (s, g) in diff.items())
                             + f"; only {list(_RESUMABLE)} may change")
        a = {**DEFAULTS, **stored_args, **given}
        if a["epochs"] != stored_args.get("epochs") and a.get("schedule") in ("step", "cosine"):
            raise ValueError(f"--resume cannot change --epochs of a run with --schedule {a['schedule']}: its "
                             f"learning rates depend on the total length (stored {stored_args.get('epochs')})")
    else:
        a = {**DEFAULTS, **given}
    _check_args(a)
    if a["threads"]:
        torch.set_num_threads(int(a["threads"]))
    dist = _Dist(str(a["device"]))
    try:
        return _train(a, out, stored, dist, tqdm, DistributedSampler)
    finally:
        dist.close()


def _train(a: dict, out: Path, stored: Optional[dict], dist: _Dist, tqdm, DistributedSampler) -> Path:
    device = dist.device
    if a["batch_size"] % dist.world:
        raise ValueError(f"--batch-size {a['batch_size']} must be divisible by the number of ranks {dist.world}")
    train_ds, config = _prepare(a, stored)
    if stored is not None:
        for key in ("model", "norm", "norm_kwargs", "layers", "input_norm", "contexts", "class_names"):
            if json.dumps(stored.get(key), sort_keys=True) != json.dumps(config.get(key), sort_keys=True):
                raise ValueError(f"--resume: the stored run's {key!r} differs from what these options give "
                                 f"({stored.get(key)!r} vs {config.get(key)!r})")
        config = {**stored, "training": config["training"]}
    config["training"]["world_size"] = dist.world
    files = config["files"]
    pre = config["preprocessing"]
    test_ds, test_ctx = load_split(config, "test")
    torch.manual_seed(a["seed"])
    model = build_model_from_config(config).to(device)
    params = count_parameters(model)
    optimizer = _make_optimizer(model, a)
    uses_ctx = bool(getattr(model, "uses_context", False))
    has_predictor = getattr(model, "context_predictor", None) is not None

    metrics: dict[str, Any] = {"loss": [], "lr": [], "evals": [], "epochs": [], "skipped_steps": []}
    start_epoch, step, wall0 = 0, 0, 0.0
    resume_path = out / files["resume"]
    if stored is not None and resume_path.is_file():
        state, rng = load_resume_state(resume_path, model, optimizer, config)
        start_epoch, step, wall0 = int(state["epochs_done"]), int(state["step"]), float(state["wall"])
        old = read_json(out / files["metrics"], "metrics.json")
        metrics["loss"] = [r for r in old.get("loss", []) if r[0] <= step]
        metrics["lr"] = [r for r in old.get("lr", []) if r[0] <= step]
        metrics["evals"] = [r for r in old.get("evals", []) if r["step"] <= step]
        metrics["epochs"] = [r for r in old.get("epochs", []) if r["epoch"] <= start_epoch]
        metrics["skipped_steps"] = [s for s in old.get("skipped_steps", []) if s <= step]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    _summary(metrics, params)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(out, config)
        if start_epoch == 0:
            save_weights(out / files["weights"], model)
            save_metrics(out, metrics, files)
            save_snapshot(out, model, 0, files)
    dist.barrier()

    images = torch.from_numpy(train_ds.images)
    labels = torch.from_numpy(train_ds.labels)
    contexts = torch.from_numpy(train_ds.contexts) if train_ds.contexts is not None else None
    test_images, test_labels = torch.from_numpy(test_ds.images), torch.from_numpy(test_ds.labels)
    oracle_key = None
    if uses_ctx and test_ctx is not None:
        oracle_key = "test_acc_oracle" if config["contexts"]["label_derived"] else "test_acc_kmeans"
    sampler = DistributedSampler(range(len(train_ds)), num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                 seed=a["seed"], drop_last=True)
    local_bs = a["batch_size"] // dist.world
    steps_per_epoch = len(sampler) // local_bs
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {a['batch_size']} is larger than the training set ({len(train_ds)})")

    def batch(idx: torch.Tensor):
        x = preprocess_images(images[idx], pre["mean"], pre["std"], pre["channels"], pre["image_size"], device)
        ctx = contexts[idx].to(device) if uses_ctx else None
        return x, labels[idx].to(device), ctx

    if dist.enabled:  # the wrapper lives in dist only (dist.close releases it before the process group)
        sampler.set_epoch(start_epoch)
        first = torch.as_tensor(list(sampler)[:local_bs])
        dist.wrap(model, _needs_unused_detection(model, *batch(first), dist))
    show = not a["quiet"] and dist.main
    total_steps = a["epochs"] * steps_per_epoch
    snaps = snapshot_steps(total_steps, a["snapshot_every"], a["snapshot_early"])
    rec = _recorder(a, out, model, config, test_ds, total_steps, fresh=start_epoch == 0) if dist.main else None
    sched = dict(schedule=a["schedule"], steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                 factor=a["lr_factor"], every=a["lr_every"], milestones=a["milestones"], warmup_steps=a["warmup_steps"])
    cuda = device.type == "cuda"
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=bool(a["amp"]) and cuda)
    eval_ds = subset(test_ds, a["eval_subset"], seed=0) if a["eval_every"] and a["eval_subset"] < len(test_ds) \
        else test_ds
    eval_images, eval_labels = torch.from_numpy(eval_ds.images), torch.from_numpy(eval_ds.labels)

    def eval_subset_now() -> None:
        """Honest accuracy and loss on the fixed subset (inferred contexts), appended to metrics["evals"]."""
        part = torch.arange(dist.rank, len(eval_labels), dist.world)
        c, l, n = dist.sum(score(model, eval_images, eval_labels, pre, None, a["eval_batch_size"], device, part))
        metrics["evals"].append({"step": step, "test_acc": c / max(n, 1), "test_loss": l / max(n, 1), "n": int(n)})

    guard = StepGuard(model, max_consecutive=a["max_skipped"])
    if a["eval_every"] and step == 0 and not metrics["evals"]:
        eval_subset_now()
    session_start = time.perf_counter()
    for epoch in range(start_epoch, a["epochs"]):
        sampler.set_epoch(epoch)
        order = torch.as_tensor(list(sampler), dtype=torch.long)
        dist.net(model).train()
        correct = seen = 0
        step_time = 0.0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{a['epochs']}", leave=False,
                   disable=not show or not sys.stderr.isatty(), dynamic_ncols=True)
        for b in range(steps_per_epoch):
            t0 = time.perf_counter()
            x, y, ctx = batch(order[b * local_bs:(b + 1) * local_bs])
            lr = lr_at(step, a["lr"], **sched)
            for group in optimizer.param_groups:
                group["lr"] = lr
            guard.begin()  # a non-finite batch leaves parameters, optimizer state and buffers as they were
            try:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=bool(a["amp"])):
                    if has_predictor:  # joint loss: classes + the context predictor (on the training contexts)
                        logits, ctx_logits = dist.net(model)(x, context=ctx, return_context_logits=True)
                        loss = F.cross_entropy(logits.float(), y) + F.cross_entropy(ctx_logits.float(), ctx)
                    else:
                        logits = dist.net(model)(x, context=ctx)
                        loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                # the step's one host read: the loss (all ranks' mean) and whether to skip the step
                loss_sum, bad = dist.sum_tensor(torch.stack([loss.detach().float(), guard.bad(loss)]))
            except NonFiniteError as err:  # a layer's immediate check refused the batch (every rank alike)
                loss_sum, bad, reason = float("nan"), 1.0, str(err)
            else:
                reason = "the loss or a layer's statistics were not finite"
            step += 1
            if bad:
                guard.skip(optimizer, reason)  # raises after --max-skipped steps in a row
                metrics["skipped_steps"].append(step)
                if show:
                    print(f"step {step}: non-finite batch, step skipped ({reason.split(';')[0]})", flush=True)
            else:
                guard.stepped()
                scaler.step(optimizer)
                scaler.update()
                with torch.no_grad():
                    correct += int((logits.argmax(1) == y).sum())
                    seen += len(y)
                metrics["loss"].append([step, loss_sum / dist.world])
            step_time += time.perf_counter() - t0
            metrics["lr"].append([step, lr])
            if rec is not None:  # the loss is on the host already (the step's one read); probes at snapshot steps
                rec.step(step, loss=loss_sum / dist.world, lr=lr)
            if step in snaps or (a["eval_every"] and step % a["eval_every"] == 0):
                check_deferred(model)  # checks the layers deferred on the device (validate="auto" off the CPU)
            if dist.main and step in snaps:
                save_snapshot(out, model, step, files)
            if a["eval_every"] and step % a["eval_every"] == 0:
                eval_subset_now()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / dist.world:.4f}")
        bar.close()
        check_deferred(model)  # before the epoch's evaluation and saves
        c_train, n_train = dist.sum([correct, seen])
        # evaluation, sharded over ranks (eval-mode layers run no collectives)
        shard = torch.arange(dist.rank, len(test_labels), dist.world)
        c, l, n = score(model, test_images, test_labels, pre, None, a["eval_batch_size"], device, shard)
        c, l, n = dist.sum([c, l, n])
        record: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_acc": c_train / max(n_train, 1),
                                  "test_acc": c / max(n, 1)}
        if has_predictor:
            record["test_acc_mixed"] = dist.sum([score(model, test_images, test_labels, pre, None,
                                                       a["eval_batch_size"], device, shard,
                                                       predict_context=False)[0]])[0] / max(n, 1)
        if oracle_key == "test_acc_oracle":
            co = dist.sum([score(model, test_images, test_labels, pre, test_ctx, a["eval_batch_size"], device,
                                 shard)[0]])[0]
            record["test_acc_oracle"] = co / max(n, 1)
        elif oracle_key:
            co = dist.sum([score(model, test_images, test_labels, pre, test_ctx, a["eval_batch_size"], device,
                                 shard)[0]])[0]
            record["test_acc_kmeans"] = co / max(n, 1)
        # wall time with the machine's load beside it: a record of this run, not a cost of its norm (that is
        # bench/speed.py's, measured side by side)
        record.update(test_loss=l / max(n, 1), time_per_step_s=step_time / steps_per_epoch,
                      wall=wall0 + time.perf_counter() - session_start,
                      loadavg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        metrics["epochs"].append(record)
        if rec is not None:
            rec.log(step, **{k: v for k, v in record.items()
                             if k not in ("step", "wall") and isinstance(v, (int, float))})
        _summary(metrics, params)
        if dist.main:
            save_weights(out / files["weights"], model)
            if epoch + 1 == a["epochs"] and not (out / files["snapshots"] / snapshot_name(step)).exists():
                save_snapshot(out, model, step, files)
            save_metrics(out, metrics, files)
            save_resume_state(resume_path, model, optimizer,
                              {"epochs_done": epoch + 1, "step": step, "wall": record["wall"]}, _rng_state(device))
        dist.barrier()
        if show:
            extra = "".join(f" {k.replace('test_acc_', '')} {record[k]:.4f}" for k in ("test_acc_oracle",
                                                                                        "test_acc_kmeans")
                            if k in record)
            last_loss = metrics["loss"][-1][1] if metrics["loss"] else float("nan")
            print(f"epoch {epoch + 1}/{a['epochs']} step {step}: loss {last_loss:.4f} "
                  f"train_acc {record['train_acc']:.4f} test_acc {record['test_acc']:.4f}{extra} "
                  f"test_loss {record['test_loss']:.4f} ({record['time_per_step_s']:.3f} s/step)", flush=True)
    if rec is not None:
        rec.close()
    return out


def _recorder(a: dict, out: Path, model: nn.Module, config: dict, test_ds, total_steps: int, fresh: bool):
    """The run's recorder (cbnorm.watch; rank 0 only): every normalization layer on a fixed probe batch of
    ``--record-size`` test images (drawn with seed 0), probed at the snapshot steps (every ``--snapshot-every``,
    ``--snapshot-early`` log-spaced ones before, step 0 and the last); None with ``--record-size 0``. A fresh
    run starts from an empty record; a resumed one continues its own (steps after the resume point replaced)."""
    if not a["record_size"]:
        return None
    if fresh:
        for name in (METRICS_LINES, STATUS_NAME):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / SUMMARY_DIR, ignore_errors=True)
    n = min(int(a["record_size"]), len(test_ds))
    idx = np.sort(np.random.default_rng(0).choice(len(test_ds), size=n, replace=False))
    pre = config["preprocessing"]
    x = preprocess_images(torch.from_numpy(test_ds.images[idx]), pre["mean"], pre["std"], pre["channels"],
                          pre["image_size"], next(model.parameters()).device)
    y = torch.from_numpy(np.asarray(test_ds.labels[idx])).long()
    every = int(a["snapshot_every"]) or max(1, total_steps)
    # resume=True: config.json (ours, just written) is already there; a resumed run's later steps are purged
    rec = Recorder(model, out, (x, y), every=every, early=int(a["snapshot_early"] or 0),
                   values_per_channel=int(a["record_values"]), resume=True, run_config=config, probe_init=False,
                   scan=bool(a["record_scan"]))
    if fresh:
        rec.probe(0)
    return rec


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = train(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not getattr(args, "quiet", False) and int(os.environ.get("RANK", "0")) == 0:
        print(f"run written to {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

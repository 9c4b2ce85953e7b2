"""GAN training CLI: ``python -m cbnorm.train.gan ... --out checkpoints/gan-NAME`` trains a DCGAN
(cbnorm.models.dcgan) and writes a run directory of task "gan" (cbnorm.runs): the run's model is the
GENERATOR.

    python -m cbnorm.train.gan --dataset fashion-mnist --norm mn --layers norm1,norm2 --components 3 \\
        --norm-kwargs '{"em_iters": 1, "kmeans_iters": 1}' --steps 3000 --eval-every 250 \\
        --snapshot-every 500 --seed 0 --threads 1 --out checkpoints/gan-fmnist-mn-s0
    python -m cbnorm.train.gan --out checkpoints/gan-fmnist-mn-s0 --resume [--steps 6000]

Protocol (the MN paper's Sec. 4.5, the PKN paper's Sec. IV-B): Adam lr 2e-4, betas (0, 0.9) for both
networks, one discriminator update per generator update, the non-saturating loss (softplus form of the
binary cross-entropy); real images scaled to [-1, 1].

A run directory holds, besides config.json / metrics.json / model.safetensors (the generator, float32):

* ``latents.safetensors``: ``fixed`` (num_fixed, latent_dim), the latent vectors every snapshot draws
  (sample grids), drawn once from ``--seed``;
* ``snapshots/step_XXXXXX.safetensors``: float16 generator weights at step 0, every ``--snapshot-every``
  steps and at the end;
* ``resume.safetensors``: generator, discriminator, both optimizers and RNG states, written at every
  evaluation (delete it to commit a run: the app never reads it).

Scores (cbnorm.metrics) at step 0, every ``--eval-every`` steps and at the end, with the generator in eval
mode (running statistics) on ``--eval-samples`` latent vectors drawn from ``--eval-seed`` (the same for
every run): "FD in classifier features" against the real test split (all of it), k-NN precision / recall
against a fixed subset of ``--pr-samples`` real test images (k = ``--pr-k``), and the class coverage of the
classifier's predictions. The classifier (``--classifier``, a classify run directory) is recorded in
config.json by its path relative to the run directory and the SHA-256 of its weights.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._version import __version__
from ..data import load_dataset, subset
from ..models.base import filtered_kwargs
from ..models.dcgan import DCGANDiscriminator
from ..norms import check_deferred, resolve_name
from ..gan import (CHECKED, DEFAULT_CLASSIFIER, GAN_FILES, check_run, eval_latents, evaluate_generator,  # noqa: F401
                   fixed_latents, image_grid, load_classifier, real_reference, recompute, resolve_classifier,
                   sha256_of)
from .options import json_opt
from ..runs import (CONFIG_NAME, DEFAULT_FILES, FORMAT_VERSION, Run, _atomic_write_bytes, _inside, _load_into,
                    _save_safetensors, _state_tensors, build_model_from_config, count_parameters, load_run, read_json,
                    read_safetensors, save_config, save_snapshot, save_weights)

__all__ = ["DEFAULTS", "GAN_FILES", "build_parser", "train", "main", "fixed_latents", "eval_latents",
           "load_classifier", "real_reference", "evaluate_generator", "recompute", "check_run", "image_grid",
           "DEFAULT_CLASSIFIER"]

DEFAULTS: dict[str, Any] = {
    "dataset": "fashion-mnist", "split": "train", "norm": "bn", "layers": None, "components": 3, "norm_kwargs": None,
    "width": 8, "disc_width": None, "latent_dim": 64, "steps": 3000, "batch_size": 64, "lr": 2e-4, "beta1": 0.0,
    "beta2": 0.9, "seed": 0, "eval_every": 250, "eval_samples": 5000, "eval_seed": 1234, "pr_samples": 5000,
    "pr_k": 3, "min_share": 0.1, "snapshot_every": 500, "num_fixed": 64, "limit_train": None,
    "classifier": DEFAULT_CLASSIFIER, "out": None, "resume": False, "device": "auto", "threads": None,
    "quiet": False,
}
_RUNTIME = ("out", "resume", "device", "threads", "quiet", "classifier")
_RESUMABLE = ("steps", "eval_every", "snapshot_every")


def build_parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS
    p = argparse.ArgumentParser(prog="python -m cbnorm.train.gan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=S)
    d = DEFAULTS
    g = p.add_argument_group("experiment")
    g.add_argument("--dataset", help=f"fashion-mnist, mnist (28x28 grey), cifar10, cifar100, svhn (32x32 colour) "
                                     f"({d['dataset']})")
    g.add_argument("--split", choices=("train", "test"), help="split to train on (train; 'test' only for quick "
                                                               "checks: the scores compare with the test split)")
    g.add_argument("--norm", help=f"norm of the generator's chosen layers: bn mn acn mode ln gn ... ({d['norm']})")
    g.add_argument("--layers", help="comma-separated fnmatch patterns on the generator's norm paths norm1, norm2, "
                                    "norm3 (default: norm1,norm2, the MN paper's placement; '*' = all three)")
    g.add_argument("--components", type=int, help=f"num_components of mixture layers ({d['components']})")
    g.add_argument("--norm-kwargs", help='extra JSON keywords of the norm, e.g. \'{"em_iters": 1, "kmeans_iters": 1}\'')
    g.add_argument("--width", type=int, help=f"generator width w (channels 8w, 4w, 2w, w) ({d['width']})")
    g.add_argument("--disc-width", type=int, help="discriminator width (default: --width)")
    g.add_argument("--latent-dim", type=int, help=f"({d['latent_dim']})")
    t = p.add_argument_group("optimisation")
    t.add_argument("--steps", type=int, help=f"generator updates ({d['steps']})")
    t.add_argument("--batch-size", type=int, help=f"({d['batch_size']})")
    t.add_argument("--lr", type=float, help=f"Adam learning rate of both networks ({d['lr']})")
    t.add_argument("--beta1", type=float, help=f"({d['beta1']})")
    t.add_argument("--beta2", type=float, help=f"({d['beta2']})")
    t.add_argument("--seed", type=int, help=f"({d['seed']})")
    t.add_argument("--limit-train", type=int, help="train on a stratified subset of this many images")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-every", type=int, help=f"steps between scores, 0 = first and last only ({d['eval_every']})")
    e.add_argument("--eval-samples", type=int, help=f"generated samples per score ({d['eval_samples']})")
    e.add_argument("--eval-seed", type=int, help=f"seed of the scoring latents, the same for every run ({d['eval_seed']})")
    e.add_argument("--pr-samples", type=int, help=f"real test images for precision / recall ({d['pr_samples']})")
    e.add_argument("--pr-k", type=int, help=f"k of the k-NN balls ({d['pr_k']})")
    e.add_argument("--min-share", type=float, help="a class counts as a mode with at least this share of its "
                                                   f"uniform share of the samples ({d['min_share']})")
    e.add_argument("--snapshot-every", type=int, help=f"steps between generator snapshots ({d['snapshot_every']})")
    e.add_argument("--num-fixed", type=int, help=f"fixed latent vectors of the sample grids ({d['num_fixed']})")
    e.add_argument("--classifier", help=f"classify run directory whose features score the samples ({DEFAULT_CLASSIFIER})")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, help="run directory to write (e.g. checkpoints/gan-NAME)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last evaluation")
    r.add_argument("--device", help="auto | cpu | cuda (auto)")
    r.add_argument("--threads", type=int, help="torch CPU threads")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# ============================================================================ options
def _check_args(a: dict) -> None:
    ints = {"components": 1, "width": 1, "latent_dim": 1, "steps": 1, "batch_size": 2, "eval_samples": 2,
            "pr_samples": 2, "pr_k": 1, "num_fixed": 1, "eval_every": 0, "snapshot_every": 0}
    for k, lo in ints.items():
        if isinstance(a[k], bool) or not isinstance(a[k], int) or a[k] < lo:
            raise ValueError(f"--{k.replace('_', '-')} must be an integer >= {lo}, got {a[k]!r}")
    for k in ("disc_width", "limit_train"):
        if a[k] is not None and (isinstance(a[k], bool) or not isinstance(a[k], int) or a[k] < 1):
            raise ValueError(f"--{k.replace('_', '-')} must be a positive integer, got {a[k]!r}")
    if not (a["lr"] > 0 and math.isfinite(a["lr"])) or not (0 <= a["beta1"] < 1 and 0 <= a["beta2"] < 1):
        raise ValueError(f"--lr must be > 0 and betas in [0, 1), got {a['lr']!r}, {a['beta1']!r}, {a['beta2']!r}")
    if not 0 < a["min_share"] <= 1:
        raise ValueError(f"--min-share must be in (0, 1], got {a['min_share']!r}")
    if a["split"] not in ("train", "test"):
        raise ValueError(f"--split must be train or test, got {a['split']!r}")
    a["norm"] = resolve_name(a["norm"])
    a["norm_kwargs"] = json_opt(a["norm_kwargs"], "norm_kwargs") or None


def _layers(a: dict) -> list[str]:
    spec = a["layers"]
    if spec is None:
        return ["*"] if a["norm"] == "bn" else ["norm1", "norm2"]
    pats = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    if not pats:
        raise ValueError("--layers is empty; give patterns on norm1, norm2, norm3 (or '*')")
    return pats


def _norm_kwargs(a: dict) -> dict:
    """``num_components`` where the norm takes it, then ``--norm-kwargs`` as given (a wrong key raises)."""
    return {**filtered_kwargs(a["norm"], {"num_components": a["components"]}), **(a["norm_kwargs"] or {})}


# ============================================================================ resume state
def _save_resume(path: Path, g: nn.Module, d: nn.Module, opt_g, opt_d, state: Mapping, rng: Mapping[str, Tensor]):
    tensors: dict[str, Tensor] = {}
    meta: dict[str, str] = {"format": "pt", "trainer_state": json.dumps(dict(state))}
    for prefix, m in (("g", g), ("d", d)):
        tensors.update({f"{prefix}.{k}": v for k, v in _state_tensors(m).items()})
    for prefix, opt in (("opt_g", opt_g), ("opt_d", opt_d)):
        sd = opt.state_dict()
        scalars: dict[str, dict] = {}
        for pid, st in sd["state"].items():
            for name, val in st.items():
                if isinstance(val, Tensor):
                    tensors[f"{prefix}.{pid}.{name}"] = val
                else:
                    scalars.setdefault(str(pid), {})[name] = val
        meta[prefix] = json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})
    tensors.update({f"rng.{k}": v for k, v in rng.items()})
    _save_safetensors(path, tensors, meta)


def _load_resume(path: Path, g: nn.Module, d: nn.Module, opt_g, opt_d, config) -> tuple[dict, dict]:
    tensors, meta = read_safetensors(path, "resume state")
    try:
        state = json.loads(meta["trainer_state"])
        opts = {p: json.loads(meta[p]) for p in ("opt_g", "opt_d")}
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"resume state at {path} has malformed metadata ({err})") from None
    for prefix, m in (("g", g), ("d", d)):
        sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        try:
            m.load_state_dict(sub) if prefix == "d" else _load_into(m, sub, f"resume state at {path}", config)
        except RuntimeError as err:
            raise ValueError(f"resume state at {path} does not fit the discriminator: {err}") from None
    for prefix, opt in (("opt_g", opt_g), ("opt_d", opt_d)):
        st: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith(prefix + "."):
                _, pid, name = k.split(".", 2)
                st.setdefault(int(pid), {})[name] = v
        for pid, dd in opts[prefix]["scalars"].items():
            st.setdefault(int(pid), {}).update(dd)
        groups = opts[prefix]["param_groups"]
        for grp in groups:
            if isinstance(grp.get("betas"), list):
                grp["betas"] = tuple(grp["betas"])
        opt.load_state_dict({"state": dict(sorted(st.items())), "param_groups": groups})
    return state, {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}


# ============================================================================ training
def _options(given: dict) -> dict:
    out = Path(given["out"])
    if given.get("resume"):
        cfg = read_json(out / CONFIG_NAME, "config.json of the run to resume")
        stored = dict(cfg.get("training") or {})
        for k, v in given.items():
            if k in stored and k not in _RESUMABLE and k not in _RUNTIME and stored[k] != v:
                raise ValueError(f"--{k.replace('_', '-')} {v!r} differs from the stored run ({stored[k]!r}); only "
                                 f"{', '.join('--' + r.replace('_', '-') for r in _RESUMABLE)} may change on resume")
        a = {**DEFAULTS, **stored, **given}
    else:
        a = {**DEFAULTS, **given}
    return a


def _config(a: dict, classifier_dir: Path, classifier_sha: str, ds, out: Path) -> dict:
    c = 1 if ds.images.ndim == 3 else int(ds.images.shape[-1])
    size = int(ds.images.shape[1])
    try:
        rel = os.path.relpath(classifier_dir.resolve(), out.resolve())
    except ValueError:  # another drive
        rel = str(classifier_dir.resolve())
    return {
        "format_version": FORMAT_VERSION, "task": "gan", "cbnorm_version": __version__,
        "model": {"name": "dcgan", "kwargs": {"latent_dim": a["latent_dim"], "out_channels": c, "image_size": size,
                                              "width": a["width"]}},
        "norm": a["norm"], "norm_kwargs": _norm_kwargs(a), "layers": _layers(a), "input_norm": None,
        "discriminator": {"name": "dcgan", "kwargs": {"in_channels": c, "image_size": size,
                                                      "width": a["disc_width"] or a["width"]}},
        "dataset": {"name": a["dataset"], "split": a["split"], "train_samples": int(len(ds)),
                    "limit_train": a["limit_train"], "subset_seed": 0},
        "class_names": list(ds.class_names),
        "preprocessing": {"channels": c, "image_size": [size, size], "mean": [0.5] * c, "std": [0.5] * c},
        "latent": {"dim": a["latent_dim"], "distribution": "normal", "num_fixed": a["num_fixed"]},
        "evaluation": {"score": "FD in classifier features", "classifier": rel, "classifier_sha256": classifier_sha,
                       "real": "test split, all images", "eval_samples": a["eval_samples"],
                       "eval_seed": a["eval_seed"], "pr_samples": a["pr_samples"], "k": a["pr_k"],
                       "min_share": a["min_share"], "generator_mode": "eval"},
        "training": {k: v for k, v in a.items() if k not in _RUNTIME},
        "files": dict(GAN_FILES),
    }


def train(args: argparse.Namespace | Mapping | Sequence[str]) -> Path:
    """Train (or resume) a GAN run; returns the run directory."""
    if isinstance(args, (list, tuple)):
        args = build_parser().parse_args([str(x) for x in args])
    given = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown options {unknown}; valid: {sorted(DEFAULTS)}")
    a = _options(given)
    _check_args(a)
    out = Path(a["out"])
    if a["threads"]:
        torch.set_num_threads(int(a["threads"]))
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a["device"] == "auto" else a["device"])

    ds = load_dataset(a["dataset"], a["split"])
    if a["limit_train"]:
        ds = subset(ds, a["limit_train"], seed=0)
    if ds.images.shape[1] not in (28, 32) or ds.images.shape[1] != ds.images.shape[2]:
        raise ValueError(f"the DCGAN is sized for 28x28 or 32x32 images, {a['dataset']} has "
                         f"{tuple(ds.images.shape[1:3])}")
    classifier_dir = Path(a["classifier"])
    feats, clf = load_classifier(classifier_dir)
    clf_sha = sha256_of(_inside(clf.path, {**DEFAULT_FILES, **(clf.config.get("files") or {})}["weights"], "weights"))
    if clf.config["preprocessing"]["image_size"] != list(ds.images.shape[1:3]):
        raise ValueError(f"the feature classifier {classifier_dir} takes {clf.config['preprocessing']['image_size']} "
                         f"images, the data are {list(ds.images.shape[1:3])}")

    resume = bool(a["resume"])
    if resume:
        config = read_json(out / CONFIG_NAME, "config.json")
        config["training"] = {k: v for k, v in a.items() if k not in _RUNTIME}
        if config["evaluation"].get("classifier_sha256") != clf_sha:
            raise ValueError(f"--classifier {classifier_dir} is not the classifier the run was scored with")
    else:
        config = _config(a, classifier_dir, clf_sha, ds, out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(out, config)
    ref = real_reference(feats, clf_sha, a["dataset"], a["pr_samples"], a["pr_k"])

    torch.manual_seed(a["seed"])
    gen = build_model_from_config(config).to(dev)
    disc = DCGANDiscriminator(**config["discriminator"]["kwargs"]).to(dev)
    betas = (float(a["beta1"]), float(a["beta2"]))
    opt_g = torch.optim.Adam(gen.parameters(), lr=a["lr"], betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=a["lr"], betas=betas)
    gz = torch.Generator().manual_seed(a["seed"] + 1)  # training latents
    gd = np.random.default_rng  # data order: a permutation per epoch, from (seed, epoch)
    metrics: dict[str, Any] = {"loss": [], "evals": []}
    step = 0
    files = config["files"]
    resume_path = _inside(out, files["resume"], "files.resume")
    if resume:
        if not resume_path.is_file():
            raise ValueError(f"cannot resume {out}: {resume_path.name} is missing (a committed run has none)")
        state, rng = _load_resume(resume_path, gen, disc, opt_g, opt_d, config)
        step = int(state["step"])
        gz.set_state(rng["latents"])
        torch.set_rng_state(rng["torch"])
        m = read_json(out / files["metrics"], "metrics.json")
        metrics["loss"] = [r for r in m.get("loss", []) if r[0] <= step]
        metrics["evals"] = [e for e in m.get("evals", []) if e["step"] <= step]
        metrics["cpu_s"] = float(state.get("cpu_s", 0.0))
        metrics["train_s"] = float(state.get("train_s", 0.0))
    else:
        g0 = torch.Generator().manual_seed(a["seed"] + 2)
        z_fixed = torch.randn(a["num_fixed"], a["latent_dim"], generator=g0)
        _save_safetensors(_inside(out, files["latents"], "files.latents"), {"fixed": z_fixed}, {"format": "pt"})
        metrics.update(cpu_s=0.0, train_s=0.0)
    steps = int(a["steps"])
    if step > steps:
        raise ValueError(f"the run in {out} is at step {step}, past --steps {steps}")
    n, bs = len(ds), int(a["batch_size"])
    if bs > n:
        raise ValueError(f"--batch-size {bs} is larger than the {n} training images")
    per_epoch = n // bs
    images = torch.from_numpy(np.ascontiguousarray(ds.images))
    pre = config["preprocessing"]
    mean = torch.tensor(pre["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"], dtype=torch.float32).view(1, -1, 1, 1)

    def batch(s: int) -> Tensor:
        e, i = divmod(s, per_epoch)
        perm = gd([a["seed"], e]).permutation(n)
        u = images[torch.from_numpy(perm[i * bs:(i + 1) * bs])]
        x = u.unsqueeze(1) if u.dim() == 3 else u.permute(0, 3, 1, 2)
        return ((x.float() / 255.0 - mean) / std).to(dev)

    def is_eval(s: int) -> bool:
        return s == 0 or s == steps or (a["eval_every"] and s % a["eval_every"] == 0)

    def is_snapshot(s: int) -> bool:
        return s == 0 or s == steps or (a["snapshot_every"] and s % a["snapshot_every"] == 0)

    cpu0, interval_t, interval_n = time.process_time(), 0.0, 0

    def checkpoint(s: int) -> None:
        nonlocal interval_t, interval_n
        check_deferred(gen)  # the layers' checks deferred on the device (validate="auto" off the CPU)
        t0 = time.perf_counter()
        scores = evaluate_generator(gen, config, feats, ref)
        tps = interval_t / interval_n if interval_n else None
        metrics["evals"].append({"step": s, **scores, "time_per_step_s": tps, "eval_s": time.perf_counter() - t0})
        interval_t, interval_n = 0.0, 0
        if not a["quiet"]:
            print(f"step {s:6d}  FD (classifier features) {scores['fd']:8.3f}  precision {scores['precision']:.3f}  "
                  f"recall {scores['recall']:.3f}  modes {scores['modes']}/{len(config['class_names'])}  "
                  f"evenness {scores['evenness']:.3f}" + (f"  {tps * 1000:.1f} ms/step" if tps else ""), flush=True)
        _write(s)
        _save_resume(resume_path, gen, disc, opt_g, opt_d,
                     {"step": s, "cpu_s": metrics["cpu_s"], "train_s": metrics["train_s"]},
                     {"latents": gz.get_state(), "torch": torch.get_rng_state()})

    def _write(s: int) -> None:
        nonlocal cpu0
        metrics["cpu_s"] += time.process_time() - cpu0
        cpu0 = time.process_time()
        ev = [e for e in metrics["evals"] if math.isfinite(e["fd"])]
        best = min(ev, key=lambda e: e["fd"]) if ev else None
        tps = [e["time_per_step_s"] for e in metrics["evals"] if e.get("time_per_step_s")]
        metrics.update(steps_done=s, params=count_parameters(gen), disc_params=count_parameters(disc),
                       fd=metrics["evals"][-1]["fd"] if metrics["evals"] else None,
                       best_fd=best["fd"] if best else None, best_fd_step=best["step"] if best else None,
                       time_per_step_s=float(np.median(tps)) if tps else None, device=str(dev),
                       threads=torch.get_num_threads())
        save_weights(_inside(out, files["weights"], "files.weights"), gen)
        # compact JSON: one [step, loss_d, loss_g] per update is ~2.5x larger indented
        _atomic_write_bytes(_inside(out, files["metrics"], "files.metrics"),
                            (json.dumps(metrics, separators=(",", ":"), allow_nan=True) + "\n").encode("utf-8"))

    if not resume:
        save_snapshot(out, gen, 0, files)
        checkpoint(0)
    bar = None
    if not a["quiet"]:
        try:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=step, desc=f"{out.name}", unit="step", file=sys.stderr, mininterval=5)
        except ImportError:  # pragma: no cover
            bar = None
    gen.train()
    disc.train()
    while step < steps:
        t0 = time.perf_counter()
        real = batch(step)
        z = torch.randn(bs, a["latent_dim"], generator=gz).to(dev)
        fake = gen(z)
        loss_d = F.softplus(-disc(real)).mean() + F.softplus(disc(fake.detach())).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = F.softplus(-disc(fake)).mean()  # non-saturating generator loss
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        step += 1
        dt = time.perf_counter() - t0
        interval_t += dt
        interval_n += 1
        metrics["train_s"] += dt
        ld, lg = float(loss_d.detach()), float(loss_g.detach())
        metrics["loss"].append([step, round(ld, 5), round(lg, 5)])
        if not (math.isfinite(ld) and math.isfinite(lg)):
            _write(step)
            raise ValueError(f"training diverged at step {step} (discriminator loss {ld}, generator loss {lg})")
        if bar is not None:
            bar.update(1)
        if is_snapshot(step):
            save_snapshot(out, gen, step, files)
        if is_eval(step):
            if bar is not None:
                bar.clear()
            checkpoint(step)
            gen.train()
    if bar is not None:
        bar.close()
    if metrics["evals"] and metrics["evals"][-1]["step"] != steps:  # resumed at the end: nothing to do
        checkpoint(steps)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = train(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not getattr(args, "quiet", False):
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Recompute a run's test accuracy from its weights: ``python -m cbnorm.evaluate checkpoints/NAME``.

    python -m cbnorm.evaluate RUN_DIR [--limit N] [--check] [--tol 0.002] [--batch-size 1000]
                                      [--device cpu|cuda|auto] [--json]

Prints the test accuracy with inferred contexts (``context=None``: CN+ mixing for context layers; the honest
number), with the true contexts where they derive from the labels (``oracle``) and with the stored k-means
assignment for k-means contexts. ``--check`` exits with status 1 when a number differs from ``metrics.json``
by more than ``--tol``; status 2 when the check cannot be made (e.g. ``--limit`` differs from the training
run's ``--limit-test``). For a GAN run (task "gan") the last evaluation's scores are recomputed from the
generator's weights instead (FD in classifier features, precision / recall, modes; cbnorm.train.gan.check_run);
for a day-night run (task "daynight") its training-photo PSNRs and hold-out verification
(cbnorm.daynight.scores.check_run).

The test split is rebuilt exactly as the trainer built it (:func:`load_split`): same dataset, same subset
(``cbnorm.data.subset`` with the stored seed) and contexts from the stored label table / k-means state.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import KMeansContexts, load_dataset, subset
from .daynight.scores import check_run as check_daynight
from .gan import check_run as check_gan
from .runs import Run, load_run, preprocess_images

__all__ = ["score", "load_split", "evaluate_run", "main"]


@torch.no_grad()
def score(model: nn.Module, images: Tensor, labels: Tensor, preprocessing: Mapping, context: Optional[Tensor] = None,
          batch_size: int = 1000, device: str | torch.device = "cpu", indices: Optional[Tensor] = None,
          predict_context: bool = True) -> tuple[int, float, int]:
    """(correct, summed cross-entropy, count) of ``model`` in eval mode on uint8 ``images`` (N, H, W[, C]).

    ``context`` (N,) long or None (inferred: the model's context predictor when it has one, else CN+;
    ``predict_context=False`` forces CN+ mixing); ``indices`` restricts to those samples (a DDP shard).
    """
    kw = {} if getattr(model, "context_predictor", None) is None else {"predict_context": predict_context}
    was_training = model.training
    model.eval()
    idx = torch.arange(len(labels)) if indices is None else indices
    correct, loss, n = 0, 0.0, 0
    try:
        for i in range(0, len(idx), batch_size):
            b = idx[i:i + batch_size]
            x = preprocess_images(images[b], preprocessing["mean"], preprocessing["std"],
                                  int(preprocessing["channels"]), preprocessing["image_size"], device)
            y = labels[b].to(device)
            ctx = None if context is None else context[b].to(device)
            out = model(x, context=ctx, **kw)
            correct += int((out.argmax(1) == y).sum())
            loss += float(F.cross_entropy(out.float(), y, reduction="sum"))
            n += len(b)
    finally:
        model.train(was_training)
    return correct, loss, n


def load_split(config: Mapping, split: str = "test", limit: Optional[int] = None):
    """The ``split`` of a run's dataset as its trainer used it: ``(ArrayDataset, contexts (N,) long or None)``.

    ``limit`` defaults to the run's ``limit_test`` / ``limit_train``; contexts come from the stored label
    table (superclass) or k-means state, None when the run has none.
    """
    ds_cfg = config.get("dataset") or {}
    ds = load_dataset(ds_cfg["name"], split)
    if limit is None:
        limit = ds_cfg.get("limit_test" if split == "test" else "limit_train")
    if limit is not None:
        ds = subset(ds, int(limit), seed=int(ds_cfg.get("subset_seed", 0)))
    ctx_cfg = config.get("contexts") or {}
    contexts = None
    if ctx_cfg.get("label_derived"):
        contexts = torch.as_tensor(ctx_cfg["label_to_context"], dtype=torch.long)[torch.from_numpy(ds.labels)]
    elif ctx_cfg.get("kmeans"):
        contexts = torch.from_numpy(KMeansContexts.from_state(ctx_cfg["kmeans"]).predict(ds.images))
    return ds, contexts


def evaluate_run(run: Run | str, limit: Optional[int] = None, batch_size: int = 1000,
                 device: str | torch.device = "cpu") -> dict[str, Any]:
    """Accuracies of a run on its test split: test_acc (inferred), test_acc_oracle, test_acc_kmeans
    (None where not applicable), test_loss, n."""
    if not isinstance(run, Run):
        run = load_run(run, device=device)
    ds, contexts = load_split(run.config, "test", limit)
    images, labels = torch.from_numpy(ds.images), torch.from_numpy(ds.labels)
    pre = run.config["preprocessing"]
    c, loss, n = score(run.model, images, labels, pre, None, batch_size, run.device)
    out: dict[str, Any] = {"test_acc": c / max(n, 1), "test_loss": loss / max(n, 1), "n": n,
                           "test_acc_oracle": None, "test_acc_kmeans": None, "test_acc_mixed": None}
    if getattr(run.model, "context_predictor", None) is not None:
        cm, _, _ = score(run.model, images, labels, pre, None, batch_size, run.device, predict_context=False)
        out["test_acc_mixed"] = cm / max(n, 1)
    if run.uses_context and contexts is not None:
        key = "test_acc_oracle" if run.contexts.get("label_derived") else "test_acc_kmeans"
        c2, _, _ = score(run.model, images, labels, pre, contexts, batch_size, run.device)
        out[key] = c2 / max(n, 1)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cbnorm.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory (written by python -m cbnorm.train)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate on this many test images (default: the run's --limit-test, else all)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when an accuracy differs from metrics.json by more than --tol")
    p.add_argument("--tol", type=float, default=0.002)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    a = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    try:
        run = load_run(a.run, device=device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if run.config.get("task") == "gan":  # a generator: its last scores, recomputed (cbnorm.gan)
        return check_gan(run, a.check, a.tol, a.json)
    if run.config.get("task") == "daynight":  # a translator: its PSNR / verification (cbnorm.daynight.scores)
        return check_daynight(run, a.check, a.json)
    trained_limit = (run.config.get("dataset") or {}).get("limit_test")
    if a.check and a.limit is not None and a.limit != trained_limit:
        print(f"error: --check needs the test set the run was scored on (limit {trained_limit}), "
              f"got --limit {a.limit}", file=sys.stderr)
        return 2
    res = evaluate_run(run, a.limit, a.batch_size)
    mismatches = []
    rows = []
    for key, label in (("test_acc", "inferred context"), ("test_acc_mixed", "CN+ mixing, no predictor"),
                       ("test_acc_oracle", "oracle context"),
                       ("test_acc_kmeans", "k-means context")):
        if res[key] is None:
            continue
        stored = run.metrics.get(key)
        rows.append(f"{key:16s} {res[key]:.4f}  ({label}; metrics.json: "
                    f"{'n/a' if stored is None else format(stored, '.4f')})")
        if a.check and (stored is None or abs(float(stored) - res[key]) > a.tol):
            mismatches.append(f"{key}: recomputed {res[key]:.4f}, metrics.json {stored}")
    if a.json:
        print(json.dumps({**res, "run": str(run.path), "mismatches": mismatches}))
    else:
        print(f"{run.path}: {run.config['model']['name']} / {run.norm}, {res['n']} test images")
        print("\n".join(rows))
        print(f"{'test_loss':16s} {res['test_loss']:.4f}")
    if mismatches:
        print("check FAILED (tolerance %g): %s" % (a.tol, "; ".join(mismatches)), file=sys.stderr)
        return 1
    if a.check and not a.json:
        print(f"check passed (tolerance {a.tol})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

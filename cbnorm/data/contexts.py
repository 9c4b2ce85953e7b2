"""Contexts for Context Normalization: superclasses, k-means clusters (:class:`KMeansContexts`), domains; the
``--contexts`` spec (``parse_contexts_spec``, ``apply_contexts``) and :class:`ContextDataset`, a torch
``Dataset`` of ``(image, label, context)``. See :mod:`cbnorm.data`.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import (CIFAR100_COARSE_CLASSES, CIFAR100_FINE_TO_COARSE, FASHION_SUPERCLASS_NAMES, FASHION_SUPERCLASSES,
                       ArrayDataset, resize_images)

PathLike = str | os.PathLike[str]



def superclass_contexts(labels: np.ndarray, mapping: Mapping[int, int] | Sequence[int]) -> np.ndarray:
    """Map class labels to superclass contexts (``mapping[class] -> superclass``)."""
    pairs = [(int(k), int(v)) for k, v in (mapping.items() if isinstance(mapping, Mapping) else enumerate(mapping))]
    labels = np.asarray(labels, dtype=np.int64)
    size = max(int(labels.max()) + 1 if labels.size else 0, 1 + max((k for k, _ in pairs), default=-1))
    table = np.full(size, -1, dtype=np.int64)
    for k, v in pairs:
        table[k] = v
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    out = table[labels]
    if (out < 0).any():
        missing = sorted(set(labels[out < 0].tolist()))
        raise ValueError(f"superclass mapping does not cover classes {missing}")
    return out


def domain_contexts(n_source: int, n_target: int) -> np.ndarray:
    """``n_source`` zeros followed by ``n_target`` ones (0 = source, 1 = target)."""
    return np.concatenate([np.zeros(n_source, np.int64), np.ones(n_target, np.int64)])


def concat_domains(source: ArrayDataset, target: ArrayDataset, *, image_size: tuple[int, int] | None = None,
                   channels: int | None = None, shared_labels: bool | None = None) -> ArrayDataset:
    """Stack two datasets with domain contexts 0 = source, 1 = target.

    Images must end up the same shape: pass ``image_size``/``channels`` to resize
    both (e.g. MNIST -> SVHN: ``image_size=(32, 32), channels=3``).  Labels are shared
    when ``shared_labels`` (default: when both have the same class names, e.g. digits);
    otherwise target labels are offset by ``source.num_classes`` and names concatenated.
    """
    s_img, t_img = source.images, target.images
    if image_size is not None or channels is not None:
        s_img = resize_images(s_img, image_size, channels)
        t_img = resize_images(t_img, image_size, channels)
    if s_img.shape[1:] != t_img.shape[1:]:
        raise ValueError(f"image shapes differ ({source.name} {s_img.shape[1:]} vs {target.name} {t_img.shape[1:]}); "
                         "pass image_size=(H, W) and/or channels= to resize them")
    if shared_labels is None:
        shared_labels = source.class_names == target.class_names
    if shared_labels:
        if source.num_classes != target.num_classes:
            raise ValueError("shared_labels needs the same number of classes in both datasets")
        labels, names = np.concatenate([source.labels, target.labels]), list(source.class_names)
    else:
        labels = np.concatenate([source.labels, target.labels + source.num_classes])
        names = [f"{source.name}:{n}" for n in source.class_names] + [f"{target.name}:{n}" for n in target.class_names]
    return ArrayDataset(np.concatenate([s_img, t_img]), labels, names,
                        contexts=domain_contexts(len(source), len(target)), context_names=["source", "target"],
                        name=f"{source.name}+{target.name}")


class KMeansContexts:
    """k-means clusters of the (flattened, optionally pooled) training images used as contexts.

    Fit once on the training images (on at most ``max_samples`` of them, drawn with
    ``seed``); ``predict`` assigns the nearest center in numpy, so a model restored
    with :meth:`from_state` from a JSON-able :meth:`state_dict` predicts exactly the
    same contexts without sklearn or pickling.  ``pool`` averages ``pool x pool``
    pixel blocks first (cheaper features, less noise).
    """

    def __init__(self, n_contexts: int, seed: int = 0, max_samples: int | None = 10_000, pool: int = 1,
                 minibatch: bool = False) -> None:
        if n_contexts < 1 or pool < 1:
            raise ValueError("n_contexts and pool must be >= 1")
        self.n_contexts, self.seed, self.max_samples, self.pool, self.minibatch = n_contexts, seed, max_samples, pool, minibatch
        self.centers: np.ndarray | None = None  # float64 (K, D)
        self.image_shape: tuple[int, ...] | None = None

    def features(self, images: np.ndarray) -> np.ndarray:
        """float64 features (N, D): pixels scaled to [0,1], ``pool``-averaged, flattened."""
        x = np.asarray(images, dtype=np.float64) / 255.0
        if self.pool > 1:
            n, h, w = x.shape[:3]
            hp, wp = h // self.pool, w // self.pool
            x = x[:, : hp * self.pool, : wp * self.pool]
            x = x.reshape(n, hp, self.pool, wp, self.pool, *x.shape[3:]).mean(axis=(2, 4))
        return x.reshape(len(x), -1)

    def fit(self, images: np.ndarray) -> KMeansContexts:
        from sklearn.cluster import KMeans, MiniBatchKMeans

        images = np.asarray(images)
        if len(images) < self.n_contexts:
            raise ValueError(f"need at least {self.n_contexts} images to fit {self.n_contexts} clusters")
        if self.max_samples is not None and len(images) > self.max_samples:
            idx = np.sort(np.random.default_rng(self.seed).choice(len(images), self.max_samples, replace=False))
            images = images[idx]
        x = self.features(images).astype(np.float32)
        km = (MiniBatchKMeans(n_clusters=self.n_contexts, n_init="auto", random_state=self.seed, batch_size=1024)
              if self.minibatch else KMeans(n_clusters=self.n_contexts, n_init="auto", random_state=self.seed))
        km.fit(x)
        self.centers = np.asarray(km.cluster_centers_, dtype=np.float64)
        self.image_shape = tuple(int(s) for s in images.shape[1:])
        return self

    def predict(self, images: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Index of the nearest center for each image (int64)."""
        if self.centers is None:
            raise RuntimeError("KMeansContexts is not fitted")
        images = np.asarray(images)
        if self.image_shape is not None and tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"images of shape {images.shape[1:]}, fitted on {self.image_shape}")
        c2 = (self.centers**2).sum(1)
        out = np.empty(len(images), dtype=np.int64)
        for i in range(0, len(images), batch_size):
            f = self.features(images[i : i + batch_size])
            out[i : i + batch_size] = np.argmin(c2[None, :] - 2.0 * f @ self.centers.T, axis=1)
        return out

    def fit_predict(self, images: np.ndarray) -> np.ndarray:
        return self.fit(images).predict(images)

    def state_dict(self) -> dict:
        """Plain, JSON-serializable state (``json.dumps`` works on it)."""
        if self.centers is None:
            raise RuntimeError("KMeansContexts is not fitted")
        return {"type": "kmeans", "n_contexts": self.n_contexts, "seed": self.seed, "max_samples": self.max_samples,
                "pool": self.pool, "minibatch": self.minibatch, "image_shape": list(self.image_shape or ()),
                "centers": self.centers.tolist()}

    @classmethod
    def from_state(cls, state: Mapping) -> KMeansContexts:
        obj = cls(int(state["n_contexts"]), int(state.get("seed", 0)), state.get("max_samples"),
                  int(state.get("pool", 1)), bool(state.get("minibatch", False)))
        centers = np.asarray(state["centers"], dtype=np.float64)
        if centers.ndim != 2 or len(centers) != obj.n_contexts:
            raise ValueError(f"centers of shape {centers.shape} for {obj.n_contexts} contexts")
        obj.centers = centers
        obj.image_shape = tuple(int(s) for s in state.get("image_shape", ())) or None
        return obj


@dataclass(frozen=True)
class ContextSpec:
    """Parsed ``--contexts`` spec: kind in {"none", "superclass", "kmeans", "domain"}, k for kmeans."""

    kind: Literal["none", "superclass", "kmeans", "domain"]
    k: int | None = None

    def __str__(self) -> str:
        return f"kmeans:{self.k}" if self.kind == "kmeans" else self.kind


_SPEC_FORMS = "'none', 'superclass', 'kmeans:K' (K an integer >= 2), 'domain'"


def parse_contexts_spec(spec: str) -> ContextSpec:
    """Parse "none" | "superclass" | "kmeans:K" | "domain" (case-insensitive); ValueError otherwise."""
    s = str(spec).strip().lower()
    if s in ("none", "superclass", "domain"):
        return ContextSpec(s)  # type: ignore[arg-type]
    if s.startswith("kmeans:"):
        k = s.split(":", 1)[1]
        if k.isdigit() and int(k) >= 2:
            return ContextSpec("kmeans", int(k))
    raise ValueError(f"invalid contexts spec {spec!r}; valid forms: {_SPEC_FORMS}")


def apply_contexts(spec: str | ContextSpec, train: ArrayDataset, *others: ArrayDataset, seed: int = 0,
                   max_samples: int | None = 10_000, pool: int = 1
                   ) -> tuple[list[ArrayDataset], KMeansContexts | None]:
    """Give ``train`` (and ``others``, e.g. the test split) the contexts ``spec`` asks for.

    * none: contexts removed.  * superclass: Fashion-MNIST -> :data:`FASHION_SUPERCLASSES`,
      CIFAR-100 -> its 20 coarse labels.  * kmeans:K: fitted on ``train`` only, predicted
      for all.  * domain: keeps source/target contexts (from :func:`concat_domains`).

    Returns the datasets (train first) and the fitted :class:`KMeansContexts` (kmeans only).
    """
    sp = parse_contexts_spec(spec) if isinstance(spec, str) else spec
    dss = [train, *others]
    if sp.kind == "none":
        return [d.with_contexts(None) for d in dss], None
    if sp.kind == "kmeans":
        km = KMeansContexts(int(sp.k or 2), seed=seed, max_samples=max_samples, pool=pool).fit(train.images)
        names = [f"cluster {i}" for i in range(km.n_contexts)]
        return [d.with_contexts(km.predict(d.images), names) for d in dss], km
    if sp.kind == "domain":
        for d in dss:
            if d.contexts is None or d.context_names != ["source", "target"]:
                raise ValueError(f"{d.name}: 'domain' contexts need a dataset built with concat_domains()")
        return dss, None
    out = []
    for d in dss:
        if d.name == "fashion-mnist":
            out.append(d.with_contexts(superclass_contexts(d.labels, FASHION_SUPERCLASSES), FASHION_SUPERCLASS_NAMES))
        elif d.name == "cifar100":
            out.append(d.with_contexts(superclass_contexts(d.labels, CIFAR100_FINE_TO_COARSE),
                                       list(CIFAR100_COARSE_CLASSES)))
        else:
            raise ValueError(f"no superclass contexts defined for {d.name!r} (only fashion-mnist and cifar100)")
    return out, None


# --------------------------------------------------------------------------- torch side


class ContextDataset(Dataset):
    """Torch view of an :class:`ArrayDataset` yielding ``(image, label, context)``.

    ``image`` is a float32 (C,H,W) tensor in [0,1]; ``transform`` (if any) is applied
    to it, then ``(x - mean) / std`` when ``mean``/``std`` (per channel) are given.
    ``label`` and ``context`` are int64 scalars; context is -1 when the dataset has none.
    """

    def __init__(self, array_ds: ArrayDataset, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 mean: Sequence[float] | np.ndarray | None = None, std: Sequence[float] | np.ndarray | None = None) -> None:
        self.ds, self.transform = array_ds, transform
        imgs = torch.from_numpy(array_ds.images)
        self.images = imgs.unsqueeze(1) if imgs.ndim == 3 else imgs.permute(0, 3, 1, 2)  # uint8 (N,C,H,W) view
        self.labels = torch.from_numpy(array_ds.labels)
        ctx = array_ds.contexts if array_ds.contexts is not None else np.full(len(array_ds), -1, np.int64)
        self.contexts = torch.from_numpy(np.asarray(ctx, dtype=np.int64))
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        c = self.images.shape[1]
        self.mean = None if mean is None else torch.as_tensor(np.asarray(mean, np.float32).reshape(-1)).expand(c).reshape(c, 1, 1).clone()
        self.std = None if std is None else torch.as_tensor(np.asarray(std, np.float32).reshape(-1)).expand(c).reshape(c, 1, 1).clone()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.images[i].float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        return x, self.labels[i], self.contexts[i]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All samples at once (no ``transform``): images (N,C,H,W) float32, labels, contexts."""
        x = self.images.float().div_(255.0)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        return x.contiguous(), self.labels, self.contexts

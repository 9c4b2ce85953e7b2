"""Datasets that yield ``(image, label, context)`` for Context Normalization.

Context Normalization (CN) normalizes every sample with the mean/variance of the
*context* it belongs to, so each sample needs an integer context id next to its
label.  The two papers this library implements build contexts in three ways:

* **superclasses** -- groups of classes known in advance.  CIFAR-100 ships its
  100 fine classes grouped into 20 superclasses (its "coarse" labels); these are
  the contexts of the CIFAR-100 experiments in both papers.  For Fashion-MNIST
  we define :data:`FASHION_SUPERCLASSES` (tops / bottoms & dresses / footwear /
  bags) in the same spirit.
* **k-means clusters** -- when no prior structure is known, cluster the
  training images with k-means (K = 2..8 in the papers) once, before training,
  and use the cluster index as context (:class:`KMeansContexts`).
* **domains** -- in domain adaptation (MNIST -> SVHN with AdaMatch) or on a
  blended dataset (CIFAR-100 + MNIST digits), the context is the domain the
  sample comes from: 0 = source, 1 = target (:func:`concat_domains`).

References
----------
* B. Faye, H. Azzag, M. Lebbah, M.-D. Dilmi, D. Bouchaffra, "Context
  Normalization Layer with Applications", ICDM 2023 workshop DLC,
  hal-04456071 (``/work/shared/papers/context-normalization.txt``).
* B. Faye, H. Azzag, M. Lebbah, D. Bouchaffra, "Enhancing Neural Network
  Representations with Prior Knowledge-Based Normalization"
  (``/work/shared/papers/prior-knowledge-normalization.txt``).

The package: ``datasets`` (names, :class:`ArrayDataset`, the format readers, where files are looked for, one
loader per dataset), ``contexts`` (superclasses, k-means, domains, the ``--contexts`` spec, the torch
``Dataset``), ``download`` (the download client) and ``cli`` (``python -m cbnorm.data``); the shipped
Fashion-MNIST test split is ``fashion-mnist/`` beside them. Everything is importable from ``cbnorm.data``.

Loaders read the official on-disk formats directly (no torchvision, and nothing
is ever unpickled): IDX (MNIST, Fashion-MNIST), the CIFAR *binary* versions,
and SVHN's cropped-digit ``.mat`` files.  Each returns an :class:`ArrayDataset`
of uint8 images; :class:`ContextDataset` wraps one as a torch ``Dataset``.

Where files are looked for (``root=None``): ``$CBNORM_<NAME>`` if set (e.g.
``CBNORM_CIFAR10``; then only there), else ``$CBNORM_DATA`` (default
``~/.cache/cbnorm/data``); Fashion-MNIST looks in
:data:`FASHION_MNIST_SYSTEM_DIRS` (``/usr/share/datasets/fashion-mnist``, Debian
package ``dataset-fashion-mnist``) before ``$CBNORM_DATA/fashion-mnist``.  Inside
a root the usual sub-folders are accepted too (``MNIST/raw``,
``FashionMNIST/raw``, ``cifar-10-batches-bin``...).

The Fashion-MNIST *test* split also ships inside the package
(:data:`EMBEDDED_FASHION_MNIST`, checked against its SHA-256 on every load):
``load_fashion_mnist("test")`` falls back on it when no folder above has the
files, so the app works after a plain ``pip install``.  Everything else is
downloaded, verified and unpacked into the folders above by::

    python -m cbnorm.data download fashion-mnist [mnist cifar10 cifar100 svhn | all] [--root DIR]

(:func:`download`; ``--root DIR`` plays the part of ``$CBNORM_DATA``).
"""

from __future__ import annotations

from .cli import main
from .contexts import (ContextDataset, ContextSpec, KMeansContexts, apply_contexts, concat_domains, domain_contexts,
                       parse_contexts_spec, superclass_contexts)
from .datasets import (CIFAR10_CLASSES, CIFAR100_COARSE_CLASSES, CIFAR100_FINE_CLASSES, CIFAR100_FINE_TO_COARSE,
                       CIFAR100_SUPERCLASS_MEMBERS, DATASETS, EMBEDDED_FASHION_MNIST, EMBEDDED_FASHION_MNIST_SHA256,
                       FASHION_CLASSES, FASHION_MNIST_SYSTEM_DIRS, FASHION_SUPERCLASS_NAMES, FASHION_SUPERCLASSES,
                       MNIST_CLASSES, ArrayDataset, CorruptDataError, DatasetNotFound, compute_mean_std, load_cifar10,
                       load_cifar100, load_dataset, load_digits, load_fashion_mnist, load_mnist, load_svhn, read_idx,
                       resize_images, subset)
from .download import (DOWNLOADS, ChecksumMismatch, DownloadError, RemoteDataset, RemoteFile, data_root, download,
                       download_dir, download_file)

__all__ = [
    "ArrayDataset", "DatasetNotFound", "CorruptDataError", "DownloadError", "ChecksumMismatch",
    "DATASETS", "data_root", "read_idx",
    "FASHION_MNIST_SYSTEM_DIRS", "EMBEDDED_FASHION_MNIST", "EMBEDDED_FASHION_MNIST_SHA256",
    "RemoteFile", "RemoteDataset", "DOWNLOADS", "download", "download_file", "download_dir",
    "load_fashion_mnist", "load_mnist", "load_cifar10", "load_cifar100", "load_svhn",
    "load_digits", "load_dataset",
    "FASHION_CLASSES", "FASHION_SUPERCLASS_NAMES", "FASHION_SUPERCLASSES",
    "CIFAR10_CLASSES", "CIFAR100_COARSE_CLASSES", "CIFAR100_FINE_CLASSES",
    "CIFAR100_SUPERCLASS_MEMBERS", "CIFAR100_FINE_TO_COARSE",
    "superclass_contexts", "KMeansContexts", "domain_contexts", "concat_domains",
    "resize_images", "ContextSpec", "parse_contexts_spec", "apply_contexts",
    "ContextDataset", "compute_mean_std", "subset",
]

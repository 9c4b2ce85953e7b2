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

import argparse
import dataclasses
import gzip
import hashlib
import http.client
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

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

PathLike = str | os.PathLike[str]

_log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- names

FASHION_CLASSES: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MNIST_CLASSES: list[str] = [str(d) for d in range(10)]
CIFAR10_CLASSES: list[str] = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
#: CIFAR-100 superclass (coarse label) -> its 5 fine classes, as published by the dataset authors.
CIFAR100_SUPERCLASS_MEMBERS: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
#: The 20 coarse label names in label order (alphabetical, as in ``coarse_label_names.txt``).
CIFAR100_COARSE_CLASSES: list[str] = list(CIFAR100_SUPERCLASS_MEMBERS)
#: The 100 fine label names in label order (alphabetical, as in ``fine_label_names.txt``).
CIFAR100_FINE_CLASSES: list[str] = sorted(n for ms in CIFAR100_SUPERCLASS_MEMBERS.values() for n in ms)
#: fine label index -> coarse label index.
CIFAR100_FINE_TO_COARSE: list[int] = [
    next(c for c, ms in enumerate(CIFAR100_SUPERCLASS_MEMBERS.values()) if n in ms)
    for n in CIFAR100_FINE_CLASSES
]

#: Names of the 4 Fashion-MNIST superclasses (context ids 0..3).
FASHION_SUPERCLASS_NAMES: list[str] = ["tops", "bottoms & dresses", "footwear", "bags"]
#: Fashion-MNIST class index -> superclass index.  Garments worn on the upper body
#: (T-shirt/top, Pullover, Coat, Shirt) -> 0 "tops"; Trouser, Dress -> 1 "bottoms &
#: dresses"; Sandal, Sneaker, Ankle boot -> 2 "footwear"; Bag -> 3 "bags".
FASHION_SUPERCLASSES: dict[int, int] = {0: 0, 1: 1, 2: 0, 3: 1, 4: 0, 5: 2, 6: 0, 7: 2, 8: 3, 9: 2}

Split = Literal["train", "test"]

# --------------------------------------------------------------------------- container


@dataclass
class ArrayDataset:
    """An in-memory image dataset: uint8 images, int64 labels, optional int64 contexts."""

    images: np.ndarray  # uint8, (N, H, W) or (N, H, W, C)
    labels: np.ndarray  # int64, (N,)
    class_names: list[str]
    contexts: np.ndarray | None = None  # int64, (N,)
    context_names: list[str] | None = None
    name: str = ""
    #: where the arrays were read from (a folder, or "" when built in memory)
    source: str = ""

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
            raise ValueError(f"{self.name}: images must be uint8 (N,H,W) or (N,H,W,C), "
                             f"got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"{self.name}: {len(self.images)} images but labels of shape {self.labels.shape}")
        if self.contexts is not None:
            self.contexts = np.asarray(self.contexts, dtype=np.int64)
            if self.contexts.shape != self.labels.shape:
                raise ValueError(f"{self.name}: contexts of shape {self.contexts.shape}, expected {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_contexts(self) -> int:
        """Number of contexts (0 when the dataset carries none)."""
        if self.contexts is None:
            return 0
        if self.context_names is not None:
            return len(self.context_names)
        return int(self.contexts.max()) + 1 if len(self.contexts) else 0

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else self.images.shape[-1]

    def with_contexts(self, contexts: np.ndarray | None, context_names: list[str] | None = None) -> ArrayDataset:
        """A copy (sharing the image array) with other contexts."""
        return dataclasses.replace(self, contexts=contexts, context_names=context_names if contexts is not None else None)

    def take(self, indices: np.ndarray) -> ArrayDataset:
        """The samples at ``indices`` (a copy)."""
        idx = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx],
                                   contexts=None if self.contexts is None else self.contexts[idx])


class DatasetNotFound(FileNotFoundError):
    """A dataset's files are not on disk; the message says where we looked and how to get them."""


class CorruptDataError(ValueError):
    """A file shipped with cbnorm does not match its recorded SHA-256."""


# --------------------------------------------------------------------------- IDX

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """File content, gunzipped when it starts with the gzip magic; ValueError when the gzip is broken."""
    return _gunzip(path.read_bytes(), path)


def _gunzip(raw: bytes, path: Path) -> bytes:
    """``raw`` gunzipped when it starts with the gzip magic, else as is; ValueError naming ``path`` if broken."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from e


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or plain) into a native-endian numpy array.

    Header: two zero bytes, a dtype code (0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int,
    0x0D float, 0x0E double), the number of dimensions, then each dimension as a
    big-endian uint32.  Raises ``ValueError`` naming the file when the magic number
    is wrong or the payload size does not match the dimensions.
    """
    path = Path(path)
    return _parse_idx(_read_bytes(path), path)


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    """The array in IDX bytes ``data`` (already gunzipped); errors name ``path``."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or data[3] == 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, expected {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX file {what}: {len(data)} bytes, expected {expected} for shape {dims}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


# --------------------------------------------------------------------------- locating files


def data_root() -> Path:
    """``$CBNORM_DATA`` or ``~/.cache/cbnorm/data``."""
    return Path(os.environ.get("CBNORM_DATA") or Path.home() / ".cache" / "cbnorm" / "data").expanduser()


def _roots(root: PathLike | None, env: str, defaults: Sequence[PathLike] | None = None) -> list[Path]:
    """``[root]``, else ``[$env]``, else ``defaults`` (default: ``[data_root()]``)."""
    if root is not None:
        return [Path(root).expanduser()]
    if os.environ.get(env):
        return [Path(os.environ[env]).expanduser()]
    return [Path(p) for p in defaults] if defaults is not None else [data_root()]


def _find_dir(roots: Sequence[Path], subdirs: Sequence[str], files: Sequence[Sequence[str]]) -> tuple[Path, list[Path]]:
    """First directory among ``root/sub`` holding every file (each given as alternatives)."""
    tried: list[Path] = []
    for r in roots:
        for sub in ("", *subdirs):
            d = r / sub if sub else r
            tried.append(d)
            found = [next((d / a for a in alts if (d / a).is_file()), None) for alts in files]
            if all(f is not None for f in found):
                return d, [f for f in found if f is not None]
    raise LookupError(tried)


def _not_found(title: str, tried: list[Path], files: Sequence[str], how: str) -> DatasetNotFound:
    where = ", ".join(str(t) for t in tried)
    return DatasetNotFound(f"{title} not found: looked for {', '.join(files)} in {where}. {how}")


def _check_split(split: str, allowed: Sequence[str] = ("train", "test")) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {list(allowed)}, got {split!r}")


# --------------------------------------------------------------------------- loaders


def _idx_files(split: str) -> list[str]:
    prefix = "train" if split == "train" else "t10k"
    return [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]


def _idx_dataset(images: np.ndarray, labels: np.ndarray, img_path: Path, lbl_path: Path,
                 class_names: list[str], name: str) -> ArrayDataset:
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{img_path}: expected uint8 images of shape (N,H,W), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"{lbl_path}: {labels.shape[0] if labels.ndim else 0} labels for {len(images)} images in {img_path}")
    if labels.size and labels.max() >= len(class_names):
        raise ValueError(f"{lbl_path}: label {labels.max()} out of range for {len(class_names)} classes")
    return ArrayDataset(images, labels.astype(np.int64), list(class_names), name=name, source=str(img_path.parent))


def _load_idx_pair(title: str, split: str, roots: list[Path], subdirs: Sequence[str], how: str,
                   class_names: list[str], name: str) -> ArrayDataset:
    _check_split(split)
    stems = _idx_files(split)
    alts = [[s + ".gz", s] for s in stems]
    try:
        _, (img_path, lbl_path) = _find_dir(roots, subdirs, alts)
    except LookupError as e:
        raise _not_found(f"{title} ({split} split)", e.args[0], [s + "[.gz]" for s in stems], how) from None
    return _idx_dataset(read_idx(img_path), read_idx(lbl_path), img_path, lbl_path, class_names, name)


#: System folders searched for Fashion-MNIST when neither ``root=`` nor ``$CBNORM_FASHION_MNIST`` is given,
#: before ``$CBNORM_DATA/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package installs here).
FASHION_MNIST_SYSTEM_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)

#: The Fashion-MNIST test split shipped inside the package (see its README.md for source and licence).
EMBEDDED_FASHION_MNIST: Path = Path(__file__).resolve().parent / "_data" / "fashion-mnist"

#: SHA-256 of each shipped file (images first); checked on every load.
EMBEDDED_FASHION_MNIST_SHA256: dict[str, str] = {
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}


def _embedded_fashion_test() -> ArrayDataset | None:
    """The shipped Fashion-MNIST test split; None when its files are missing, CorruptDataError when damaged."""
    folder = EMBEDDED_FASHION_MNIST
    paths = [folder / fname for fname in EMBEDDED_FASHION_MNIST_SHA256]
    if not all(p.is_file() for p in paths):
        return None
    arrays = []
    for p in paths:
        raw = p.read_bytes()
        got, want = hashlib.sha256(raw).hexdigest(), EMBEDDED_FASHION_MNIST_SHA256[p.name]
        if got != want:
            raise CorruptDataError(
                f"{p}: the copy of the Fashion-MNIST test split shipped with cbnorm is damaged (SHA-256 {got}, "
                f"expected {want}; {len(raw)} bytes). Reinstall cbnorm, or download the dataset with "
                f"`python -m cbnorm.data download fashion-mnist` (into {download_dir('fashion-mnist')}, which is "
                "read before the shipped copy).")
        arrays.append(_parse_idx(_gunzip(raw, p), p))
    return _idx_dataset(arrays[0], arrays[1], paths[0], paths[1], FASHION_CLASSES, "fashion-mnist")


def _download_hint(name: str, root: PathLike | None, args: str = "") -> str:
    cmd = f"python -m cbnorm.data download {name}{args}" + (f" --root {root}" if root is not None else "")
    where = Path(root).expanduser() / DOWNLOADS[name].subdir if root is not None else download_dir(name)
    return f"Download it with `{cmd}` (into {where})"


def load_fashion_mnist(split: Split = "train", root: PathLike | None = None, *, embedded: bool = True) -> ArrayDataset:
    """Fashion-MNIST from its IDX files (28x28 grey, 10 classes, 60000/10000 images).

    Looked for in ``root`` if given, else only in ``$CBNORM_FASHION_MNIST`` if that is set, else in
    :data:`FASHION_MNIST_SYSTEM_DIRS` (Debian's ``/usr/share/datasets/fashion-mnist``) then
    ``$CBNORM_DATA/fashion-mnist`` (default ``~/.cache/cbnorm/data/fashion-mnist``).  When none of these
    has the **test** split, the copy shipped in the package is used (:data:`EMBEDDED_FASHION_MNIST`, verified
    against :data:`EMBEDDED_FASHION_MNIST_SHA256`; ``embedded=False`` turns this off).  The train split has
    no fallback: ``python -m cbnorm.data download fashion-mnist`` fetches it.  The folder the arrays came
    from is the returned dataset's ``source``.
    """
    _check_split(split)
    how = (f"{_download_hint('fashion-mnist', root)}, or install Debian's package with "
           "`sudo apt-get install dataset-fashion-mnist` (files go to /usr/share/datasets/fashion-mnist), or put "
           "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
           "t10k-labels-idx1-ubyte.gz from https://github.com/zalandoresearch/fashion-mnist (data/fashion/) in a "
           f"folder and pass root= or set CBNORM_FASHION_MNIST to it (or put them in {data_root() / 'fashion-mnist'}).")
    # MNIST and Fashion-MNIST share file names: by default only look in folders named for Fashion-MNIST
    roots = _roots(root, "CBNORM_FASHION_MNIST", [*FASHION_MNIST_SYSTEM_DIRS, data_root() / "fashion-mnist"])
    subdirs = ["FashionMNIST/raw", "fashion-mnist", "fashion-mnist/FashionMNIST/raw"]
    try:
        return _load_idx_pair("Fashion-MNIST", split, roots, subdirs, how, FASHION_CLASSES, "fashion-mnist")
    except DatasetNotFound as err:
        if split != "test" or not embedded:
            raise
        ds = _embedded_fashion_test()
        if ds is None:
            raise DatasetNotFound(f"{err} The copy of the test split shipped with cbnorm is missing too "
                                  f"({EMBEDDED_FASHION_MNIST}: was the package installed without its package "
                                  "data?)") from None
        _log.info("Fashion-MNIST test split not found in %s; using the copy shipped in %s",
                  ", ".join(str(r) for r in roots), ds.source)
        return ds


def load_mnist(split: Split = "train", root: PathLike | None = None) -> ArrayDataset:
    """MNIST digits from their IDX files (28x28 grey, 10 classes, 60000/10000 images)."""
    how = (f"{_download_hint('mnist', root)}, or download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
           "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (https://ossci-datasets.s3.amazonaws.com/mnist/ "
           f"or http://yann.lecun.com/exdb/mnist/) into {data_root() / 'mnist'} (or any folder passed as root= or "
           "set in CBNORM_MNIST; the CBNORM_DATA env var moves the default data root).")
    roots = _roots(root, "CBNORM_MNIST", [data_root() / "mnist"])
    subdirs = ["MNIST/raw", "mnist", "mnist/MNIST/raw"]
    return _load_idx_pair("MNIST", split, roots, subdirs, how, MNIST_CLASSES, "mnist")


def _read_names(path: Path, expected: int, default: list[str]) -> list[str]:
    if not path.is_file():
        return list(default)
    names = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return names if len(names) == expected else list(default)


def _read_cifar_records(path: Path, n_label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    rec = n_label_bytes + 3072
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0 or data.size % rec:
        raise ValueError(f"{path}: {data.size} bytes is not a whole number of {rec}-byte CIFAR records "
                         f"({n_label_bytes} label byte(s) + 3072 pixel bytes); corrupt or truncated file?")
    data = data.reshape(-1, rec)
    images = data[:, n_label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), data[:, :n_label_bytes].astype(np.int64)


def _cifar_how(archive: str, folder: str, env: str, name: str, root: PathLike | None) -> str:
    return (f"{_download_hint(name, root)}, or download https://www.cs.toronto.edu/~kriz/{archive} (the *binary* "
            "version) and extract it "
            f"with `tar xzf {archive} -C {data_root()}` so that {data_root() / folder} exists, or pass "
            f"root= / set {env} to the folder holding {folder} (the CBNORM_DATA env var moves the default "
            "data root).")


def load_cifar10(split: Split = "train", root: PathLike | None = None) -> ArrayDataset:
    """CIFAR-10 from the binary version (``cifar-10-batches-bin``); images (N,32,32,3)."""
    _check_split(split)
    files = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    roots = _roots(root, "CBNORM_CIFAR10")
    try:
        folder, paths = _find_dir(roots, ["cifar-10-batches-bin", "cifar10/cifar-10-batches-bin", "cifar10"],
                                  [[f] for f in files])
    except LookupError as e:
        raise _not_found(f"CIFAR-10 ({split} split)", e.args[0], files,
                         _cifar_how("cifar-10-binary.tar.gz", "cifar-10-batches-bin", "CBNORM_CIFAR10",
                                   "cifar10", root)) from None
    parts = [_read_cifar_records(p, 1) for p in paths]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1][:, 0] for p in parts])
    if labels.max() >= 10:
        raise ValueError(f"{folder}: CIFAR-10 label {labels.max()} out of range; is this a CIFAR-100 file?")
    names = _read_names(folder / "batches.meta.txt", 10, CIFAR10_CLASSES)
    return ArrayDataset(images, labels, names, name="cifar10", source=str(folder))


def load_cifar100(split: Split = "train", root: PathLike | None = None) -> ArrayDataset:
    """CIFAR-100 from the binary version (``cifar-100-binary``); images (N,32,32,3).

    Labels are the 100 fine classes; contexts are the 20 coarse labels (superclasses).
    """
    _check_split(split)
    fname = f"{split}.bin"
    roots = _roots(root, "CBNORM_CIFAR100")
    try:
        folder, (path,) = _find_dir(roots, ["cifar-100-binary", "cifar100/cifar-100-binary", "cifar100"], [[fname]])
    except LookupError as e:
        raise _not_found(f"CIFAR-100 ({split} split)", e.args[0], [fname],
                         _cifar_how("cifar-100-binary.tar.gz", "cifar-100-binary", "CBNORM_CIFAR100",
                                   "cifar100", root)) from None
    images, lab = _read_cifar_records(path, 2)
    coarse, fine = lab[:, 0], lab[:, 1]
    if coarse.max() >= 20 or fine.max() >= 100:
        raise ValueError(f"{path}: CIFAR-100 labels out of range (coarse max {coarse.max()}, fine max {fine.max()})")
    return ArrayDataset(images, fine, _read_names(folder / "fine_label_names.txt", 100, CIFAR100_FINE_CLASSES),
                        contexts=coarse,
                        context_names=_read_names(folder / "coarse_label_names.txt", 20, CIFAR100_COARSE_CLASSES),
                        name="cifar100", source=str(folder))


def load_svhn(split: Literal["train", "test", "extra"] = "train", root: PathLike | None = None) -> ArrayDataset:
    """SVHN cropped digits from ``{split}_32x32.mat``; images (N,32,32,3), label 10 -> digit 0."""
    import scipy.io

    _check_split(split, ("train", "test", "extra"))
    fname = f"{split}_32x32.mat"
    roots = _roots(root, "CBNORM_SVHN")
    try:
        _, (path,) = _find_dir(roots, ["svhn", "SVHN"], [[fname]])
    except LookupError as e:
        how = (f"{_download_hint('svhn', root, ' --extra' if split == 'extra' else '')}, or download "
               f"http://ufldl.stanford.edu/housenumbers/{fname} (format 2, cropped digits) into "
               f"{data_root() / 'svhn'} (or a folder passed as root= or set in CBNORM_SVHN; the CBNORM_DATA "
               "env var moves the default data root).")
        raise _not_found(f"SVHN ({split} split)", e.args[0], [fname], how) from None
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises assorted errors on bad files
        raise ValueError(f"{path}: cannot read as a MATLAB v5 .mat file ({e})") from e
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path}: expected variables 'X' and 'y', found {sorted(k for k in mat if not k.startswith('__'))}")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise ValueError(f"{path}: X has shape {x.shape} for {len(y)} labels, expected (32,32,3,N)")
    if y.size and (y.min() < 0 or y.max() > 10):
        raise ValueError(f"{path}: labels must be in 0..10, got {y.min()}..{y.max()}")
    y[y == 10] = 0
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2)).astype(np.uint8)
    return ArrayDataset(images, y, list(MNIST_CLASSES), name="svhn", source=str(path.parent))


def load_digits(split: Split = "train", root: PathLike | None = None) -> ArrayDataset:
    """scikit-learn's bundled 8x8 digits (always available; for quick experiments).

    Pixels 0..16 are scaled to 0..255.  Every 5th sample (index % 5 == 0) is the test split.
    """
    from sklearn.datasets import load_digits as _sk_digits

    _check_split(split)
    d = _sk_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    test = np.arange(len(images)) % 5 == 0
    keep = test if split == "test" else ~test
    return ArrayDataset(images[keep], d.target[keep].astype(np.int64), list(MNIST_CLASSES), name="digits")


_LOADERS: dict[str, Callable[..., ArrayDataset]] = {
    "fashion-mnist": load_fashion_mnist, "mnist": load_mnist, "cifar10": load_cifar10,
    "cifar100": load_cifar100, "svhn": load_svhn, "digits": load_digits,
}
DATASETS: tuple[str, ...] = tuple(_LOADERS)


def load_dataset(name: str, split: str = "train", root: PathLike | None = None) -> ArrayDataset:
    """Load a dataset by name: one of :data:`DATASETS` ("fashion-mnist", "mnist", "cifar10", ...)."""
    key = name.strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}.get(key, key)
    if key not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return _LOADERS[key](split, root)


# --------------------------------------------------------------------------- contexts


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


def resize_images(images: np.ndarray, size: tuple[int, int] | None = None, channels: int | None = None) -> np.ndarray:
    """Resize uint8 images to ``size`` = (H, W) (bilinear, Pillow) and/or convert to 1 or 3 channels."""
    from PIL import Image

    imgs = np.asarray(images)
    if channels not in (None, 1, 3):
        raise ValueError("channels must be 1 or 3")
    if size is not None and imgs.shape[1:3] != tuple(size):
        h, w = size
        out = [np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)) for im in imgs]
        imgs = np.stack(out) if out else np.zeros((0, h, w, *imgs.shape[3:]), np.uint8)
    if channels is not None:
        c = 1 if imgs.ndim == 3 else imgs.shape[-1]
        if c != channels:
            if channels == 3:
                imgs = np.repeat(imgs[..., None] if imgs.ndim == 3 else imgs, 3, axis=-1)
            else:  # ITU-R 601 luma
                imgs = np.round(imgs.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
                imgs = np.clip(imgs, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(imgs, dtype=np.uint8)


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


def compute_mean_std(images: np.ndarray, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float64, shape (C,)) of uint8 images scaled to [0,1]."""
    imgs = np.asarray(images)
    c = 1 if imgs.ndim == 3 else imgs.shape[-1]
    s, s2, n = np.zeros(c), np.zeros(c), 0
    for i in range(0, len(imgs), batch_size):
        x = imgs[i : i + batch_size].reshape(-1, c).astype(np.float64) / 255.0
        s += x.sum(0)
        s2 += (x * x).sum(0)
        n += len(x)
    if n == 0:
        raise ValueError("no images")
    mean = s / n
    return mean, np.sqrt(np.maximum(s2 / n - mean**2, 0.0))


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


def subset(ds: ArrayDataset, n: int, seed: int = 0, stratified: bool = True) -> ArrayDataset:
    """``n`` samples of ``ds`` (kept in original order), class-proportional when ``stratified``."""
    if n >= len(ds):
        return ds.take(np.arange(len(ds)))
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(ds))
    if not stratified:
        return ds.take(np.sort(perm[:n]))
    lab = ds.labels[perm]
    counts = np.bincount(lab)
    order = np.argsort(lab, kind="stable")  # within a class, random (perm) order
    rank = np.empty(len(lab), np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank[order] = np.arange(len(lab)) - np.repeat(starts, counts)
    key = (rank + 0.5) / counts[lab]  # evenly interleaves classes in proportion to their size
    pick = perm[np.lexsort((np.arange(len(lab)), key))[:n]]
    return ds.take(np.sort(pick))


# --------------------------------------------------------------------------- downloads


class DownloadError(OSError):
    """A dataset file could not be downloaded; the message names every URL tried and why it failed."""


class ChecksumMismatch(DownloadError):
    """A downloaded file does not match its published checksum (nothing is kept under the final name)."""


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: tried from ``urls`` in order, verified against every checksum given (and ``size``)."""

    name: str
    urls: tuple[str, ...]
    md5: str | None = None  # as published by the dataset's authors (or torchvision where that is all there is)
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class RemoteDataset:
    """What ``python -m cbnorm.data download NAME`` fetches and where it puts it.

    Files go to ``<root>/<subdir>`` (``root`` = ``--root`` or ``$CBNORM_DATA``), or to ``$<env>`` when that is
    set and no ``--root`` is given -- the folders the loader searches.  An ``archive`` (tar.gz) is unpacked so
    that ``<folder>`` holds ``members`` (name -> size in bytes), then removed.
    """

    name: str
    env: str
    subdir: str
    files: tuple[RemoteFile, ...]
    folder: str | None = None
    members: Mapping[str, int] | None = None
    extra: tuple[RemoteFile, ...] = ()  # only with extra=True (SVHN's 1.3 GB extra split)


_FASHION_URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{}",
                 "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/{}")
_MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/{}", "https://storage.googleapis.com/cvdf-datasets/mnist/{}",
               "http://yann.lecun.com/exdb/mnist/{}")


def _mirrors(templates: Sequence[str], fname: str) -> tuple[str, ...]:
    return tuple(t.format(fname) for t in templates)


def _idx_remote(templates: Sequence[str], table: Sequence[tuple[str, str, str, int]]) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(f, _mirrors(templates, f), md5, sha, size) for f, md5, sha, size in table)


#: Datasets the download command knows.  Checksums are of the upstream files as published (MD5 from the
#: authors / torchvision, SHA-256 as listed by several independent projects); sizes in bytes.
DOWNLOADS: dict[str, RemoteDataset] = {
    "fashion-mnist": RemoteDataset("fashion-mnist", "CBNORM_FASHION_MNIST", "fashion-mnist", _idx_remote(_FASHION_URLS, [
        ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
         "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", 26421880),
        ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe",
         "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", 29515),
        ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79",
         "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", 4422102),
        ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310",
         "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", 5148),
    ])),
    "mnist": RemoteDataset("mnist", "CBNORM_MNIST", "mnist", _idx_remote(_MNIST_URLS, [
        ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873",
         "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9912422),
        ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432",
         "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28881),
        ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3",
         "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1648877),
        ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c",
         "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542),
    ])),
    "cifar10": RemoteDataset(
        "cifar10", "CBNORM_CIFAR10", "",
        (RemoteFile("cifar-10-binary.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
                    md5="c32a1d4ab5d03f1284b67883e8d87530", size=170052171),),
        folder="cifar-10-batches-bin",
        members={**{f"data_batch_{i}.bin": 10000 * 3073 for i in range(1, 6)}, "test_batch.bin": 10000 * 3073}),
    "cifar100": RemoteDataset(
        "cifar100", "CBNORM_CIFAR100", "",
        (RemoteFile("cifar-100-binary.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",),
                    md5="03b5dce01913d631647c71ecec9e9cb8", size=168513733),),
        folder="cifar-100-binary", members={"train.bin": 50000 * 3074, "test.bin": 10000 * 3074}),
    "svhn": RemoteDataset(
        "svhn", "CBNORM_SVHN", "svhn",
        (RemoteFile("train_32x32.mat", ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat",),
                    md5="e26dedcc434d2e4c54c9b2d4a06d8373", size=182040794),
         RemoteFile("test_32x32.mat", ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat",),
                    md5="eb5a983be6a315427106f1b164d9cef3", size=64275384)),
        extra=(RemoteFile("extra_32x32.mat", ("http://ufldl.stanford.edu/housenumbers/extra_32x32.mat",),
                          md5="a93ce644f1a588dc4d68dda5feec44a7"),)),
}


def _download_key(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}.get(key, key)
    if key not in DOWNLOADS:
        raise ValueError(f"no download known for {name!r}; valid names: {', '.join(DOWNLOADS)}")
    return key


def download_dir(name: str, root: PathLike | None = None) -> Path:
    """Where :func:`download` puts dataset ``name``: ``root/<subdir>``, else ``$CBNORM_<NAME>`` if set,
    else ``data_root()/<subdir>`` -- a folder the dataset's loader searches."""
    spec = DOWNLOADS[_download_key(name)]
    if root is not None:
        return Path(root).expanduser() / spec.subdir
    env = os.environ.get(spec.env)
    return Path(env).expanduser() if env else data_root() / spec.subdir


def _file_problem(path: Path, rf: RemoteFile) -> str | None:
    """None when ``path`` matches ``rf``'s size and checksums, else what is wrong."""
    size = path.stat().st_size
    if rf.size is not None and size != rf.size:
        return f"{size} bytes, expected {rf.size}"
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
            sha.update(chunk)
    if rf.sha256 is not None and sha.hexdigest() != rf.sha256:
        return f"SHA-256 {sha.hexdigest()}, expected {rf.sha256}"
    if rf.md5 is not None and md5.hexdigest() != rf.md5:
        return f"MD5 {md5.hexdigest()}, expected {rf.md5}"
    return None


def _user_agent() -> str:
    from . import __version__

    return f"cbnorm/{__version__} (+python-urllib)"


def _fetch(url: str, part: Path, timeout: float, size: int | None, progress: bool) -> bool:
    """Download ``url`` into ``part``, resuming a partial ``part`` where the server allows it.

    Returns whether the bytes already in ``part`` were kept (a resumed download).  Raises DownloadError
    naming ``url``; an interrupted transfer leaves ``part`` for the next run to resume.
    """
    start = part.stat().st_size if part.is_file() else 0
    if size is not None and start > size:
        part.unlink()
        start = 0
    headers = {"User-Agent": _user_agent()}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and start:  # nothing left to send: part holds the whole file (verified by the caller)
            return True
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise DownloadError(f"{url}: {e.reason}") from e
    except (OSError, ValueError, http.client.HTTPException) as e:  # ValueError: not a URL
        raise DownloadError(f"{url}: {e}") from e
    from tqdm import tqdm

    with resp:
        status = getattr(resp, "status", None)
        content_range = resp.headers.get("Content-Range", "") if resp.headers else ""
        resumed = bool(start) and status == 206 and content_range.startswith(f"bytes {start}-")
        length = resp.headers.get("Content-Length") if resp.headers else None
        total = int(length) + (start if resumed else 0) if length and length.isdigit() else size
        done = start if resumed else 0
        try:
            with open(part, "ab" if resumed else "wb") as f, \
                    tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=part.name[:-5],
                         disable=not progress, leave=False) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        except (OSError, http.client.HTTPException) as e:
            raise DownloadError(f"{url}: transfer interrupted after {done} bytes ({e}); the partial file {part} "
                                "is kept: run the command again to resume") from e
    if total is not None and done != total:
        raise DownloadError(f"{url}: connection closed after {done} of {total} bytes; the partial file {part} "
                            "is kept: run the command again to resume")
    return resumed


def download_file(rf: RemoteFile, folder: PathLike, *, timeout: float = 60.0, progress: bool = False,
                  log: Callable[[str], None] = print) -> Path:
    """``folder/rf.name``, downloaded and verified unless already there and valid.

    Written to ``<name>.part`` first and renamed into place only once its checksums match, so the final
    name never holds a partial or wrong file.  Mirrors are tried in order.  Raises ChecksumMismatch when a
    mirror served wrong bytes (and no other mirror worked), DownloadError when none could be reached.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / rf.name
    if final.is_file():
        problem = _file_problem(final, rf)
        if problem is None:
            log(f"{final}: already present, checksum ok")
            return final
        log(f"{final}: present but {problem}; downloading it again")
    part = folder / (rf.name + ".part")
    failures: list[str] = []
    mismatch = False
    for url in rf.urls:
        for _ in range(2):  # a resumed file that fails verification is fetched once more from scratch
            log(f"downloading {url} -> {final}")
            try:
                resumed = _fetch(url, part, timeout, rf.size, progress)
            except DownloadError as e:
                failures.append(str(e))
                break
            problem = _file_problem(part, rf)
            if problem is None:
                os.replace(part, final)
                return final
            part.unlink(missing_ok=True)
            if not resumed:
                failures.append(f"{url}: checksum mismatch: {problem}")
                mismatch = True
                break
            log(f"{url}: resumed file failed verification ({problem}); starting over")
    if mismatch:
        raise ChecksumMismatch(f"could not download {rf.name}:\n  " + "\n  ".join(failures))
    raise DownloadError(f"could not download {rf.name}:\n  " + "\n  ".join(failures) + "\nCheck the network "
                        f"connection (or the HTTPS_PROXY / HTTP_PROXY settings) and run the command again, or put "
                        f"the file in {folder} by hand.")


def _members_problem(folder: Path, members: Mapping[str, int]) -> str | None:
    for fname, size in members.items():
        p = folder / fname
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != size:
            return f"{p} has {p.stat().st_size} bytes, expected {size}"
    return None


def _extract(archive: Path, dest: Path, folder: str, members: Mapping[str, int]) -> Path:
    """Unpack ``archive`` (tar.gz holding only ``folder/...``) to ``dest/folder`` through a temporary folder."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=dest))
    try:
        with tarfile.open(archive, "r:gz") as tf:
            for m in tf.getmembers():
                parts = PurePosixPath(m.name).parts
                if (not parts or parts[0] != folder or ".." in parts or PurePosixPath(m.name).is_absolute()
                        or not (m.isfile() or m.isdir())):
                    raise ValueError(f"{archive}: unexpected member {m.name!r} (expected regular files under {folder}/)")
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, filter="data")
            else:  # members checked above
                tf.extractall(tmp)
        problem = _members_problem(tmp / folder, members)
        if problem is not None:
            raise ValueError(f"{archive}: unpacked, but {problem}")
        target = dest / folder
        if target.exists():  # an incomplete earlier copy: keep it aside rather than delete anything
            aside = dest / f"{folder}.incomplete"
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(target, aside)
        os.replace(tmp / folder, target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(name: str, root: PathLike | None = None, *, extra: bool = False, keep_archive: bool = False,
             timeout: float = 60.0, progress: bool = False, log: Callable[[str], None] = print) -> Path:
    """Download dataset ``name`` (a key of :data:`DOWNLOADS`) into :func:`download_dir` and verify it.

    Idempotent: valid files already there are skipped, so an interrupted run is finished by running it again
    (``.part`` files are resumed where the server supports ranges).  Returns the folder the loader reads.
    """
    key = _download_key(name)
    spec = DOWNLOADS[key]
    dest = download_dir(key, root)
    dest.mkdir(parents=True, exist_ok=True)
    if spec.folder is not None and spec.members is not None:
        target = dest / spec.folder
        if target.is_dir() and _members_problem(target, spec.members) is None:
            log(f"{target}: already present")
            return target
        for rf in spec.files:
            archive = download_file(rf, dest, timeout=timeout, progress=progress, log=log)
            log(f"unpacking {archive}")
            target = _extract(archive, dest, spec.folder, spec.members)
            if not keep_archive:
                archive.unlink()
        return target
    for rf in (*spec.files, *(spec.extra if extra else ())):
        download_file(rf, dest, timeout=timeout, progress=progress, log=log)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cbnorm.data download NAME... [--root DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m cbnorm.data",
        description="Download datasets into the folders cbnorm's loaders search (checksums verified).")
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download and verify datasets",
                        description="Download and verify datasets. Without --root, each goes to $CBNORM_<NAME> if "
                                    f"set, else under $CBNORM_DATA (now {data_root()}). Files already present and "
                                    "valid are skipped; run again to finish an interrupted download.")
    dl.add_argument("datasets", nargs="+", metavar="NAME", help=f"{', '.join(DOWNLOADS)}, or all")
    dl.add_argument("--root", type=Path, help="data root to download into (<root>/fashion-mnist, <root>/mnist, ...; "
                                              "then load with root=DIR or set CBNORM_DATA=DIR)")
    dl.add_argument("--extra", action="store_true", help="svhn: also the 531,131-image extra split (1.3 GB)")
    dl.add_argument("--keep-archive", action="store_true", help="cifar10/cifar100: keep the .tar.gz after unpacking")
    dl.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    args = parser.parse_args(argv)
    names = list(DOWNLOADS) if "all" in args.datasets else args.datasets
    try:
        keys = [_download_key(n) for n in names]
    except ValueError as e:
        parser.error(str(e))
    for key in keys:
        try:
            out = download(key, args.root, extra=args.extra, keep_archive=args.keep_archive, timeout=args.timeout,
                           progress=sys.stderr.isatty(), log=lambda m: print(m, file=sys.stderr))
        except (OSError, ValueError, tarfile.TarError) as e:
            print(f"error: {key}: {e}", file=sys.stderr)
            return 1
        hint = f" (load it with root={str(args.root)!r}, or set CBNORM_DATA={args.root})" if args.root else ""
        print(f"{key}: ready in {out}{hint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

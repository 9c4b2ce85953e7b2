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
``CBNORM_CIFAR10``), else ``$CBNORM_DATA`` (default ``~/.cache/cbnorm/data``);
Fashion-MNIST also looks in ``/usr/share/datasets/fashion-mnist`` (Debian
package ``dataset-fashion-mnist``).  Inside a root the usual sub-folders are
accepted too (``MNIST/raw``, ``FashionMNIST/raw``, ``cifar-10-batches-bin``...).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "ArrayDataset", "DatasetNotFound", "DATASETS", "data_root", "read_idx",
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


# --------------------------------------------------------------------------- IDX

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """File content, gunzipped when it starts with the gzip magic; ValueError when the gzip is broken."""
    raw = path.read_bytes()
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
    data = _read_bytes(path)
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


def _load_idx_pair(title: str, split: str, roots: list[Path], subdirs: Sequence[str], how: str,
                   class_names: list[str], name: str) -> ArrayDataset:
    _check_split(split)
    prefix = "train" if split == "train" else "t10k"
    stems = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    alts = [[s + ".gz", s] for s in stems]
    try:
        _, (img_path, lbl_path) = _find_dir(roots, subdirs, alts)
    except LookupError as e:
        raise _not_found(f"{title} ({split} split)", e.args[0], [s + "[.gz]" for s in stems], how) from None
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{img_path}: expected uint8 images of shape (N,H,W), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"{lbl_path}: {labels.shape[0] if labels.ndim else 0} labels for {len(images)} images in {img_path}")
    if labels.size and labels.max() >= len(class_names):
        raise ValueError(f"{lbl_path}: label {labels.max()} out of range for {len(class_names)} classes")
    return ArrayDataset(images, labels.astype(np.int64), list(class_names), name=name)


def load_fashion_mnist(split: Split = "train", root: PathLike | None = None) -> ArrayDataset:
    """Fashion-MNIST from its IDX files (28x28 grey, 10 classes, 60000/10000 images)."""
    how = ("Install it with `sudo apt-get install dataset-fashion-mnist` (files go to "
           "/usr/share/datasets/fashion-mnist), or download train-images-idx3-ubyte.gz, "
           "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
           "https://github.com/zalandoresearch/fashion-mnist (data/fashion/) into a folder and pass root= "
           f"or set CBNORM_FASHION_MNIST to it (or put them in {data_root() / 'fashion-mnist'}).")
    # MNIST and Fashion-MNIST share file names: by default only look in folders named for Fashion-MNIST
    roots = _roots(root, "CBNORM_FASHION_MNIST", ["/usr/share/datasets/fashion-mnist", data_root() / "fashion-mnist"])
    subdirs = ["FashionMNIST/raw", "fashion-mnist", "fashion-mnist/FashionMNIST/raw"]
    return _load_idx_pair("Fashion-MNIST", split, roots, subdirs, how, FASHION_CLASSES, "fashion-mnist")


def load_mnist(split: Split = "train", root: PathLike | None = None) -> ArrayDataset:
    """MNIST digits from their IDX files (28x28 grey, 10 classes, 60000/10000 images)."""
    how = ("Download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
           "t10k-labels-idx1-ubyte.gz (http://yann.lecun.com/exdb/mnist/ or the mirror "
           "https://ossci-datasets.s3.amazonaws.com/mnist/) into "
           f"{data_root() / 'mnist'} (or any folder passed as root= or set in CBNORM_MNIST; "
           "the CBNORM_DATA env var moves the default data root).")
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


def _cifar_how(archive: str, folder: str, env: str) -> str:
    return (f"Download https://www.cs.toronto.edu/~kriz/{archive} (the *binary* version) and extract it "
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
                         _cifar_how("cifar-10-binary.tar.gz", "cifar-10-batches-bin", "CBNORM_CIFAR10")) from None
    parts = [_read_cifar_records(p, 1) for p in paths]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1][:, 0] for p in parts])
    if labels.max() >= 10:
        raise ValueError(f"{folder}: CIFAR-10 label {labels.max()} out of range; is this a CIFAR-100 file?")
    names = _read_names(folder / "batches.meta.txt", 10, CIFAR10_CLASSES)
    return ArrayDataset(images, labels, names, name="cifar10")


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
                         _cifar_how("cifar-100-binary.tar.gz", "cifar-100-binary", "CBNORM_CIFAR100")) from None
    images, lab = _read_cifar_records(path, 2)
    coarse, fine = lab[:, 0], lab[:, 1]
    if coarse.max() >= 20 or fine.max() >= 100:
        raise ValueError(f"{path}: CIFAR-100 labels out of range (coarse max {coarse.max()}, fine max {fine.max()})")
    return ArrayDataset(images, fine, _read_names(folder / "fine_label_names.txt", 100, CIFAR100_FINE_CLASSES),
                        contexts=coarse,
                        context_names=_read_names(folder / "coarse_label_names.txt", 20, CIFAR100_COARSE_CLASSES),
                        name="cifar100")


def load_svhn(split: Literal["train", "test", "extra"] = "train", root: PathLike | None = None) -> ArrayDataset:
    """SVHN cropped digits from ``{split}_32x32.mat``; images (N,32,32,3), label 10 -> digit 0."""
    import scipy.io

    _check_split(split, ("train", "test", "extra"))
    fname = f"{split}_32x32.mat"
    roots = _roots(root, "CBNORM_SVHN")
    try:
        _, (path,) = _find_dir(roots, ["svhn", "SVHN"], [[fname]])
    except LookupError as e:
        how = (f"Download http://ufldl.stanford.edu/housenumbers/{fname} (format 2, cropped digits) into "
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
    return ArrayDataset(images, y, list(MNIST_CLASSES), name="svhn")


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

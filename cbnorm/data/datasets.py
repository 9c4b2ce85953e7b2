"""The datasets as arrays: class and superclass names, :class:`ArrayDataset`, the readers of the official
on-disk formats (IDX for MNIST / Fashion-MNIST, the CIFAR binary versions, SVHN's ``.mat``; nothing is ever
unpickled), where files are looked for, the Fashion-MNIST test split shipped in the package, one loader per
dataset (``load_dataset``), and array helpers (resizing, mean / std, stratified subsets). See
:mod:`cbnorm.data`.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .download import DOWNLOADS, data_root, download_dir

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
EMBEDDED_FASHION_MNIST: Path = Path(__file__).resolve().parent / "fashion-mnist"

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

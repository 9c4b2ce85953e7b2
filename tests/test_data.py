"""Tests for cbnorm.data: format readers on tiny hand-written files, contexts, torch wrapper."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cbnorm import data as D

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------- writers


def idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}[arr.dtype]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    raw = idx_bytes(arr)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_mnist_like(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    ext = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images, gz)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels.astype(np.uint8), gz)


def cifar_records(images: np.ndarray, *label_cols: np.ndarray) -> bytes:
    """images (N,32,32,3) -> records of label byte(s) + R,G,B planes."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    labels = np.stack(label_cols, axis=1).astype(np.uint8)
    return np.concatenate([labels, planes], axis=1).astype(np.uint8).tobytes()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path: Path, rng: np.random.Generator, gz: bool) -> None:
    arr = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(D.read_idx(write_idx(tmp_path / "a.idx", arr, gz)), arr)
    ints = rng.integers(-1000, 1000, (4, 2)).astype(">i4")
    out = D.read_idx(write_idx(tmp_path / "b.idx", ints, gz))
    assert out.dtype == np.dtype("int32") and out.dtype.isnative and np.array_equal(out, ints)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_corrupt(tmp_path: Path, rng: np.random.Generator, gz: bool) -> None:
    raw = idx_bytes(rng.integers(0, 256, (4, 6, 6), dtype=np.uint8))
    cases = {
        "truncated": raw[:-5],
        "trailing": raw + b"\0",
        "magic": b"\x08\x03" + raw[2:],
        "dtype": raw[:2] + b"\x42" + raw[3:],
        "header": raw[:9],
        "empty": b"",
    }
    for name, content in cases.items():
        p = tmp_path / f"{name}.idx"
        p.write_bytes(gzip.compress(content) if gz else content)
        with pytest.raises(ValueError, match=name + ".idx"):
            D.read_idx(p)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(ValueError, match="broken.gz"):
        D.read_idx(broken)


@pytest.mark.parametrize("loader,sub,gz", [
    (D.load_mnist, "", True), (D.load_mnist, "MNIST/raw", False),
    (D.load_fashion_mnist, "", False), (D.load_fashion_mnist, "FashionMNIST/raw", True),
])
def test_idx_loaders(tmp_path: Path, rng: np.random.Generator, loader, sub: str, gz: bool) -> None:
    for split, n in (("train", 12), ("test", 5)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        write_mnist_like(tmp_path / sub, split, imgs, labels, gz)
        ds = loader(split, root=tmp_path)
        assert np.array_equal(ds.images, imgs) and ds.images.dtype == np.uint8
        assert np.array_equal(ds.labels, labels) and ds.labels.dtype == np.int64
        assert ds.contexts is None and len(ds.class_names) == 10
    assert ds.class_names[0] == ("T-shirt/top" if loader is D.load_fashion_mnist else "0")


def test_idx_loader_label_mismatch(tmp_path: Path, rng: np.random.Generator) -> None:
    write_mnist_like(tmp_path, "train", rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.arange(3))
    with pytest.raises(ValueError, match="labels"):
        D.load_mnist("train", root=tmp_path)


# ----------------------------------------------------------------------------- CIFAR / SVHN


def test_cifar10(tmp_path: Path, rng: np.random.Generator) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    batches = []
    for i in range(1, 6):
        imgs, labels = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 3)
        (folder / f"data_batch_{i}.bin").write_bytes(cifar_records(imgs, labels))
        batches.append((imgs, labels))
    t_imgs, t_labels = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 4)
    (folder / "test_batch.bin").write_bytes(cifar_records(t_imgs, t_labels))
    train = D.load_cifar10("train", root=tmp_path)
    assert train.images.shape == (15, 32, 32, 3)
    assert np.array_equal(train.images, np.concatenate([b[0] for b in batches]))
    assert np.array_equal(train.labels, np.concatenate([b[1] for b in batches]))
    assert train.class_names == D.CIFAR10_CLASSES
    test = D.load_dataset("cifar10", "test", root=folder)  # the folder itself works too
    assert np.array_equal(test.images, t_imgs) and np.array_equal(test.labels, t_labels)
    # names from batches.meta.txt when shipped
    (folder / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n\n")
    assert D.load_cifar10("test", root=tmp_path).class_names[3] == "c3"
    # a record short -> ValueError naming the file
    (folder / "test_batch.bin").write_bytes(cifar_records(t_imgs, t_labels)[:-1])
    with pytest.raises(ValueError, match="test_batch.bin"):
        D.load_cifar10("test", root=tmp_path)


def test_cifar100(tmp_path: Path, rng: np.random.Generator) -> None:
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    fine = np.array([0, 99, 4, 55, 30])
    coarse = np.array([D.CIFAR100_FINE_TO_COARSE[f] for f in fine])
    imgs = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    (folder / "train.bin").write_bytes(cifar_records(imgs, coarse, fine))
    ds = D.load_cifar100("train", root=tmp_path)
    assert np.array_equal(ds.images, imgs)
    assert np.array_equal(ds.labels, fine) and np.array_equal(ds.contexts, coarse)
    assert len(ds.class_names) == 100 and len(ds.context_names) == 20 and ds.num_contexts == 20
    assert ds.class_names[99] == "worm" and ds.context_names[coarse[1]] == "non-insect_invertebrates"
    # a CIFAR-10 record size is not a whole number of CIFAR-100 records
    (folder / "test.bin").write_bytes(cifar_records(imgs, fine)[:3073 * 5])
    with pytest.raises(ValueError, match="test.bin"):
        D.load_cifar100("test", root=tmp_path)


def test_cifar100_names_consistent() -> None:
    assert len(D.CIFAR100_FINE_CLASSES) == 100 and len(set(D.CIFAR100_FINE_CLASSES)) == 100
    assert D.CIFAR100_FINE_CLASSES == sorted(D.CIFAR100_FINE_CLASSES)
    assert len(D.CIFAR100_COARSE_CLASSES) == 20 and np.bincount(D.CIFAR100_FINE_TO_COARSE).tolist() == [5] * 20
    # published fine->coarse table starts 4, 1, 14, 8, 0 (apple -> fruit_and_vegetables, ...)
    assert D.CIFAR100_FINE_TO_COARSE[:5] == [4, 1, 14, 8, 0]


def test_svhn(tmp_path: Path, rng: np.random.Generator) -> None:
    import scipy.io

    x = rng.integers(0, 256, (32, 32, 3, 6), dtype=np.uint8)
    y = np.array([[10], [1], [2], [9], [10], [5]], dtype=np.uint8)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": y})
    ds = D.load_svhn("test", root=tmp_path)
    assert ds.images.shape == (6, 32, 32, 3) and ds.images.dtype == np.uint8
    assert np.array_equal(ds.images[3], x[..., 3])
    assert ds.labels.tolist() == [0, 1, 2, 9, 0, 5]
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": x[..., :2], "y": y})
    with pytest.raises(ValueError, match="train_32x32.mat"):
        D.load_svhn("train", root=tmp_path)


# ----------------------------------------------------------------------------- missing / dispatch


@pytest.mark.parametrize("name,hint", [
    ("fashion-mnist", "apt-get install dataset-fashion-mnist"),
    ("mnist", "train-images-idx3-ubyte.gz"),
    ("cifar10", "cifar-10-binary.tar.gz"),
    ("cifar100", "cifar-100-binary.tar.gz"),
    ("svhn", "housenumbers/train_32x32.mat"),
])
def test_missing_dataset_message(tmp_path: Path, name: str, hint: str) -> None:
    empty = tmp_path / "nothing"
    with pytest.raises(D.DatasetNotFound) as exc:
        D.load_dataset(name, "train", root=empty)
    assert isinstance(exc.value, FileNotFoundError)
    msg = str(exc.value)
    assert hint in msg and str(empty) in msg


def test_default_root_env(tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBNORM_DATA", str(tmp_path))
    monkeypatch.delenv("CBNORM_MNIST", raising=False)
    with pytest.raises(D.DatasetNotFound, match="CBNORM_DATA"):
        D.load_mnist("test")
    write_mnist_like(tmp_path / "mnist", "test", rng.integers(0, 256, (2, 28, 28), dtype=np.uint8), np.array([3, 4]))
    assert D.load_mnist("test").labels.tolist() == [3, 4]


def test_load_dataset_errors() -> None:
    with pytest.raises(ValueError, match="fashion-mnist.*cifar100"):
        D.load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        D.load_dataset("digits", "valid")


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist() -> None:
    for split, n in (("train", 60000), ("test", 10000)):
        ds = D.load_fashion_mnist(split, root=FASHION_DIR)
        assert ds.images.shape == (n, 28, 28) and ds.images.dtype == np.uint8
        assert ds.labels.min() == 0 and ds.labels.max() == 9
        assert np.bincount(ds.labels).tolist() == [n // 10] * 10
    mean, std = D.compute_mean_std(ds.images[:2000])
    assert mean.shape == (1,) and 0.2 < mean[0] < 0.4 and 0.25 < std[0] < 0.45


# ----------------------------------------------------------------------------- contexts


def test_fashion_superclasses() -> None:
    assert sorted(D.FASHION_SUPERCLASSES) == list(range(10))
    assert sorted(set(D.FASHION_SUPERCLASSES.values())) == [0, 1, 2, 3] == list(range(len(D.FASHION_SUPERCLASS_NAMES)))
    ctx = D.superclass_contexts(np.arange(10), D.FASHION_SUPERCLASSES)
    by_name = {D.FASHION_CLASSES[i]: D.FASHION_SUPERCLASS_NAMES[c] for i, c in enumerate(ctx)}
    assert {k for k, v in by_name.items() if v == "tops"} == {"T-shirt/top", "Pullover", "Coat", "Shirt"}
    assert {k for k, v in by_name.items() if v == "footwear"} == {"Sandal", "Sneaker", "Ankle boot"}
    assert by_name["Bag"] == "bags" and by_name["Dress"] == by_name["Trouser"] == "bottoms & dresses"
    with pytest.raises(ValueError, match="cover"):
        D.superclass_contexts(np.array([0, 7]), {0: 0})


def test_kmeans_contexts_json_roundtrip() -> None:
    digits = D.load_digits("train")
    km = D.KMeansContexts(4, seed=1, max_samples=600, pool=2).fit(digits.images)
    before = km.predict(digits.images)
    assert before.dtype == np.int64 and set(before.tolist()) == {0, 1, 2, 3}
    state = json.loads(json.dumps(km.state_dict()))
    restored = D.KMeansContexts.from_state(state)
    assert np.array_equal(restored.predict(digits.images), before)
    test = D.load_digits("test")
    assert np.array_equal(restored.predict(test.images), km.predict(test.images))
    with pytest.raises(ValueError, match="shape"):
        restored.predict(np.zeros((2, 28, 28), np.uint8))


def test_parse_contexts_spec() -> None:
    assert D.parse_contexts_spec("none") == D.ContextSpec("none")
    assert D.parse_contexts_spec(" KMeans:8 ") == D.ContextSpec("kmeans", 8)
    assert str(D.parse_contexts_spec("kmeans:3")) == "kmeans:3"
    assert D.parse_contexts_spec("superclass").kind == "superclass"
    assert D.parse_contexts_spec("domain").kind == "domain"
    for bad in ("kmeans", "kmeans:", "kmeans:1", "kmeans:x", "kmeans:-3", "cluster", ""):
        with pytest.raises(ValueError, match="kmeans:K"):
            D.parse_contexts_spec(bad)


def test_domains_and_apply_contexts() -> None:
    src, tgt = D.load_digits("test"), D.load_digits("train")
    both = D.concat_domains(src, tgt, image_size=(16, 16), channels=3)
    assert both.images.shape == (len(src) + len(tgt), 16, 16, 3)
    assert both.contexts.tolist() == D.domain_contexts(len(src), len(tgt)).tolist()
    assert both.contexts[: len(src)].max() == 0 and both.contexts[len(src):].min() == 1
    assert both.num_classes == 10  # same class names -> shared label space
    other = D.ArrayDataset(np.zeros((3, 8, 8), np.uint8), np.arange(3), ["a", "b", "c"], name="abc")
    mixed = D.concat_domains(src, other)
    assert mixed.num_classes == 13 and mixed.labels[-3:].tolist() == [10, 11, 12]
    with pytest.raises(ValueError, match="image_size"):
        D.concat_domains(src, D.ArrayDataset(np.zeros((1, 9, 9), np.uint8), [0], ["a"]))
    (dom,), _ = D.apply_contexts("domain", both)
    assert dom.num_contexts == 2
    (tr, te), km = D.apply_contexts("kmeans:3", tgt, src, max_samples=500)
    assert km is not None and tr.num_contexts == te.num_contexts == 3 and te.contexts.max() <= 2
    (none,), _ = D.apply_contexts("none", tr)
    assert none.contexts is None
    fm = D.ArrayDataset(np.zeros((10, 4, 4), np.uint8), np.arange(10), D.FASHION_CLASSES, name="fashion-mnist")
    (sup,), _ = D.apply_contexts("superclass", fm)
    assert sup.contexts.tolist() == [D.FASHION_SUPERCLASSES[i] for i in range(10)]
    with pytest.raises(ValueError, match="superclass"):
        D.apply_contexts("superclass", src)
    with pytest.raises(ValueError, match="concat_domains"):
        D.apply_contexts("domain", src)


# ----------------------------------------------------------------------------- torch side


def test_context_dataset_shapes() -> None:
    gray = D.load_digits("test")
    ds = D.ContextDataset(gray)
    x, y, c = ds[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert y.dtype == torch.int64 and c.dtype == torch.int64 and int(c) == -1
    assert torch.allclose(x[0] * 255, torch.from_numpy(gray.images[0]).float())
    rgb = D.ArrayDataset(np.random.default_rng(0).integers(0, 256, (6, 5, 4, 3), dtype=np.uint8),
                         np.arange(6) % 2, ["a", "b"], contexts=np.arange(6) % 3, name="rgb")
    mean, std = D.compute_mean_std(rgb.images)
    assert mean.shape == std.shape == (3,)
    assert np.allclose(mean, rgb.images.reshape(-1, 3).mean(0) / 255)
    assert np.allclose(std, rgb.images.reshape(-1, 3).std(0) / 255)
    nds = D.ContextDataset(rgb, transform=lambda t: t.flip(-1), mean=mean, std=std)
    x, y, c = nds[4]
    assert x.shape == (3, 5, 4) and int(y) == 0 and int(c) == 1
    ref = (torch.from_numpy(rgb.images[4]).permute(2, 0, 1).float() / 255).flip(-1)
    ref = (ref - torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)) / torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    assert torch.allclose(x, ref, atol=1e-5)
    xb, yb, cb = next(iter(torch.utils.data.DataLoader(nds, batch_size=4)))
    assert xb.shape == (4, 3, 5, 4) and yb.dtype == cb.dtype == torch.int64
    X, Y, C = nds.tensors()
    assert X.shape == (6, 3, 5, 4) and C.tolist() == [0, 1, 2, 0, 1, 2]


def test_subset() -> None:
    ds = D.load_digits("train")
    s = D.subset(ds, 200, seed=3)
    assert len(s) == 200
    counts = np.bincount(s.labels, minlength=10)
    assert counts.min() >= 18 and counts.max() <= 22  # ~proportional (classes are near-balanced)
    assert np.array_equal(D.subset(ds, 200, seed=3).labels, s.labels)
    assert not np.array_equal(D.subset(ds, 200, seed=4).images, s.images)
    r = D.subset(ds, 50, seed=0, stratified=False)
    assert len(r) == 50 and len(D.subset(ds, 10**6)) == len(ds)

"""The Fashion-MNIST test split shipped in the package, and ``python -m cbnorm.data download``.

Downloads are tested against a local HTTP server (with Range support, request log and failure modes) and
``file://`` URLs serving small IDX files made here: no network is needed.
"""

from __future__ import annotations

import dataclasses

import gzip
import hashlib
import http.server
import io
import re
import shutil
import socket
import struct
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cbnorm import data as D

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SHIPPED = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
DOWNLOAD_CMD = "python -m cbnorm.data download fashion-mnist"


# ----------------------------------------------------------------------------- helpers


def idx_gz(arr: np.ndarray) -> bytes:
    raw = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    return gzip.compress(raw, mtime=0)


def remote(name: str, content: bytes, urls: tuple[str, ...], **kw) -> D.RemoteFile:
    kw.setdefault("md5", hashlib.md5(content).hexdigest())
    kw.setdefault("sha256", hashlib.sha256(content).hexdigest())
    kw.setdefault("size", len(content))
    return D.RemoteFile(name, urls, **kw)


@pytest.fixture
def no_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user without Debian's package: $CBNORM_FASHION_MNIST is an empty folder, system dirs and
    $CBNORM_DATA hold nothing."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("CBNORM_FASHION_MNIST", str(empty))
    monkeypatch.setenv("CBNORM_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(D.datasets, "FASHION_MNIST_SYSTEM_DIRS", (str(tmp_path / "no-such-system-dir"),))
    return empty


class Server:
    """A local HTTP server over ``files`` (path -> bytes) that honours ``Range: bytes=N-``.

    ``requests`` logs (path, Range header); paths in ``truncate`` send their full Content-Length but only the
    first half of the body, then close; ``ranges`` False makes it ignore Range (always 200).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.truncate: set[str] = set()
        self.ranges = True
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                srv.requests.append((self.path, rng))
                body = srv.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if rng and srv.ranges and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                part = body[start:]
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if self.path in srv.truncate:
                    self.wfile.write(part[: len(part) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(part)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    srv = Server()
    yield srv
    srv.close()


def closed_port_url(path: str) -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


@pytest.fixture
def fake_fashion(server: Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """DOWNLOADS['fashion-mnist'] replaced by a tiny dataset served by ``server``."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28)),
              "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 12),
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (5, 28, 28)),
              "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 5)}
    files = []
    for name, arr in arrays.items():
        content = idx_gz(arr)
        server.files[f"/fm/{name}"] = content
        files.append(remote(name, content, (f"{server.url}/fm/{name}",)))
    spec = D.RemoteDataset("fashion-mnist", "CBNORM_FASHION_MNIST", "fashion-mnist", tuple(files))
    monkeypatch.setitem(D.DOWNLOADS, "fashion-mnist", spec)
    return arrays


# ----------------------------------------------------------------------------- the shipped split


def test_shipped_files_are_the_official_ones() -> None:
    """The shipped bytes match the table in data.py and the upstream-published MD5 / SHA-256 / size."""
    official = {rf.name: rf for rf in D.DOWNLOADS["fashion-mnist"].files}
    assert list(D.EMBEDDED_FASHION_MNIST_SHA256) == list(SHIPPED)
    for name in SHIPPED:
        raw = (D.EMBEDDED_FASHION_MNIST / name).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == D.EMBEDDED_FASHION_MNIST_SHA256[name] == official[name].sha256
        assert hashlib.md5(raw).hexdigest() == official[name].md5 and len(raw) == official[name].size
    readme = (D.EMBEDDED_FASHION_MNIST / "README.md").read_text()
    licence = (D.EMBEDDED_FASHION_MNIST / "LICENSE").read_text()
    assert "https://github.com/zalandoresearch/fashion-mnist" in readme and "MIT" in readme
    assert all(D.EMBEDDED_FASHION_MNIST_SHA256[n] in readme for n in SHIPPED)
    assert "Zalando SE" in licence and "MIT License" in licence


def test_shipped_split_loads() -> None:
    ds = D.datasets._embedded_fashion_test()
    assert ds is not None and ds.name == "fashion-mnist" and ds.source == str(D.EMBEDDED_FASHION_MNIST)
    assert ds.images.shape == (10000, 28, 28) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and ds.labels.min() == 0 and ds.labels.max() == 9
    assert np.bincount(ds.labels).tolist() == [1000] * 10 and ds.class_names == D.FASHION_CLASSES
    assert 0.2 < ds.images.mean() / 255 < 0.4


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_shipped_split_equals_debian_copy() -> None:
    shipped = D.datasets._embedded_fashion_test()
    debian = D.load_fashion_mnist("test", root=DEBIAN_DIR, embedded=False)
    assert debian.source == str(DEBIAN_DIR)
    assert np.array_equal(shipped.images, debian.images) and np.array_equal(shipped.labels, debian.labels)


def test_fallback_without_any_copy(no_data: Path) -> None:
    ds = D.load_fashion_mnist("test")
    assert ds.source == str(D.EMBEDDED_FASHION_MNIST) and ds.images.shape == (10000, 28, 28)
    assert D.load_dataset("fashion-mnist", "test").source == ds.source  # what evaluate.load_split / the app call
    with pytest.raises(D.DatasetNotFound) as exc:
        D.load_fashion_mnist("train")
    msg = str(exc.value)
    assert DOWNLOAD_CMD in msg and str(no_data) in msg and "apt-get install dataset-fashion-mnist" in msg
    assert isinstance(exc.value, FileNotFoundError)
    with pytest.raises(D.DatasetNotFound, match="download fashion-mnist"):
        D.load_fashion_mnist("test", embedded=False)


def test_fallback_with_default_search_list(no_data: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CBNORM_FASHION_MNIST")
    assert D.load_fashion_mnist("test").source == str(D.EMBEDDED_FASHION_MNIST)
    with pytest.raises(D.DatasetNotFound) as exc:
        D.load_fashion_mnist("train")
    msg = str(exc.value)
    assert DOWNLOAD_CMD in msg and "no-such-system-dir" in msg and str(tmp_path / "data" / "fashion-mnist") in msg
    # an explicit root that lacks the files: still the shipped test split, and the hint names --root
    assert D.load_fashion_mnist("test", root=no_data).source == str(D.EMBEDDED_FASHION_MNIST)
    with pytest.raises(D.DatasetNotFound, match=re.escape(f"{DOWNLOAD_CMD} --root {no_data}")):
        D.load_fashion_mnist("train", root=no_data)


def test_search_roots_come_before_the_shipped_copy(no_data: Path, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    monkeypatch.delenv("CBNORM_FASHION_MNIST")
    folder = tmp_path / "data" / "fashion-mnist"
    folder.mkdir(parents=True)
    imgs, labels = np.full((3, 28, 28), 7, np.uint8), np.array([1, 2, 3])
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(idx_gz(imgs))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(idx_gz(labels))
    ds = D.load_fashion_mnist("test")
    assert ds.source == str(folder) and ds.labels.tolist() == [1, 2, 3]
    # a damaged copy in a search root is an error, not a silent switch to the shipped copy
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(idx_gz(labels)[:-9])
    with pytest.raises(ValueError, match="t10k-labels"):
        D.load_fashion_mnist("test")


@pytest.mark.parametrize("name", SHIPPED)
def test_corrupt_shipped_copy(no_data: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    copy = tmp_path / "shipped"
    shutil.copytree(D.EMBEDDED_FASHION_MNIST, copy)
    raw = bytearray((copy / name).read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit: still a valid-looking gzip stream of the right size
    (copy / name).write_bytes(bytes(raw))
    monkeypatch.setattr(D.datasets, "EMBEDDED_FASHION_MNIST", copy)
    with pytest.raises(D.CorruptDataError) as exc:
        D.load_fashion_mnist("test")
    msg = str(exc.value)
    assert isinstance(exc.value, ValueError)
    assert str(copy / name) in msg and "damaged" in msg and D.EMBEDDED_FASHION_MNIST_SHA256[name] in msg
    assert DOWNLOAD_CMD in msg


def test_missing_shipped_copy(no_data: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(D.datasets, "EMBEDDED_FASHION_MNIST", tmp_path / "not-installed")
    with pytest.raises(D.DatasetNotFound) as exc:
        D.load_fashion_mnist("test")
    assert "shipped with cbnorm is missing" in str(exc.value) and DOWNLOAD_CMD in str(exc.value)


# ----------------------------------------------------------------------------- downloads


def test_download_command_end_to_end(fake_fashion: dict, server: Server, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "root"
    assert D.main(["download", "fashion-mnist", "--root", str(root)]) == 0
    out = capsys.readouterr()
    assert f"ready in {root / 'fashion-mnist'}" in out.out
    assert sorted(p.name for p in (root / "fashion-mnist").iterdir()) == sorted(fake_fashion)  # no .part left
    train = D.load_fashion_mnist("train", root=root)
    assert np.array_equal(train.images, fake_fashion["train-images-idx3-ubyte.gz"])
    assert np.array_equal(train.labels, fake_fashion["train-labels-idx1-ubyte.gz"])
    # idempotent: a second run verifies and skips, without a single request
    n = len(server.requests)
    assert D.main(["download", "fashion-mnist", "--root", str(root)]) == 0
    assert len(server.requests) == n and "already present, checksum ok" in capsys.readouterr().err


def test_download_default_folder_is_searched(fake_fashion: dict, no_data: Path, monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """Without --root the files land where load_fashion_mnist looks: $CBNORM_FASHION_MNIST when set..."""
    assert D.download("fashion-mnist", log=lambda m: None) == no_data
    assert D.load_fashion_mnist("train").source == str(no_data)
    # ... else $CBNORM_DATA/fashion-mnist
    monkeypatch.delenv("CBNORM_FASHION_MNIST")
    assert D.download_dir("fashion-mnist") == tmp_path / "data" / "fashion-mnist"
    D.download("fashion-mnist", log=lambda m: None)
    ds = D.load_fashion_mnist("test")
    assert ds.source == str(tmp_path / "data" / "fashion-mnist") and len(ds) == 5


def test_checksum_mismatch(server: Server, tmp_path: Path) -> None:
    good = b"the right bytes" * 100
    server.files["/f.gz"] = b"the wrong bytes" * 100  # same size: only the checksum tells
    rf = remote("f.gz", good, (f"{server.url}/f.gz",))
    with pytest.raises(D.ChecksumMismatch) as exc:
        D.download_file(rf, tmp_path, log=lambda m: None)
    msg = str(exc.value)
    assert f"{server.url}/f.gz" in msg and rf.sha256 in msg and "checksum mismatch" in msg
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a .part
    rf_md5_only = remote("f.gz", good, (f"{server.url}/f.gz",), sha256=None, size=None)
    with pytest.raises(D.ChecksumMismatch, match=rf_md5_only.md5):
        D.download_file(rf_md5_only, tmp_path, log=lambda m: None)


def test_network_error_names_the_url(tmp_path: Path, server: Server, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    dead, missing = closed_port_url("/x.gz"), f"{server.url}/missing.gz"
    rf = remote("x.gz", b"x", (dead, missing))
    with pytest.raises(D.DownloadError) as exc:
        D.download_file(rf, tmp_path, timeout=5, log=lambda m: None)
    assert not isinstance(exc.value, D.ChecksumMismatch)
    msg = str(exc.value)
    assert dead in msg and "refused" in msg.lower() and missing in msg and "HTTP 404" in msg
    assert not (tmp_path / "x.gz").exists()
    # the CLI turns it into one error line and exit status 1
    spec = D.RemoteDataset("mnist", "CBNORM_MNIST", "mnist", (rf,))
    monkeypatch.setitem(D.DOWNLOADS, "mnist", spec)
    assert D.main(["download", "mnist", "--root", str(tmp_path), "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert "error: mnist: could not download x.gz" in err and dead in err


def test_mirror_fallback_and_file_urls(server: Server, tmp_path: Path) -> None:
    content = b"payload" * 50
    server.files["/m.bin"] = content
    rf = remote("m.bin", content, (closed_port_url("/m.bin"), f"{server.url}/m.bin"))
    assert D.download_file(rf, tmp_path / "a", timeout=5, log=lambda m: None).read_bytes() == content
    src = tmp_path / "src.bin"
    src.write_bytes(content)
    rf = remote("m.bin", content, (src.as_uri(),))
    assert D.download_file(rf, tmp_path / "b", log=lambda m: None).read_bytes() == content
    with pytest.raises(D.DownloadError, match="nothing-here"):
        D.download_file(remote("m.bin", content, ((tmp_path / "nothing-here").as_uri(),)), tmp_path / "c",
                        log=lambda m: None)


def test_resume_partial_download(server: Server, tmp_path: Path) -> None:
    content = bytes(range(256)) * 40
    server.files["/r.bin"] = content
    rf = remote("r.bin", content, (f"{server.url}/r.bin",))
    (tmp_path / "r.bin.part").write_bytes(content[:3000])
    assert D.download_file(rf, tmp_path, log=lambda m: None).read_bytes() == content
    assert server.requests == [("/r.bin", "bytes=3000-")]
    assert not (tmp_path / "r.bin.part").exists()
    # a bad partial file: the resumed result fails verification, so it starts over from scratch
    server.requests.clear()
    (tmp_path / "r.bin").unlink()
    (tmp_path / "r.bin.part").write_bytes(b"\0" * 3000)
    assert D.download_file(rf, tmp_path, log=lambda m: None).read_bytes() == content
    assert server.requests == [("/r.bin", "bytes=3000-"), ("/r.bin", None)]
    # a server that ignores Range answers 200 with the whole file: the partial file is overwritten
    server.requests.clear()
    server.ranges = False
    (tmp_path / "r.bin").unlink()
    (tmp_path / "r.bin.part").write_bytes(content[:100])
    assert D.download_file(rf, tmp_path, log=lambda m: None).read_bytes() == content
    # a complete .part (server says 416): verified and moved into place
    server.ranges = True
    server.requests.clear()
    (tmp_path / "r.bin").rename(tmp_path / "r.bin.part")
    assert D.download_file(rf, tmp_path, log=lambda m: None).read_bytes() == content
    assert server.requests == [("/r.bin", f"bytes={len(content)}-")]


def test_interrupted_transfer_is_resumed_by_the_next_run(server: Server, tmp_path: Path) -> None:
    content = b"0123456789" * 1000
    server.files["/t.bin"] = content
    server.truncate.add("/t.bin")
    rf = remote("t.bin", content, (f"{server.url}/t.bin",))
    with pytest.raises(D.DownloadError, match="run the command again to resume"):
        D.download_file(rf, tmp_path, log=lambda m: None)
    part = tmp_path / "t.bin.part"
    assert not (tmp_path / "t.bin").exists() and part.stat().st_size == len(content) // 2
    server.truncate.clear()
    assert D.download_file(rf, tmp_path, log=lambda m: None).read_bytes() == content
    assert server.requests[-1] == ("/t.bin", f"bytes={len(content) // 2}-")


def test_damaged_existing_file_is_replaced(server: Server, tmp_path: Path) -> None:
    content = b"fresh" * 10
    server.files["/d.bin"] = content
    (tmp_path / "d.bin").write_bytes(b"stale" * 10)
    logs: list[str] = []
    rf = remote("d.bin", content, (f"{server.url}/d.bin",))
    assert D.download_file(rf, tmp_path, log=logs.append).read_bytes() == content
    assert any("present but SHA-256" in m for m in logs)


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def test_download_archive_dataset(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CIFAR-10-like tar.gz: fetched, verified, unpacked through a temporary folder, archive removed."""
    rng = np.random.default_rng(1)
    recs = {f"data_batch_{i}.bin": rng.integers(0, 10, (2, 3073), dtype=np.uint8).tobytes() for i in range(1, 6)}
    recs["test_batch.bin"] = rng.integers(0, 10, (3, 3073), dtype=np.uint8).tobytes()
    archive = _tar_gz({f"cifar-10-batches-bin/{k}": v for k, v in recs.items()})
    server.files["/c10.tar.gz"] = archive
    spec = D.RemoteDataset("cifar10", "CBNORM_CIFAR10", "",
                           (remote("cifar-10-binary.tar.gz", archive, (f"{server.url}/c10.tar.gz",)),),
                           folder="cifar-10-batches-bin", members={k: len(v) for k, v in recs.items()})
    monkeypatch.setitem(D.DOWNLOADS, "cifar10", spec)
    out = D.download("cifar10", tmp_path, log=lambda m: None)
    assert out == tmp_path / "cifar-10-batches-bin"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-bin"]  # archive and temp dir gone
    assert len(D.load_cifar10("test", root=tmp_path)) == 3 and len(D.load_cifar10("train", root=tmp_path)) == 10
    n = len(server.requests)
    assert D.download("cifar10", tmp_path, log=lambda m: None) == out and len(server.requests) == n
    # an archive with a member outside its folder is refused, nothing is unpacked
    evil = _tar_gz({"cifar-10-batches-bin/test_batch.bin": b"x", "../evil.txt": b"boom"})
    server.files["/c10.tar.gz"] = evil
    monkeypatch.setitem(D.DOWNLOADS, "cifar10", dataclasses.replace(
        spec, files=(remote("cifar-10-binary.tar.gz", evil, (f"{server.url}/c10.tar.gz",)),)))
    dest = tmp_path / "other"
    with pytest.raises(ValueError, match="evil"):
        D.download("cifar10", dest, log=lambda m: None)
    assert not (tmp_path / "evil.txt").exists() and not (dest / "cifar-10-batches-bin").exists()


def test_download_table_and_names() -> None:
    assert set(D.DOWNLOADS) == {"fashion-mnist", "mnist", "cifar10", "cifar100", "svhn"}
    for spec in D.DOWNLOADS.values():
        for rf in (*spec.files, *spec.extra):
            assert rf.urls and all(u.startswith(("http://", "https://")) and u.endswith(rf.name) for u in rf.urls)
            assert rf.md5 is not None and len(rf.md5) == 32
            assert rf.sha256 is None or len(rf.sha256) == 64
    assert D.download_dir("FashionMNIST", "/x") == Path("/x/fashion-mnist")
    assert D.download_dir("cifar-10", "/x") == Path("/x")
    with pytest.raises(ValueError, match="imagenet"):
        D.download_dir("imagenet")
    with pytest.raises(SystemExit):
        D.main(["download", "imagenet"])

"""The download client: every dataset's files with their checksums and mirrors (``DOWNLOADS``), resumable
HTTP downloads into a ``.part`` file, verification (size, MD5 / SHA-256), safe extraction of the CIFAR
archives. See :mod:`cbnorm.data`.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .._version import __version__



PathLike = str | os.PathLike[str]



def data_root() -> Path:
    """``$CBNORM_DATA`` or ``~/.cache/cbnorm/data``."""
    return Path(os.environ.get("CBNORM_DATA") or Path.home() / ".cache" / "cbnorm" / "data").expanduser()




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

"""``python -m cbnorm.data download NAME... [--root DIR]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

from .download import DOWNLOADS, _download_key, data_root, download

PathLike = str | os.PathLike[str]



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


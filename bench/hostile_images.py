"""Hostile-input cases for the image door (``cbnorm.images.load_image``): seed images of every format, their
mutations, and the contract check (bench/hostile.py's docstring).
"""
from __future__ import annotations

import contextlib
import io
import random
import struct
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cbnorm.images import MAX_PIXELS, load_image, to_rgb_array  # noqa: E402
from bench.hostile_common import ContractViolation  # noqa: E402


# ============================================================================================ images
def _encode(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def seed_images() -> dict[str, bytes]:
    """Small valid files of every kind the door sees (built in memory, deterministic)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    frames = [rgb.rotate(90 * i) for i in range(1, 3)]
    out = {
        "png": _encode(rgb, "PNG"),
        "png16": _encode(Image.fromarray((rng.random((10, 12)) * 65535).astype(np.uint16)), "PNG"),
        "png_palette": _encode(rgb.convert("P"), "PNG"),
        "png_rgba": _encode(rgb.convert("RGBA"), "PNG"),
        "jpeg": _encode(rgb, "JPEG"),
        "jpeg_exif": _encode(rgb, "JPEG", exif=exif),
        "jpeg_progressive": _encode(rgb, "JPEG", progressive=True),
        "gif": _encode(rgb, "GIF"),
        "gif_animated": _encode(rgb, "GIF", save_all=True, append_images=frames, duration=40, loop=0),
        "bmp": _encode(rgb, "BMP"),
        "tiff": _encode(rgb, "TIFF"),
        "tiff_float": _encode(Image.fromarray(rng.random((8, 10)).astype(np.float32)), "TIFF"),
        "webp": _encode(rgb, "WEBP"),
    }
    with contextlib.suppress(Exception):  # animated WebP needs libwebp's mux support
        out["webp_animated"] = _encode(rgb, "WEBP", save_all=True, append_images=frames)
    with contextlib.suppress(Exception):
        out["dds"] = _encode(rgb, "DDS")
    return out


def dds_unknown_flags() -> Optional[bytes]:
    """A DDS file whose pixel-format flags are 0 (PIL's plugin raised NotImplementedError on it)."""
    d = seed_images().get("dds")
    if d is None:
        return None
    return d[:80] + b"\0\0\0\0" + d[84:]


def png_claiming(w: int, h: int) -> bytes:
    """A ~70-byte PNG whose header claims w x h pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def claim_size(data: bytes, kind: str, w: int, h: int) -> Optional[bytes]:
    """``data`` (a file of ``kind``, as in seed_images) with its header patched to claim w x h pixels, or None
    where this kind has no simple size field. The pixel data stays small: a decompression bomb's calling card."""
    d = bytearray(data)
    if kind.startswith("png"):
        return png_claiming(w, h)
    if kind.startswith("jpeg"):
        i = 2
        while i + 9 < len(d):
            if d[i] != 0xFF:
                return None
            marker, length = d[i + 1], struct.unpack(">H", d[i + 2:i + 4])[0]
            if marker in (0xC0, 0xC1, 0xC2):  # SOF: precision, height, width
                d[i + 5:i + 9] = struct.pack(">HH", min(h, 65535), min(w, 65535))
                return bytes(d)
            i += 2 + length
        return None
    if kind.startswith("gif"):
        d[6:10] = struct.pack("<HH", min(w, 65535), min(h, 65535))
        j = d.find(b"\x2c", 13)  # first image descriptor
        if j > 0:
            d[j + 5:j + 9] = struct.pack("<HH", min(w, 65535), min(h, 65535))
        return bytes(d)
    if kind == "bmp":
        d[18:26] = struct.pack("<ii", min(w, 2**31 - 1), min(h, 2**31 - 1))
        return bytes(d)
    if kind.startswith("webp") and d[12:16] == b"VP8X":
        d[24:30] = (min(w, 2**24) - 1).to_bytes(3, "little") + (min(h, 2**24) - 1).to_bytes(3, "little")
        return bytes(d)
    if kind.startswith("webp") and d[12:16] == b"VP8 ":
        d[26:30] = struct.pack("<HH", min(w, 16383), min(h, 16383))
        return bytes(d)
    return None


IMAGE_MUTATIONS = ("truncate", "flip", "flip_many", "insert", "repeat", "huge_dims")


def mutate_image(data: bytes, kind: str, op: str, r: random.Random) -> bytes:
    """One mutation of a valid file (see IMAGE_MUTATIONS), driven by ``r``."""
    d = bytearray(data)
    if op == "truncate":
        return bytes(d[:r.randrange(len(d))])
    if op in ("flip", "flip_many"):
        for _ in range(r.randint(1, 4) if op == "flip" else r.randint(5, 60)):
            d[r.randrange(len(d))] = r.randrange(256)
        return bytes(d)
    if op == "insert":
        p = r.randrange(len(d) + 1)
        d[p:p] = bytes(r.randrange(256) for _ in range(r.randint(1, 32)))
        return bytes(d)
    if op == "repeat":
        p = r.randrange(len(d))
        q = r.randrange(p, len(d) + 1)
        d[q:q] = d[p:q] * r.randint(1, 3)
        return bytes(d)
    if op == "huge_dims":
        side = r.choice([8000, 20000, 65535, 100_000, 2**31 - 1])
        return claim_size(data, kind, side, r.choice([side, 1, 7])) or bytes(d[:r.randrange(len(d))])
    raise ValueError(f"unknown mutation {op!r}")


def check_image(data: Any, *, max_seconds: float = 10.0) -> str:
    """``"accepted"`` or ``"refused"``; ContractViolation (or the stray exception) otherwise."""
    from PIL import Image

    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd files; the outcome is what counts
            img = load_image(data)
    except (ValueError, TypeError) as err:
        if not str(err).strip():
            raise ContractViolation(f"load_image raised {type(err).__name__} with an empty message") from None
        return "refused"
    finally:
        if time.perf_counter() - t0 > max_seconds:
            raise ContractViolation(f"load_image took {time.perf_counter() - t0:.1f} s")
    if not isinstance(img, Image.Image):
        raise ContractViolation(f"load_image returned {type(img).__name__}")
    if not (1 <= img.width and 1 <= img.height and img.width * img.height <= MAX_PIXELS):
        raise ContractViolation(f"load_image returned an image of {img.size}")
    try:
        rgb = to_rgb_array(img)
    except ValueError as err:  # a mode PIL cannot convert: refused by the conversion, with a message
        if not str(err).strip():
            raise ContractViolation("to_rgb_array raised ValueError with an empty message") from None
        return "accepted"
    if rgb.dtype != np.uint8 or rgb.shape != (img.height, img.width, 3):
        raise ContractViolation(f"to_rgb_array gave {rgb.dtype} {rgb.shape} for a {img.mode} {img.size} image")
    return "accepted"

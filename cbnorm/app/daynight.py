"""Page 3, day <-> night: cached translators, translation of uploaded bytes, upload checks and previews, the
context parameters (drawn by ``figures.context_bars``) and the measured quality table.

Thin wrappers over ``cbnorm.daynight.transfer`` / ``cbnorm.images`` with Streamlit caches (bounded, never mutated:
``transfer.translate`` works on a copy of the shared model). Uploaded bytes only ever pass through
``cbnorm.images.load_image``; nothing is written to disk.

Uploads (``check_upload``): a file the image door refuses (not an image, empty, truncated, a decompression
bomb over 50 megapixels, ...) raises its ``ValueError``, which the page shows with ``st.error`` while the
rest of the page keeps working. A file it accepts comes back with what the page did to it, shown with
``st.warning`` (content changed: first frame of an animation, 16-bit/float reduced to 8 bits, downscaled,
a name that does not match the content) or ``st.info`` (EXIF rotation applied, CMYK / greyscale / palette
translated as RGB, transparency kept). Images over the page's own limits (``PAGE_MAX_PIXELS``,
``PAGE_MAX_SIDE``) are downscaled before translation: every session shares two CPU cores, and a 48-megapixel
photo took ~3 GB and 8-20 s to translate and encode here (input level 8 s, autoencoder 20 s). The page shows
previews (``preview``: upright, 8-bit, at most ``PREVIEW_WIDTH`` wide) rather than the uploaded bytes, which
a browser may not display (TIFF, 16-bit) or Streamlit may fail to re-encode.
"""
from __future__ import annotations

import io
import json
import math
from typing import Optional, Sequence

import streamlit as st
from PIL import Image

from cbnorm import images
from cbnorm.daynight import transfer
from cbnorm.daynight import PHOTOS

from . import shared as S

__all__ = ["TRANSLATORS", "translator_runs", "translate_bytes", "bundled_png", "bench_table",
           "fit_own_contexts", "translate_own", "png_bytes", "check_upload", "preview", "fit_page",
           "UPLOAD_TYPES", "PAGE_MAX_PIXELS", "PAGE_MAX_SIDE", "PREVIEW_WIDTH", "OWN_MAX_FILES"]

#: page label -> run directory name under the runs root ("stats" = CN statistics of the training photos)
TRANSLATORS = {"input-level CN (learned, the paper's CN-Channels)": "daynight-input",
               "feature-level autoencoder (context norms inside)": "daynight-feature",
               "CN statistics of the training photos (no learning)": "stats"}
BUNDLED = tuple(PHOTOS)
TTL = 1800  # seconds

#: file name extension -> the format PIL names for it (what the upload widgets accept)
EXTENSIONS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "gif": "GIF", "bmp": "BMP", "tif": "TIFF",
              "tiff": "TIFF", "webp": "WEBP"}
UPLOAD_TYPES = list(EXTENSIONS)
#: the page translates at most this many pixels and this many per side; larger uploads are downscaled
PAGE_MAX_PIXELS = 12_000_000
PAGE_MAX_SIDE = 8192
#: previews on the page: at most this wide (Streamlit's widest image) and this many pixels
PREVIEW_WIDTH = 1460
PREVIEW_PIXELS = 1_500_000
#: "fit your own contexts": at most this many photos per context, each reduced to OWN_PIXELS for the statistics
OWN_MAX_FILES = 20
OWN_PIXELS = 1_000_000


def _mp(n: float) -> str:
    return f"{n / 1e6:.1f} megapixels"


def _rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB (RGBA when the image has transparency) of any mode, as the translators see it."""
    return images.from_rgb_array(images.to_rgb_array(image), images.alpha_of(image))


def _scaled_size(w: int, h: int, max_pixels: int, max_side: int) -> tuple[int, int]:
    f = min(1.0, math.sqrt(max_pixels / (w * h)), max_side / max(w, h))
    return (w, h) if f >= 1.0 else (max(1, int(w * f)), max(1, int(h * f)))


def _fit_plan(w: int, h: int, max_pixels: Optional[int] = None, max_side: Optional[int] = None
              ) -> tuple[tuple[int, int], Optional[str]]:
    max_pixels = PAGE_MAX_PIXELS if max_pixels is None else max_pixels
    max_side = PAGE_MAX_SIDE if max_side is None else max_side
    size = _scaled_size(w, h, max_pixels, max_side)
    if size == (w, h):
        return size, None
    return size, (f"The image is {w:,} x {h:,} pixels ({_mp(w * h)}); this page translates at most "
                  f"{_mp(max_pixels)} and {max_side:,} pixels per side, so it was downscaled to "
                  f"{size[0]:,} x {size[1]:,} (the download has that size too).")


def fit_page(image: Image.Image, max_pixels: Optional[int] = None, max_side: Optional[int] = None
             ) -> tuple[Image.Image, Optional[str]]:
    """``image`` itself when within ``max_pixels`` and ``max_side`` (default: the page's limits); else an
    8-bit RGB(A) copy downscaled to fit (aspect ratio kept, at least 1 pixel per side), with a sentence
    saying so."""
    size, message = _fit_plan(*image.size, max_pixels, max_side)
    if message is None:
        return image, None
    return _rgb8(image).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0), message


def _load_for_page(data: bytes) -> Image.Image:
    return fit_page(images.load_image(data))[0]


@st.cache_data(max_entries=32, ttl=TTL, show_spinner=False)
def check_upload(data: bytes, name: str = "") -> dict:
    """What the page says about an uploaded file: ``{"description", "size" (as translated), "warnings",
    "notes"}``; ``ValueError`` (the image door's message) when the file cannot be used."""
    image = images.load_image(data)
    warnings, notes = [], []
    fmt, mode = image.format or "?", image.mode
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext in EXTENSIONS and image.format and EXTENSIONS[ext] != image.format:
        warnings.append(f"The file is named {name!r} but holds a {fmt} image; it was read as {fmt} (the "
                        f"content decides, not the name).")
    frames = image.info.get("frames")
    if frames:
        warnings.append(f"The {fmt} file has {frames} frames (an animation or a multi-page file): only the first "
                        f"frame is translated.")
    if mode in ("I", "F") or mode.startswith("I;16"):
        depth = "16-bit" if mode.startswith("I;16") else ("floating-point" if mode == "F" else "32-bit integer")
        warnings.append(f"This is a {depth} greyscale image (PIL mode {mode}): it was reduced to 8 bits per "
                        f"channel for translation, and the output is 8-bit RGB.")
    size, resized = _fit_plan(*image.size)
    if resized:
        warnings.append(resized)
    o = image.info.get("orientation_applied")
    if o:
        notes.append(f"Turned upright: the photo's EXIF orientation tag ({o}: {images.ORIENTATIONS[o]}) was "
                     f"applied, as a photo viewer does.")
    if mode == "CMYK":
        notes.append("CMYK image (print colours): converted to RGB for translation.")
    elif mode in ("L", "LA", "1", "La"):
        notes.append("Greyscale image: translated as RGB, so the output can be coloured.")
    elif mode in ("P", "PA"):
        notes.append("Palette image: translated as RGB (the output is a full-colour PNG).")
    elif mode not in ("RGB", "RGBA", "RGBX", "RGBa", "I", "F") and not mode.startswith("I;16"):
        notes.append(f"PIL mode {mode}: converted to RGB for translation.")
    if images.alpha_of(image) is not None:
        notes.append("Transparency: only the colours are translated; the alpha channel is kept unchanged.")
    return {"description": images.describe(image), "size": size, "warnings": warnings, "notes": notes}


@st.cache_data(max_entries=64, ttl=TTL, show_spinner=False)
def preview(data: bytes) -> bytes:
    """A preview of image bytes for st.image: upright, 8-bit RGB(A), at most PREVIEW_WIDTH wide and
    PREVIEW_PIXELS in all; JPEG (PNG when it has transparency)."""
    image = _rgb8(images.load_image(data))
    w, h = image.size
    size = _scaled_size(w, h, PREVIEW_PIXELS, 10**9)
    size = _scaled_size(*size, 10**12, PREVIEW_WIDTH) if size[0] > PREVIEW_WIDTH else size
    if size != (w, h):
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    if image.mode == "RGBA":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@st.cache_resource(max_entries=2, ttl=TTL, show_spinner="Measuring the training photos…")
def training_stats() -> transfer.ContextStats:
    """The statistics translator's contexts (~1-2 s to compute; shared, read-only)."""
    return transfer.training_stats()


def translator_runs() -> dict[str, str]:
    """Label -> run path for the translators present in the runs directory (plus the statistics one)."""
    root = S.runs_root()
    out = {}
    for label, name in TRANSLATORS.items():
        if name == "stats" or (root / name / "config.json").is_file():
            out[label] = name if name == "stats" else str(root / name)
    return out


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@st.cache_data(max_entries=16, ttl=3600, show_spinner=False)
def bundled_png(name: str, context: str) -> bytes:
    """A library photo in the day context, or rendered by the day-for-night model of the input run."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled photo {name!r}; choose one of {list(BUNDLED)}")
    params = None
    root = S.runs_root() / "daynight-input" / "config.json"
    if root.is_file():
        params = json.loads(root.read_text()).get("renderer")
    return png_bytes(transfer.bundled_image(name, context, params))


@st.cache_data(max_entries=16, ttl=TTL, show_spinner=False)
def translate_bytes(data: bytes, run_path: str, source: str, target: str, strength: float) -> bytes:
    """Translate uploaded/bundled image bytes; returns PNG bytes of the same size (any mode handled), or of
    the downscaled size when the image is over the page's limits (``fit_page``)."""
    image = _load_for_page(data)
    if run_path == "stats":
        out = transfer.translate_with_stats(image, training_stats(), source, target, strength)
    else:
        run = S.get_run(run_path, S.device())
        out = transfer.translate(run, image, source=source, target=target, strength=strength)
    return png_bytes(out)


@st.cache_data(max_entries=8, ttl=3600, show_spinner=False)
def context_parameters(run_path: str) -> dict:
    if run_path == "stats":
        return training_stats().parameters()
    return transfer.context_parameters(S.get_run(run_path, S.device()))


def bench_table() -> Optional[dict]:
    """bench/results/daynight.json as rows for a table, with its machine; None when absent."""
    path = S.bench_dir() / "daynight.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    rows = [{"method": r["method"], "day→night PSNR (dB)": r["day_to_night_psnr"],
             "day→night SSIM": r["day_to_night_ssim"], "night→day PSNR (dB)": r["night_to_day_psnr"],
             "night→day SSIM": r["night_to_day_ssim"], "s / megapixel": r["seconds_per_megapixel"]}
            for r in data.get("table", [])]
    return {"rows": rows, "machine": data.get("machine", {}), "holdout": data.get("holdout_photos", [])}


def _own_image(data: bytes, what: str, name: Optional[str]) -> Image.Image:
    try:
        image = images.load_image(data)
    except ValueError as err:
        raise ValueError(f"{what} {name!r}: {err}" if name else f"{what}: {err}") from None
    return fit_page(image, OWN_PIXELS, PAGE_MAX_SIDE)[0]  # statistics need no more pixels than this


@st.cache_data(max_entries=8, ttl=TTL, show_spinner="Measuring your photos…")
def fit_own_contexts(day: Sequence[bytes], night: Sequence[bytes], _day_names: Optional[Sequence[str]] = None,
                     _night_names: Optional[Sequence[str]] = None) -> transfer.ContextStats:
    """Per-context statistics (CN eq. 23-24) of the user's own photos; every file through the image door
    (an error names the file: ``_day_names`` / ``_night_names``, not part of the cache key), each reduced to
    ``OWN_PIXELS``; at most ``OWN_MAX_FILES`` per context."""
    if not day or not night:
        raise ValueError("upload at least one day photo and one night photo")
    for what, files in (("day photos", day), ("night photos", night)):
        if len(files) > OWN_MAX_FILES:
            raise ValueError(f"{len(files)} {what}: at most {OWN_MAX_FILES} per context, please")
    dn = list(_day_names or [None] * len(day))
    nn = list(_night_names or [None] * len(night))
    return transfer.fit_contexts([_own_image(b, f"day photo {i + 1}", n) for i, (b, n) in enumerate(zip(day, dn))],
                                 [_own_image(b, f"night photo {i + 1}", n) for i, (b, n) in enumerate(zip(night, nn))])


@st.cache_data(max_entries=8, ttl=TTL, show_spinner=False)
def translate_own(data: bytes, day: Sequence[bytes], night: Sequence[bytes], source: str, target: str,
                  strength: float) -> bytes:
    """``data`` translated with the contexts of the user's own ``day`` and ``night`` photos (PNG bytes)."""
    stats = fit_own_contexts(day, night)
    return png_bytes(transfer.translate_with_stats(_load_for_page(data), stats, source, target, strength))

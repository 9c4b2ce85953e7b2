"""The one door for uploaded image bytes, and conversions between PIL images and RGB arrays.

``load_image(data)`` turns the bytes of an uploaded file into a fully decoded ``PIL.Image.Image`` or raises
``ValueError`` with a message meant for the user (the app shows it with ``st.error``):

* empty input, bytes that are not an image (text, a zip, ...), a file that is cut short (truncated PNG or
  JPEG), a file PIL cannot decode (whatever exception its plugin raises on hostile bytes: ``struct.error``
  from a cut GIF frame table, ``NotImplementedError`` from a DDS with unknown flags, ...);
* a decompression bomb: more than ``max_pixels`` pixels (default 50 megapixels). The size is read from the
  file's header *before* any pixel is decoded, so a tiny file that claims 100000 x 100000 pixels costs
  nothing. PIL's own guard (``Image.MAX_IMAGE_PIXELS``, ~89 MP by default, which *warns* between 1x and
  2x and raises above) is also caught and reported the same way (its warning too, where warnings are turned
  into errors). We change neither that process-wide setting nor the warning filters (the app's threads
  share both); our own header check is the stricter guard.

The file name (or extension) plays no part: the format is recognised from the bytes.

Truncation is detected by PIL's decoders as long as ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` keeps its default
(False); this project never sets it. If some other code turns it on process-wide, PIL pads truncated files
instead of failing, and we do not toggle the global back (other threads may rely on it).

What comes back:

* the EXIF orientation tag is applied (``ImageOps.exif_transpose``), so a portrait phone photo stands up;
  the tag's value (2..8) is then kept in ``image.info["orientation_applied"]`` (``ORIENTATIONS`` says what
  it did);
* of an animated or multi-frame file (GIF, APNG, WebP, multi-page TIFF) only the first frame is kept;
* the image keeps its PIL mode (RGB, RGBA, L, LA, P, PA, CMYK, I;16, I, F, 1, ...) and size; it is fully
  loaded and detached from the bytes.

For processing, ``to_rgb_array`` converts every mode to uint8 RGB (H, W, 3):

* ``1``, ``L``: grey replicated on the three channels; ``P`` / ``PA``: the palette is applied;
* ``LA``, ``RGBA``, ``PA``, ``P`` with transparency: the alpha channel is dropped here (``alpha_of`` returns
  it, and ``cbnorm.daynight.transfer`` puts it back on the result unchanged);
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's conversion to RGB;
* high bit depth ``I;16*``, ``I`` (32-bit integers) and ``F`` (float): mapped to 0..255 without clipping
  the data away: 16-bit data (``I;16`` or ``I`` with values in 0..65535) is divided by 257 (65535 -> 255),
  ``I``/``F`` data already within 0..255 is kept, ``F`` data within [0, 1] is multiplied by 255, and any
  other range is stretched linearly from its minimum to its maximum. NaN becomes 0.

``from_rgb_array(rgb, alpha=None)`` builds the RGB (or RGBA) image back.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["load_image", "to_rgb_array", "from_rgb_array", "alpha_of", "MAX_PIXELS", "ORIENTATIONS", "describe"]

#: default pixel limit of :func:`load_image` (50 megapixels)
MAX_PIXELS = 50_000_000
_ORIENTATION = 0x0112  # the EXIF orientation tag
#: what each EXIF orientation value asks of a viewer (:func:`load_image` does it)
ORIENTATIONS = {2: "mirrored left-right", 3: "rotated 180°", 4: "mirrored top-bottom",
                5: "mirrored along the main diagonal", 6: "rotated 90° clockwise",
                7: "mirrored along the anti-diagonal", 8: "rotated 90° counter-clockwise"}


def _mp(n: float) -> str:
    return f"{n / 1e6:.1f} megapixels"


def load_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode the bytes of an uploaded image file; ``ValueError`` with a user-facing message when they are
    not a usable image (see the module docstring). ``TypeError`` when ``data`` is not bytes-like."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        hint = " (for a Streamlit upload, pass uploaded_file.getvalue())" if hasattr(data, "getvalue") else ""
        raise TypeError(f"load_image expects the file's bytes, got {type(data).__name__}{hint}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if len(data) == 0:
        raise ValueError("The file is empty (0 bytes). Please upload an image file (PNG, JPEG, GIF, WebP, "
                         "TIFF, BMP).")
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w < 1 or h < 1:
            raise ValueError(f"The image has no pixels ({w} x {h}).")
        if w * h > max_pixels:
            raise ValueError(f"The image is too large: {w} x {h} pixels = {_mp(w * h)}, over the limit of "
                             f"{_mp(max_pixels)}. Please downscale it before uploading.")
        frames = int(getattr(im, "n_frames", 1) or 1)
        if frames > 1:
            im.seek(0)  # animated GIF / APNG / WebP, multi-page TIFF: the first frame
        im.load()
        orientation = im.getexif().get(_ORIENTATION)
        out = ImageOps.exif_transpose(im)
        if out is im:
            out = im.copy()
            orientation = None  # nothing was applied
        out.load()
        out.format = im.format  # "PNG", "JPEG", ... (copies drop it)
    except ValueError as err:
        if str(err).startswith(("The image", "The file")):
            raise
        raise ValueError(f"The file could not be decoded as an image ({err}).") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"The image is too large (a possible decompression bomb): "
                         f"{str(err).split(',')[0]}; the limit here is {_mp(max_pixels)}.") from None
    except UnidentifiedImageError:
        raise ValueError("The file is not an image (or not in a format we can read: PNG, JPEG, GIF, WebP, "
                         "TIFF, BMP, ...).") from None
    except (OSError, SyntaxError, EOFError, IndexError, KeyError, TypeError, MemoryError) as err:
        msg = str(err)
        if "truncated" in msg.lower() or isinstance(err, EOFError) or "end of file" in msg.lower():
            raise ValueError("The image file is truncated (cut short, e.g. an interrupted download) and "
                             "cannot be decoded.") from None
        raise ValueError(f"The image file is corrupt or unsupported and cannot be decoded ({msg or type(err).__name__}).") \
            from None
    except Exception as err:  # PIL's plugins raise more on hostile bytes (struct.error, NotImplementedError, ...)
        raise ValueError(f"The image file is corrupt or unsupported and cannot be decoded "
                         f"({type(err).__name__}: {err}).") from None
    if frames > 1:
        out.info["frames"] = frames
    if isinstance(orientation, int) and 2 <= orientation <= 8:
        out.info["orientation_applied"] = orientation
    return out


def describe(image: Image.Image) -> str:
    """A short text for the page: ``"JPEG 640 x 427, RGB"`` (+ frame count when the file had several)."""
    frames = image.info.get("frames")
    fmt = f"{image.format} " if image.format else ""
    return f"{fmt}{image.width} x {image.height}, {image.mode}" + (f", first of {frames} frames" if frames else "")


def _high_depth_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if a.size == 0:
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(a.min()), float(a.max())
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535 and hi > 255):
        a = a / 257.0
    elif lo >= 0 and hi <= 1.0 and mode == "F":
        a = a * 255.0
    elif lo >= 0 and hi <= 255:
        pass
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL image -> uint8 array (H, W, 3), RGB (alpha dropped; see the module docstring per mode)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    mode = image.mode
    if mode == "RGB":
        arr = np.asarray(image)
    elif mode in ("I", "F") or mode.startswith("I;16"):
        grey = _high_depth_to_uint8(np.asarray(image), mode)
        arr = np.repeat(grey[..., None], 3, axis=2)
    elif mode in ("RGBA", "RGBX", "RGBa"):
        arr = np.asarray(image.convert("RGBA"))[..., :3] if mode == "RGBa" else np.asarray(image)[..., :3]
    elif mode in ("P", "PA"):
        arr = np.asarray(image.convert("RGBA"))[..., :3]
    elif mode in ("L", "LA", "1", "La"):
        grey = np.asarray(image.convert("L"))
        arr = np.repeat(grey[..., None], 3, axis=2)
    else:  # CMYK, YCbCr, LAB, HSV, ...
        try:
            arr = np.asarray(image.convert("RGB"))
        except (ValueError, OSError) as err:
            raise ValueError(f"images of PIL mode {mode!r} cannot be converted to RGB ({err})") from None
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:  # pragma: no cover - defensive
        raise ValueError(f"conversion of a {mode} image gave shape {arr.shape}, expected (H, W, 3)")
    return arr


def alpha_of(image: Image.Image) -> Optional[np.ndarray]:
    """uint8 alpha (H, W) of an image with transparency (RGBA, LA, PA, P with a transparent colour), else None."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        return np.ascontiguousarray(np.asarray(image.convert("RGBA"))[..., 3])
    return None


def from_rgb_array(rgb: np.ndarray, alpha: Optional[np.ndarray] = None) -> Image.Image:
    """uint8 (H, W, 3) (floats in [0, 1] are scaled and rounded) [+ alpha (H, W)] -> an RGB (RGBA) image."""
    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"rgb must be (H, W, 3), got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"rgb must be uint8 (0..255) or float in [0, 1], got dtype {a.dtype}")
        a = np.clip(np.rint(np.nan_to_num(a) * 255.0), 0, 255).astype(np.uint8)
    a = np.ascontiguousarray(a)
    if alpha is None:
        return Image.fromarray(a, "RGB")
    al = np.asarray(alpha)
    if al.shape != a.shape[:2] or al.dtype != np.uint8:
        raise ValueError(f"alpha must be uint8 of shape {a.shape[:2]}, got {al.dtype} {al.shape}")
    return Image.fromarray(np.ascontiguousarray(np.dstack([a, al])), "RGBA")

"""The image door (cbnorm.images.load_image) and the RGB conversions of every PIL mode."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cbnorm.images import alpha_of, describe, from_rgb_array, load_image, to_rgb_array


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient_rgb(h=24, w=32) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1).astype(np.uint8)


def png_claiming(w: int, h: int) -> bytes:
    """A ~70-byte PNG whose header claims w x h pixels (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("data,msg", [
    (b"", r"The file is empty"),
    (b"hello, this is a text file\n" * 20, r"not an image"),
    (b"PK\x03\x04" + b"\x00" * 200, r"not an image"),
    (b"\x89PNG\r\n\x1a\n", r"not an image|truncated|corrupt"),
])
def test_refuses_non_images(data, msg):
    with pytest.raises(ValueError, match=msg):
        load_image(data)


def test_refuses_non_bytes():
    with pytest.raises(TypeError, match="expects the file's bytes"):
        load_image("photo.png")

    class Upload:
        def getvalue(self):
            return b""
    with pytest.raises(TypeError, match=r"getvalue\(\)"):
        load_image(Upload())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF"])
def test_refuses_truncated_files(fmt):
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)), fmt)
    with pytest.raises(ValueError, match="truncated|corrupt"):
        load_image(data[: len(data) // 2])


def test_refuses_decompression_bombs():
    data = png_claiming(8000, 8000)  # 64 MP in 70 bytes: our header check, before decoding
    assert len(data) < 100
    with pytest.raises(ValueError, match=r"too large: 8000 x 8000 pixels = 64.0 megapixels, over the limit of 50.0"):
        load_image(data)
    with pytest.raises(ValueError, match=r"too large"):  # beyond PIL's own limit: its DecompressionBombError
        load_image(png_claiming(100_000, 100_000))
    with pytest.raises(ValueError, match=r"over the limit of 0.0 megapixels"):
        load_image(encode(Image.fromarray(gradient_rgb()), "PNG"), max_pixels=100)


def test_extension_plays_no_part(tmp_path):
    """A JPEG saved under a .png name (and bytes without any name) load by their content."""
    path = tmp_path / "holiday.png"
    Image.fromarray(gradient_rgb()).save(path, "JPEG")
    img = load_image(path.read_bytes())
    assert img.format == "JPEG" and img.size == (32, 24)


# ----------------------------------------------------------------------------- modes
def _mode_image(mode: str) -> Image.Image:
    rgb = Image.fromarray(gradient_rgb())
    if mode in ("RGB", "RGBA", "L", "LA", "CMYK", "1"):
        return rgb.convert(mode)
    if mode == "P":
        return rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    if mode == "PA":
        return rgb.convert("P", palette=Image.ADAPTIVE, colors=16).convert("PA")
    g = np.asarray(rgb.convert("L")).astype(np.float64)
    if mode == "I;16":
        return Image.fromarray((g * 257).astype(np.uint16))
    if mode == "I":
        return Image.fromarray((g * 257).astype(np.int32), "I")
    if mode == "F":
        return Image.fromarray((g / 255.0).astype(np.float32), "F")
    raise AssertionError(mode)


FORMAT_OF = {"RGB": "PNG", "RGBA": "PNG", "L": "PNG", "LA": "PNG", "P": "PNG", "PA": None, "CMYK": "JPEG",
             "I;16": "PNG", "I": "TIFF", "F": "TIFF", "1": "PNG"}


@pytest.mark.parametrize("mode", list(FORMAT_OF))
def test_every_mode_loads_and_converts(mode):
    img = _mode_image(mode)
    if FORMAT_OF[mode]:
        img = load_image(encode(img, FORMAT_OF[mode]))
    arr = to_rgb_array(img)
    assert arr.shape == (24, 32, 3) and arr.dtype == np.uint8
    grey = np.asarray(Image.fromarray(gradient_rgb()).convert("L")).astype(int)
    if mode in ("L", "LA", "I;16", "I", "F"):  # grey, full range kept (16-bit divided by 257, F times 255)
        assert np.abs(arr[..., 0].astype(int) - grey).max() <= 1
        assert (arr[..., 0] == arr[..., 2]).all()
    elif mode in ("RGB", "RGBA"):
        assert np.array_equal(arr, gradient_rgb())
    elif mode == "CMYK":
        assert np.abs(arr.astype(int) - gradient_rgb()).mean() < 6  # JPEG
    elif mode == "1":
        assert set(np.unique(arr)) <= {0, 255}
    else:  # palette: 16 colours
        assert np.abs(arr.astype(int) - gradient_rgb()).mean() < 20
    assert from_rgb_array(arr).size == (32, 24)


def test_sixteen_bit_png_uses_the_whole_range():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (4, 1))
    img = load_image(encode(Image.fromarray(ramp), "PNG"))
    assert img.mode.startswith("I")
    arr = to_rgb_array(img)[0, :, 0]
    assert arr[0] == 0 and arr[-1] == 255 and (np.diff(arr.astype(int)) >= 0).all()


def test_high_depth_out_of_range_is_stretched():
    f = Image.fromarray(np.array([[-3.0, 0.0], [5.0, 997.0]], np.float32), "F")
    arr = to_rgb_array(f)[..., 0]
    assert arr.min() == 0 and arr.max() == 255
    f = Image.fromarray(np.array([[np.nan, 0.5]], np.float32), "F")
    assert to_rgb_array(f)[0, :, 0].tolist() == [0, 128]


def test_alpha_and_palette_transparency():
    rgba = np.dstack([gradient_rgb(), np.full((24, 32), 7, np.uint8)])
    img = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert alpha_of(img).max() == 7 and np.array_equal(to_rgb_array(img), gradient_rgb())
    p = Image.fromarray(gradient_rgb()).convert("P", palette=Image.ADAPTIVE, colors=8)
    img = load_image(encode(p, "PNG", transparency=0))
    assert img.mode == "P" and alpha_of(img) is not None and (alpha_of(img) == 0).any()
    assert alpha_of(Image.fromarray(gradient_rgb())) is None
    out = from_rgb_array(gradient_rgb(), alpha_of(img))
    assert out.mode == "RGBA"


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    img = load_image(buf.getvalue())
    arr = to_rgb_array(img)
    assert img.size == (20, 10) and tuple(arr[5, 5]) == (255, 0, 0)
    assert img.info["frames"] == 3 and "first of 3 frames" in describe(img)


def test_exif_orientation_is_applied():
    base = Image.fromarray(gradient_rgb(20, 40))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img = load_image(encode(base, "JPEG", exif=exif.tobytes(), quality=95))
    assert img.size == (20, 40)
    assert img.getexif().get(0x0112) in (None, 1)


def test_result_is_detached_and_loaded():
    data = bytearray(encode(Image.fromarray(gradient_rgb()), "PNG"))
    img = load_image(data)
    data[:] = b"\x00" * len(data)
    assert np.array_equal(to_rgb_array(img), gradient_rgb())


def test_from_rgb_array_checks():
    assert np.array_equal(np.asarray(from_rgb_array(gradient_rgb() / 255.0)), gradient_rgb())
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        from_rgb_array(np.zeros((4, 4), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        from_rgb_array(np.zeros((4, 4, 3), np.int64))
    with pytest.raises(TypeError, match="PIL.Image"):
        to_rgb_array(np.zeros((4, 4, 3), np.uint8))


# ----------------------------------------------------------------------------- what phones and the web send
def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


#: what a viewer must show for each EXIF orientation of a stored image a (H, W, 3), written from the EXIF
#: specification's wording ("row 0 is the visual ..., column 0 is the visual ..."), not from PIL
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                       # mirrored left-right
    3: lambda a: a[::-1, ::-1],                    # rotated 180
    4: lambda a: a[::-1, :],                       # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),             # row 0 = visual left, column 0 = visual top
    6: lambda a: a[::-1].transpose(1, 0, 2),       # row 0 = visual right (turn 90 clockwise)
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), # row 0 = visual right, column 0 = visual bottom
    8: lambda a: a[:, ::-1].transpose(1, 0, 2),    # row 0 = visual left, column 0 = visual bottom (90 ccw)
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_gives_the_upright_pixels(orientation):
    """Lossless (PNG with an eXIf chunk): every pixel where the orientation says it belongs."""
    a = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3) * 5  # 5 wide, 3 high, every pixel distinct
    img = load_image(encode(Image.fromarray(a), "PNG", exif=_exif(orientation)))
    want = UPRIGHT[orientation](a)
    assert img.size == (want.shape[1], want.shape[0])
    assert np.array_equal(np.asarray(img), want)
    assert img.info.get("orientation_applied") == (orientation if orientation != 1 else None)


def test_exif_rotated_jpeg_stands_up():
    """A phone's portrait JPEG: stored 60 wide x 40 high with orientation 6; the top-left stored quadrant
    (red) must end up top-right, the bottom-left (blue) top-left."""
    a = np.zeros((40, 60, 3), np.uint8)
    a[:20, :30] = (255, 0, 0)
    a[20:, :30] = (0, 0, 255)
    a[:, 30:] = (0, 255, 0)
    img = load_image(encode(Image.fromarray(a), "JPEG", exif=_exif(6), quality=95))
    arr = to_rgb_array(img)
    assert img.size == (40, 60)  # 40 wide, 60 high
    assert tuple(arr[5, 35]) > (200, 0, 0) and arr[5, 35, 2] < 60   # red, top right
    assert arr[5, 5, 2] > 200 and arr[5, 5, 0] < 60                  # blue, top left
    assert arr[50, 20, 1] > 200                                       # green, bottom
    assert img.getexif().get(0x0112) in (None, 1)  # not applied twice by a viewer


@pytest.mark.parametrize("value", [0, 9, 65535])
def test_invalid_exif_orientation_is_ignored(value):
    a = gradient_rgb()
    img = load_image(encode(Image.fromarray(a), "PNG", exif=_exif(value)))
    assert np.array_equal(np.asarray(img), a) and "orientation_applied" not in img.info


def test_wrong_extension_or_none_plays_no_part():
    """Content decides: text saved as .png is refused as not an image; a PNG in a .jpg file loads as PNG."""
    with pytest.raises(ValueError, match="not an image"):
        load_image("a .png that is text\n".encode() * 10)
    img = load_image(encode(Image.fromarray(gradient_rgb()), "PNG"))
    assert img.format == "PNG" and np.array_equal(np.asarray(img), gradient_rgb())


def test_truncated_jpeg_cut_in_the_scan_is_refused():
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)), "JPEG", quality=90)
    for cut in (len(data) - 200, len(data) * 3 // 4, 700):
        with pytest.raises(ValueError, match="truncated|corrupt"):
            load_image(data[:cut])


def test_png_claiming_huge_size_in_a_small_file_costs_nothing():
    import time

    data = png_claiming(60_000, 60_000)  # 3.6 gigapixels declared in ~70 bytes
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"too large.*(3600000000 pixels|3600.0 megapixels)"):  # PIL's guard first
        load_image(data)
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(ValueError, match=r"too large: 1 x 60000000"):  # one row, 60 M pixels
        load_image(png_claiming(1, 60_000_000))


def test_sixteen_bit_png_values():
    """Known 16-bit values map to value / 257 (65535 -> 255, 257 -> 1, 32896 -> 128)."""
    v = np.array([[0, 257, 32896, 65535]], np.uint16)
    img = load_image(encode(Image.fromarray(v), "PNG"))
    assert img.mode.startswith("I") and img.size == (4, 1)
    assert to_rgb_array(img)[0, :, 1].tolist() == [0, 1, 128, 255]


def test_palette_png_with_transparent_index():
    """Palette index 1 marked transparent: those pixels get alpha 0, the others 255, colours from the palette."""
    p = Image.new("P", (4, 2))
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    p.putdata([0, 1, 1, 0, 0, 0, 1, 0])
    img = load_image(encode(p, "PNG", transparency=1))
    assert img.mode == "P"
    assert alpha_of(img).tolist() == [[255, 0, 0, 255], [255, 255, 0, 255]]
    assert tuple(to_rgb_array(img)[0, 0]) == (10, 20, 30) and tuple(to_rgb_array(img)[0, 1]) == (200, 100, 50)


def test_greyscale_with_alpha():
    grey = np.array([[0, 100], [200, 255]], np.uint8)
    alpha = np.array([[255, 0], [128, 7]], np.uint8)
    img = load_image(encode(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG"))
    assert img.mode == "LA"
    assert np.array_equal(to_rgb_array(img), np.repeat(grey[..., None], 3, 2))
    assert np.array_equal(alpha_of(img), alpha)


def test_cmyk_jpeg_converts_to_rgb():
    """Pure cyan / magenta / yellow / black CMYK patches come back near (0,255,255), (255,0,255), (255,255,0), 0."""
    cmyk = np.zeros((16, 64, 4), np.uint8)
    for i in range(4):
        cmyk[:, 16 * i:16 * (i + 1), i] = 255
    img = load_image(encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95))
    assert img.mode == "CMYK" and img.size == (64, 16)
    arr = to_rgb_array(img).astype(int)
    for i, want in enumerate([(0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0)]):
        assert np.abs(arr[8, 16 * i + 8] - np.array(want)).max() < 40, (i, arr[8, 16 * i + 8])


def test_animated_png_and_multipage_tiff_give_the_first_frame():
    frames = [Image.new("RGB", (8, 6), c) for c in ((9, 9, 9), (200, 0, 0), (0, 200, 0))]
    for fmt in ("PNG", "TIFF"):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
        img = load_image(buf.getvalue())
        assert img.info.get("frames") == 3, fmt
        assert tuple(to_rgb_array(img)[3, 3]) == (9, 9, 9), fmt

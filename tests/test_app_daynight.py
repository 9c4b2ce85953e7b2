"""AppTest of the day <-> night page on the committed translators (what is shown, not just "no exception"),
and every kind of hostile upload: refused with a message naming what is wrong, or translated with a note on
what the page did to it; the session keeps working afterwards."""
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from cbnorm import images

ROOT = Path(__file__).resolve().parents[1]
APP, PAGE = str(ROOT / "app.py"), "pages/3_Day_Night_Transfer.py"


@pytest.fixture(scope="module")
def page():
    old = os.environ.get("CBNORM_RUNS")
    os.environ["CBNORM_RUNS"] = str(ROOT / "checkpoints")  # the committed translators
    at = AppTest.from_file(APP, default_timeout=180).run()
    at.switch_page(PAGE).run()
    yield at
    if old is None:
        os.environ.pop("CBNORM_RUNS", None)
    else:
        os.environ["CBNORM_RUNS"] = old


def test_defaults_show_input_output_bars_and_table(page):
    assert not page.exception and not page.error
    assert page.title[0].value == "Day ↔ night transfer"
    charts = page.get("plotly_chart")
    spec = json.loads(charts[0].proto.spec)
    assert {t["name"] for t in spec["data"]} == {"day", "night"}  # bars of both contexts
    assert len(page.get("image")) == 2  # input and output side by side
    assert page.get("download_button")
    table = page.dataframe[0].value
    assert "identity" in list(table["method"]) and "day→night PSNR (dB)" in table.columns


@pytest.mark.parametrize("translator", [0, 1, 2])
def test_each_translator_and_direction(page, translator):
    page.selectbox(key="dn_translator").set_value(page.selectbox(key="dn_translator").options[translator]).run()
    page.radio(key="dn_direction").set_value("night → day").run()
    assert not page.exception and not page.error
    page.radio(key="dn_direction").set_value("day → night").run()
    assert not page.error


def _uploader(at, key):
    return next(u for u in at.get("file_uploader") if u.key == key)


def test_upload_of_a_non_image_is_a_clear_error_then_a_good_one_works(page):
    page.radio(key="dn_source").set_value("upload").run()
    _uploader(page, "dn_upload").set_value(("notes.png", b"this is not an image", "image/png")).run()
    assert not page.exception
    assert page.error and "image" in page.error[0].value.lower()
    img = Image.new("P", (41, 29), 3)  # a palette PNG
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    _uploader(page, "dn_upload").set_value(("p.png", buf.getvalue(), "image/png")).run()
    assert not page.exception and not page.error
    assert len(page.get("image")) >= 1
    page.radio(key="dn_source").set_value("bundled photo").run()


def test_fit_your_own_contexts(page):
    rng = np.random.default_rng(0)

    def png(scale):
        buf = io.BytesIO()
        Image.fromarray((rng.random((20, 30, 3)) * scale).astype(np.uint8)).save(buf, format="PNG")
        return buf.getvalue()
    _uploader(page, "dn_own_day").set_value([("d1.png", png(255), "image/png"), ("d2.png", png(255), "image/png")])
    _uploader(page, "dn_own_night").set_value([("n1.png", png(60), "image/png")]).run()
    assert not page.exception and not page.error
    bars = [json.loads(c.proto.spec) for c in page.get("plotly_chart")]
    assert len(bars) == 2  # the translator's contexts and yours
    night_means = [t for t in bars[1]["data"] if t["name"] == "night"][0]
    assert night_means["y"] is not None


def test_translate_bytes_keeps_size_and_identity_at_strength_zero():
    from cbnorm.app import daynight as D

    img = Image.fromarray((np.random.default_rng(0).random((37, 53, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    for run in D.translator_runs().values():
        out = images.load_image(D.translate_bytes(buf.getvalue(), run, "day", "night", 1.0))
        assert out.size == (53, 37)
        same = images.load_image(D.translate_bytes(buf.getvalue(), run, "day", "night", 0.0))
        assert np.abs(np.asarray(same, dtype=int) - np.asarray(img, dtype=int)).max() <= 1


# ----------------------------------------------------------------------------- hostile uploads
def _enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(h: int = 48, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), 255 - x * 255 // (w - 1)], -1).astype(np.uint8)


def _png_claiming(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _cut(fmt: str) -> bytes:
    data = _enc(Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)), fmt)
    return data[: len(data) // 2]  # cut in the middle of the pixel data


#: kind -> (file name, bytes, (element the page must show: error / warning / info, words it must contain))
HOSTILE = {
    "text": ("notes.png", b"these are my notes, not a picture\n" * 20, ("error", "not an image")),
    "empty": ("empty.png", b"", ("error", "empty")),
    "truncated PNG": ("cut.png", _cut("PNG"), ("error", "truncated")),
    "truncated JPEG": ("cut.jpg", _cut("JPEG"), ("error", "truncated")),
    "decompression bomb (PIL's limit)": ("bomb.png", _png_claiming(100_000, 100_000), ("error", "too large")),
    "decompression bomb (our limit)": ("bomb2.png", _png_claiming(8000, 8000),
                                       ("error", "8000 x 8000 pixels = 64.0 megapixels, over the limit")),
    "PNG named .jpg": ("photo.jpg", _enc(Image.fromarray(_photo()), "PNG"), ("warning", "holds a PNG image")),
    "16-bit PNG": ("deep.png", _enc(Image.fromarray((_photo()[..., 0].astype(np.uint16) * 257)), "PNG"),
                   ("warning", "16-bit")),
    "float TIFF": ("float.tif", _enc(Image.fromarray(_photo()[..., 1].astype(np.float32) / 255, "F"), "TIFF"),
                   ("warning", "floating-point")),
    "palette PNG with transparency": ("pal.png", _enc(Image.fromarray(_photo()).convert(
        "P", palette=Image.ADAPTIVE, colors=8), "PNG", transparency=0), ("info", "Transparency")),
    "animated GIF": ("anim.gif", _animated_gif(), ("warning", "3 frames")),
    "EXIF-rotated JPEG": ("portrait.jpg", _enc(Image.fromarray(_photo()), "JPEG", exif=_exif(6)),
                          ("info", "orientation tag (6: rotated 90° clockwise)")),
    "huge dimensions": ("wide.png", _enc(Image.new("RGB", (9000, 30), (40, 80, 120)), "PNG"),
                        ("warning", "downscaled to 8,192 x 27")),
    "CMYK JPEG": ("print.jpg", _enc(Image.fromarray(_photo()).convert("CMYK"), "JPEG"), ("info", "CMYK")),
    "greyscale + alpha": ("la.png", _enc(Image.fromarray(_photo()).convert("LA"), "PNG"), ("info", "Greyscale")),
}


def _good_upload(page):
    _uploader(page, "dn_upload").set_value(("good.png", _enc(Image.fromarray(_photo(30, 40)), "PNG"),
                                            "image/png")).run()
    assert not page.exception and not page.error and not page.warning
    assert [i.proto.imgs[0].caption for i in page.get("image")][:2] == ["input (day)", "output (night, strength 1.00)"]


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_upload_is_refused_or_explained_and_the_session_keeps_working(page, kind):
    name, data, (element, words) = HOSTILE[kind]
    page.selectbox(key="dn_translator").set_value(page.selectbox(key="dn_translator").options[0])
    page.radio(key="dn_direction").set_value("day → night")
    page.slider(key="dn_strength").set_value(1.0)
    page.radio(key="dn_source").set_value("upload").run()
    _uploader(page, "dn_upload").set_value((name, data, "image/png")).run()
    assert not page.exception, [e.value for e in page.exception]
    shown = {"error": [e.value for e in page.error], "warning": [w.value for w in page.warning],
             "info": [i.value for i in page.info]}
    assert any(words in text for text in shown[element]), (kind, shown)
    bars = [json.loads(c.proto.spec) for c in page.get("plotly_chart")]
    assert bars and {t["name"] for t in bars[0]["data"]} == {"day", "night"}  # the rest of the page still works
    if element == "error":
        assert name in shown["error"][0]  # names the file
        assert not page.get("image") and not page.get("download_button")
    else:
        assert not shown["error"], shown
        assert len(page.get("image")) >= 2 and page.get("download_button")
    _good_upload(page)  # a second, good upload translates fine
    page.radio(key="dn_source").set_value("bundled photo").run()


def test_hostile_own_context_photo_is_named_and_the_rest_works(page):
    good = _enc(Image.fromarray(_photo()), "PNG")
    _uploader(page, "dn_own_day").set_value([("d1.png", good, "image/png"),
                                             ("broken.jpg", b"\xff\xd8\xff", "image/jpeg")])
    _uploader(page, "dn_own_night").set_value([("n1.png", good, "image/png")]).run()
    assert not page.exception
    assert any("broken.jpg" in e.value and "day photo 2" in e.value for e in page.error), [e.value for e in page.error]
    assert len(page.get("plotly_chart")) == 1  # the translator's bars, not yours
    _uploader(page, "dn_own_day").set_value([("d1.png", good, "image/png")]).run()
    assert not page.error and len(page.get("plotly_chart")) == 2
    _uploader(page, "dn_own_day").set_value([])
    _uploader(page, "dn_own_night").set_value([]).run()


def test_exif_rotated_upload_is_translated_upright():
    """The statistics translator at strength 0 returns the input's pixels: an EXIF orientation 6 PNG comes back
    turned 90° clockwise (pixels constructed here, not by PIL), its preview too."""
    from cbnorm.app import daynight as D

    a = _photo(30, 50)  # stored 50 wide, 30 high
    data = _enc(Image.fromarray(a), "PNG", exif=_exif(6))
    check = D.check_upload(data, "p.png")
    assert check["size"] == (30, 50) and any("orientation" in n for n in check["notes"])
    out = np.asarray(images.load_image(D.translate_bytes(data, "stats", "day", "night", 0.0)))
    assert np.array_equal(out, a[::-1].transpose(1, 0, 2))  # row 0 = the stored image's left column, bottom-up
    assert images.load_image(D.preview(data)).size == (30, 50)


def test_oversized_upload_is_downscaled_and_says_so():
    from cbnorm.app import daynight as D

    img = Image.new("RGB", (9000, 30), (40, 80, 120))
    small, note = D.fit_page(img)
    assert small.size == (8192, 27) and "downscaled to 8,192 x 27" in note
    same, none = D.fit_page(Image.new("RGB", (100, 50)))
    assert same.size == (100, 50) and none is None
    small, note = D.fit_page(Image.new("I;16", (400, 300), 1000), max_pixels=12_000)  # 16-bit: 8-bit RGB copy
    assert small.mode == "RGB" and small.size[0] * small.size[1] <= 12_000
    assert abs(small.size[0] / small.size[1] - 4 / 3) < 0.05
    thin, _ = D.fit_page(Image.new("RGB", (20_000, 1)))
    assert thin.size == (8192, 1)
    out = images.load_image(D.translate_bytes(_enc(img, "PNG"), "stats", "day", "night", 1.0))
    assert out.size == (8192, 27)


def test_preview_is_small_upright_8bit():
    from cbnorm.app import daynight as D

    big = _enc(Image.fromarray(np.zeros((1200, 3000), np.uint16) + 5000), "PNG")
    prev = images.load_image(D.preview(big))
    assert prev.mode == "RGB" and prev.width <= D.PREVIEW_WIDTH and prev.width * prev.height <= D.PREVIEW_PIXELS
    assert abs(prev.width / prev.height - 2.5) < 0.02
    rgba = images.load_image(D.preview(_enc(Image.new("LA", (10, 10), (80, 100)), "PNG")))
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (80, 80, 80, 100)

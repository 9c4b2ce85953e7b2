"""AppTest of the day <-> night page on the committed translators (what is shown, not just "no exception")."""
import io
import json
import os
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
    from cbnorm import app_daynight as D

    img = Image.fromarray((np.random.default_rng(0).random((37, 53, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    for run in D.translator_runs().values():
        out = images.load_image(D.translate_bytes(buf.getvalue(), run, "day", "night", 1.0))
        assert out.size == (53, 37)
        same = images.load_image(D.translate_bytes(buf.getvalue(), run, "day", "night", 0.0))
        assert np.abs(np.asarray(same, dtype=int) - np.asarray(img, dtype=int)).max() <= 1

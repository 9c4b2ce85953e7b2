"""Day <-> night: normalize with one context's parameters, de-normalize with the other's (CN paper IV-E)."""
import streamlit as st

from cbnorm.app import daynight as D
from cbnorm.app import figures as F
from cbnorm.app import shared as S

st.title("Day ↔ night transfer")
st.caption("The \"American night\" experiment of the Context Normalization paper: an image is normalized with "
           "the day context's parameters and de-normalized with the night context's (or back). Input level: CN "
           "on the RGB channels; feature level: context norms inside an autoencoder. Strength 0 returns the "
           "input; 1 applies the full swap.")

with S.guard("Day ↔ night"):
    translators = D.translator_runs()
    label = st.selectbox("Translator", list(translators), key="dn_translator",
                         help="Learned runs come from checkpoints/daynight-*; the statistics translator uses "
                              "the per-channel mean/std of the training photos in each context.")
    c1, c2 = st.columns(2)
    direction = c1.radio("Direction", ["day → night", "night → day"], horizontal=True, key="dn_direction")
    strength = c2.slider("Strength", 0.0, 1.0, 1.0, 0.05, key="dn_strength",
                         help="Interpolates the context parameters: 0 = identity, 1 = full swap.")
    source, target = ("day", "night") if direction.startswith("day") else ("night", "day")
    src = st.radio("Image", ["bundled photo", "upload"], horizontal=True, key="dn_source")
    data, refused = None, False
    if src == "upload":
        up = st.file_uploader(f"An image (PNG, JPEG, GIF, BMP, TIFF, WebP; larger than "
                              f"{D.PAGE_MAX_PIXELS / 1e6:.0f} megapixels or {D.PAGE_MAX_SIDE:,} pixels per side: "
                              f"downscaled; over 50 megapixels: refused)", type=D.UPLOAD_TYPES, key="dn_upload")
        if up is not None:
            try:
                check = D.check_upload(up.getvalue(), up.name)
            except ValueError as err:  # what the image door refuses: say why, keep the rest of the page
                refused = True
                st.error(f"**{up.name}** cannot be translated: {err}", icon=":material/broken_image:")
            else:
                data = up.getvalue()
                st.caption(f"{up.name}: {check['description']}")
                for text in check["warnings"]:
                    st.warning(text, icon=":material/warning:")
                for text in check["notes"]:
                    st.info(text, icon=":material/info:")
    else:
        photo = st.selectbox("Photo (chelsea and china are held out from training)", D.BUNDLED,
                             index=D.BUNDLED.index("chelsea") if "chelsea" in D.BUNDLED else 0, key="dn_photo")
        data = D.bundled_png(photo, source)
    if data is None:
        if not refused:
            st.info("Upload an image to translate it.")
    else:
        with st.spinner("Translating…"):
            out = D.translate_bytes(data, translators[label], source, target, float(strength))
        left, right = st.columns(2)
        left.image(D.preview(data), caption=f"input ({source})", width="stretch")
        right.image(D.preview(out), caption=f"output ({target}, strength {strength:.2f})", width="stretch")
        st.download_button("Download the output (PNG)", out, file_name=f"{source}_to_{target}.png",
                           mime="image/png", key="dn_download")

    st.subheader("Context parameters")
    params = D.context_parameters(translators[label])
    layers = params["layers"]
    name = st.selectbox("Layer", [l["name"] for l in layers], key="dn_layer") if len(layers) > 1 else layers[0]["name"]
    st.plotly_chart(F.context_bars(next(l for l in layers if l["name"] == name)), key="dn_bars")

with S.guard("Fit your own contexts"):
    st.subheader("Fit your own contexts")
    st.caption(f"Upload a few day photos and a few night photos (unpaired; up to {D.OWN_MAX_FILES} each). Their "
               "per-channel statistics (CN eq. 23-24 over all pixels, each photo reduced to "
               f"{D.OWN_PIXELS / 1e6:.0f} megapixel) become the two contexts; nothing is written to disk.")
    a, b = st.columns(2)
    days = a.file_uploader("Day photos", accept_multiple_files=True, key="dn_own_day", type=D.UPLOAD_TYPES)
    nights = b.file_uploader("Night photos", accept_multiple_files=True, key="dn_own_night", type=D.UPLOAD_TYPES)
    if days and nights:
        day_bytes, night_bytes = [f.getvalue() for f in days], [f.getvalue() for f in nights]
        try:
            stats = D.fit_own_contexts(day_bytes, night_bytes, [f.name for f in days], [f.name for f in nights])
        except ValueError as err:  # a file the image door refuses (named), or too many files
            st.error(f"Your contexts cannot be fitted: {err}", icon=":material/broken_image:")
            stats = None
        if stats is not None:
            st.plotly_chart(F.context_bars(stats.parameters()["layers"][0]), key="dn_own_bars")
        if stats is not None and data is not None:
            own = D.translate_own(data, day_bytes, night_bytes, source, target, float(strength))
            st.image(D.preview(own), caption=f"the image above, {source} → {target} with your contexts",
                     width="stretch")

table = D.bench_table()
st.subheader("Measured on held-out photos")
if table is None:
    st.caption("Run `python bench/daynight.py` to measure the translators.")
else:
    m = table["machine"]
    st.caption(f"PSNR / SSIM against the rendered ground truth on {', '.join(table['holdout'])} "
               f"(bench/results/daynight.json; {m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores, "
               f"torch {m.get('torch', '?')}).")
    st.dataframe(table["rows"], hide_index=True, key="dn_table")

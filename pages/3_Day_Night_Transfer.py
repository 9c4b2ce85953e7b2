"""Day <-> night: normalize with one context's parameters, de-normalize with the other's (CN paper IV-E)."""
import streamlit as st

from cbnorm import app_daynight as D
from cbnorm import app_state as S

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
    if src == "upload":
        up = st.file_uploader("An image (PNG, JPEG, GIF, BMP, TIFF, WebP; up to 50 megapixels)",
                              type=["png", "jpg", "jpeg", "gif", "bmp", "tif", "tiff", "webp"], key="dn_upload")
        data = up.getvalue() if up is not None else None
    else:
        photo = st.selectbox("Photo (chelsea and china are held out from training)", D.BUNDLED,
                             index=D.BUNDLED.index("chelsea") if "chelsea" in D.BUNDLED else 0, key="dn_photo")
        data = D.bundled_png(photo, source)
    if data is None:
        st.info("Upload an image to translate it.")
    else:
        with st.spinner("Translating…"):
            out = D.translate_bytes(data, translators[label], source, target, float(strength))
        left, right = st.columns(2)
        left.image(data, caption=f"input ({source})", width="stretch")
        right.image(out, caption=f"output ({target}, strength {strength:.2f})", width="stretch")
        st.download_button("Download the output (PNG)", out, file_name=f"{source}_to_{target}.png",
                           mime="image/png", key="dn_download")

    st.subheader("Context parameters")
    params = D.context_parameters(translators[label])
    layers = params["layers"]
    name = st.selectbox("Layer", [l["name"] for l in layers], key="dn_layer") if len(layers) > 1 else layers[0]["name"]
    st.plotly_chart(D.context_bars(next(l for l in layers if l["name"] == name)), key="dn_bars")

with S.guard("Fit your own contexts"):
    st.subheader("Fit your own contexts")
    st.caption("Upload a few day photos and a few night photos (unpaired). Their per-channel statistics (CN eq. "
               "23-24 over all pixels) become the two contexts; nothing leaves this session's memory.")
    a, b = st.columns(2)
    days = a.file_uploader("Day photos", accept_multiple_files=True, key="dn_own_day",
                           type=["png", "jpg", "jpeg", "gif", "bmp", "tif", "tiff", "webp"])
    nights = b.file_uploader("Night photos", accept_multiple_files=True, key="dn_own_night",
                             type=["png", "jpg", "jpeg", "gif", "bmp", "tif", "tiff", "webp"])
    if days and nights:
        stats = D.fit_own_contexts([f.getvalue() for f in days], [f.getvalue() for f in nights])
        st.plotly_chart(D.context_bars(stats.parameters()["layers"][0]), key="dn_own_bars")
        if data is not None:
            own = D.translate_own(data, stats, source, target, float(strength))
            st.image(own, caption=f"the image above, {source} → {target} with your contexts",
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

"""The load benchmark's cases (bench/load.py is the harness): the files sessions upload (photos, awkward
images, hostile files) and one browser session's random actions on every page, with the checks of each."""
from __future__ import annotations

import asyncio
import io
import random
import statistics
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUSY_FLAG = "/tmp/cbnorm_load_running"
#: url path of each page (what the sidebar links point to)
PAGES = {"home": "", "histograms": "Activation_Histograms", "evolution": "Cluster_Evolution",
         "day_night": "Day_Night_Transfer", "compare": "Compare_Normalizers", "across": "Across_Runs_and_Training"}

STATE_JS = """() => {
  const app = document.querySelector("[data-testid='stApp']");
  const status = document.querySelector("[data-testid='stStatusWidget']");
  return {state: app ? app.getAttribute('data-test-script-state') : null,
          status: status ? (status.innerText || 'status') : null};
}"""
PROBLEMS_JS = """() => {
  const text = (e, n) => ((e.querySelector("[data-testid='stMarkdownContainer']") || e).innerText || "").slice(0, n);
  const all = sel => [...document.querySelectorAll(sel)];
  return {
    exceptions: all("[data-testid='stException']").map(e => (e.innerText || "").slice(0, 600)),
    errors: all("[data-testid='stAlertContentError']").map(e => text(e, 600)),
    images: all("[data-testid='stImage']").length,
    warnings: all("[data-testid='stAlertContentWarning'], [data-testid='stAlertContentInfo']").map(e => text(e, 300)),
  };
}"""


# ============================================================================ files to upload
def _encode(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_claiming(w: int, h: int) -> bytes:
    """A ~70-byte PNG whose header claims w x h pixels (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def upload_files(seed: int = 0) -> dict[str, list[dict]]:
    """{"good": [...], "accepted": [...], "refused": [...]}: files as Playwright wants them (name, mimeType,
    buffer). Good ones are small photos (scikit-image's bundled photos, downscaled; generated when absent);
    "accepted" are awkward but valid images the page must translate; "refused" ones it must refuse."""
    import numpy as np
    from PIL import Image

    photos = []
    try:
        from skimage import data as skdata

        for name in ("astronaut", "chelsea", "coffee", "rocket"):
            try:
                photos.append((name, Image.fromarray(getattr(skdata, name)()).convert("RGB")))
            except Exception:  # noqa: BLE001 - a photo that needs a download is skipped
                continue
    except ImportError:
        pass
    rng = np.random.default_rng(seed)
    if not photos:
        y, x = np.mgrid[0:120, 0:160]
        photos = [(f"generated{i}", Image.fromarray(np.stack([(x + 40 * i) % 256, y * 2, (x + y) % 256], -1)
                                                    .astype(np.uint8))) for i in range(3)]
    good = []
    for name, img in photos:
        img = img.copy()
        img.thumbnail((192, 192))
        good.append({"name": f"{name}.png", "mimeType": "image/png", "buffer": _encode(img, "PNG")})
        good.append({"name": f"{name}.jpg", "mimeType": "image/jpeg", "buffer": _encode(img, "JPEG", quality=85)})
    base = photos[0][1].copy()
    base.thumbnail((96, 96))
    noise = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (40, 30), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    grey16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    accepted = [
        {"name": "deep16.png", "mimeType": "image/png", "buffer": _encode(Image.fromarray(grey16), "PNG")},
        {"name": "animated.gif", "mimeType": "image/gif", "buffer": gif.getvalue()},
        {"name": "portrait.jpg", "mimeType": "image/jpeg", "buffer": _encode(base, "JPEG", exif=exif.tobytes())},
        {"name": "print.jpg", "mimeType": "image/jpeg", "buffer": _encode(base.convert("CMYK"), "JPEG")},
        {"name": "really_png.jpg", "mimeType": "image/jpeg", "buffer": _encode(base, "PNG")},
    ]
    refused = [
        {"name": "notes.png", "mimeType": "image/png", "buffer": b"these are my notes, not a picture\n" * 30},
        {"name": "empty.png", "mimeType": "image/png", "buffer": b""},
        {"name": "cut.png", "mimeType": "image/png", "buffer": _encode(noise, "PNG")[:4000]},
        {"name": "bomb.png", "mimeType": "image/png", "buffer": _png_claiming(100_000, 100_000)},
    ]
    return {"good": good, "accepted": accepted, "refused": refused}


# ============================================================================ one browser session
class ActionTimeout(Exception):
    pass


class Session:
    """One user: a browser context with one page, a random generator, and what it saw."""

    def __init__(self, idx: int, context, base_url: str, rng: random.Random, files: dict, report: Report,
                 action_timeout: float, think: tuple[float, float]):
        self.idx, self.context, self.base, self.rng, self.files = idx, context, base_url, rng, files
        self.report, self.action_timeout, self.think = report, action_timeout, think
        self.page = None
        self.where = "home"
        self.refused_upload: Optional[str] = None  # name of a refused file still in the uploader
        self.alive = True
        self.crashed = False
        self.actions = 0
        self.runs_finished = 0  # script runs the server finished for this page (websocket messages)
        self.last_problems: dict = {"exceptions": [], "errors": [], "images": 0, "warnings": []}

    async def open(self) -> None:
        self.page = await self.context.new_page()
        self.page.set_default_timeout(15_000)  # a widget that does not show up in 15 s: the interaction failed
        self.page.on("crash", lambda *_: self._crash())
        self.page.on("websocket", lambda ws: ws.on("framereceived", self._frame))

    def _frame(self, payload) -> None:
        """Count the script runs the server finishes for this page (its ForwardMsg "script_finished"), so
        that no rerun is missed however short it is. Large frames (deltas with figures) are not parsed."""
        if isinstance(payload, str) or len(payload) > 16_384:
            return
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        msg = ForwardMsg()
        try:
            msg.ParseFromString(payload)
        except Exception:  # noqa: BLE001 - not a ForwardMsg
            return
        if msg.WhichOneof("type") == "script_finished":
            self.runs_finished += 1

    def _crash(self) -> None:
        self.crashed = True
        self.alive = False
        self.report.error(self.idx, "(page)", "page crash", "the browser page crashed")

    # -------------------------------------------------------------- waiting
    async def state(self) -> dict:
        s = await self.page.evaluate(STATE_JS)
        s["runs"] = self.runs_finished
        return s

    async def wait_idle(self, t0: float, runs_before: Optional[int], expect_rerun: bool) -> float:
        """Seconds from ``t0`` until the app is idle after the action (see the module docstring)."""
        deadline = t0 + self.action_timeout
        grace = t0 + (15.0 if expect_rerun else 0.6)  # how long to wait for the action's rerun to start
        idle_since: Optional[float] = None
        while True:
            now = time.perf_counter()
            if self.crashed:
                raise ActionTimeout("page crashed")
            if now > deadline:
                s = await self.state()
                raise ActionTimeout(f"not idle after {self.action_timeout:.0f} s (script state {s['state']}, "
                                    f"status widget {s['status']!r})")
            s = await self.state()
            started = runs_before is None or s["runs"] > runs_before  # a run finished since the action
            idle = s["state"] == "notRunning" and not s["status"]
            if idle and (started or now > grace):
                if idle_since is None:
                    idle_since = now
                elif now - idle_since >= 0.25:
                    return idle_since - t0
            else:
                idle_since = None
            await asyncio.sleep(0.05)

    async def act(self, name: str, fn: Callable, expect_rerun: bool = True) -> Optional[float]:
        """Run ``fn`` (the interaction), wait until idle, check for problems; returns seconds or None."""
        if not self.alive:
            return None
        t0 = time.perf_counter()
        try:
            runs = (await self.state())["runs"]
            t0 = time.perf_counter()
            changed = await asyncio.wait_for(fn(), timeout=min(60.0, self.action_timeout))
            if changed is False:  # nothing to do here (e.g. a slider already at its end)
                return None
            seconds = await self.wait_idle(t0, runs, expect_rerun)
        except (ActionTimeout, asyncio.TimeoutError) as err:
            if self.crashed:  # recorded by the crash handler
                return None
            self.report.error(self.idx, name, "timeout", str(err) or "interaction timed out")
            await self.recover()
            return None
        except Exception as err:  # noqa: BLE001 - Playwright errors: the page is gone or the element vanished
            if self.crashed or (self.page is not None and self.page.is_closed()):
                self.alive = False
                return None
            self.report.note(self.idx, name, f"interaction failed: {type(err).__name__}: {str(err)[:200]}")
            return None
        self.actions += 1
        self.report.action(self.idx, name, seconds)
        await self.check(name)
        return seconds

    async def recover(self) -> None:
        """After a timeout: reload the current page so the session can go on."""
        try:
            runs = self.runs_finished
            await self.page.goto(f"{self.base}/{PAGES[self.where]}", wait_until="domcontentloaded", timeout=60_000)
            self.refused_upload = None
            await self.wait_idle(time.perf_counter(), runs, True)
        except Exception as err:  # noqa: BLE001
            self.alive = False
            self.report.error(self.idx, "(recover)", "session lost", f"{type(err).__name__}: {str(err)[:300]}")

    async def check(self, name: str) -> None:
        p = await self.page.evaluate(PROBLEMS_JS)
        for text in p["exceptions"]:
            self.report.error(self.idx, name, "exception", text)
        for text in p["errors"]:
            if self.refused_upload and self.refused_upload in text and "cannot be translated" in text:
                continue  # the refusal of a hostile upload, checked where it is made
            self.report.error(self.idx, name, "error box", text)
        self.last_problems = p

    # -------------------------------------------------------------- widgets
    def _key(self, key: str):
        return self.page.locator(f".st-key-{key}")

    async def has(self, key: str) -> bool:
        return await self._key(key).count() > 0

    async def choose(self, key: str) -> bool:
        """Pick another option of the selectbox with ``key``."""
        box = self._key(key).locator("input[role='combobox']")
        if await box.count() == 0:
            return False
        current = (await box.input_value()).strip()
        await box.click()
        options = self.page.locator("[role='listbox'] [role='option']")
        await options.first.wait_for(timeout=10_000)
        texts = [t.strip() for t in await options.all_inner_texts()]
        others = [i for i, t in enumerate(texts) if t != current]
        if not others:
            await self.page.keyboard.press("Escape")
            return False
        await options.nth(self.rng.choice(others)).click()
        return True

    async def slide(self, key: str, max_steps: int = 3) -> bool:
        """Move the slider (or select slider) with ``key`` by 1..max_steps steps, left or right (keyboard)."""
        thumb = self._key(key).locator("input[type='range']").first
        if await thumb.count() == 0:
            return False
        now, lo, hi = await thumb.evaluate("e => [Number(e.value), Number(e.min), Number(e.max)]")
        if hi <= lo:
            return False
        direction = self.rng.choice(["ArrowLeft", "ArrowRight"])
        if now <= lo:
            direction = "ArrowRight"
        elif now >= hi:
            direction = "ArrowLeft"
        await thumb.focus()
        for _ in range(self.rng.randint(1, max_steps)):
            await thumb.press(direction)
        return True

    async def radio(self, key: str, label: Optional[str] = None) -> bool:
        """Choose ``label`` (or another random option) of the radio with ``key``."""
        options = self._key(key).locator("[data-testid='stRadioOption']")
        n = await options.count()
        if n == 0:
            return False
        texts = [t.strip() for t in await options.all_inner_texts()]
        chosen = [await options.nth(i).get_attribute("data-selected") == "true" for i in range(n)]
        if label is not None:
            if label not in texts or chosen[texts.index(label)]:
                return False
            await options.nth(texts.index(label)).click()
            return True
        others = [i for i in range(n) if not chosen[i]]
        if not others:
            return False
        await options.nth(self.rng.choice(others)).click()
        return True

    async def button(self, label: str) -> bool:
        b = self.page.get_by_role("button", name=label)
        if await b.count() == 0:
            return False
        await b.first.click()
        return True

    async def upload(self, file: dict) -> bool:
        inp = self._key("dn_upload").locator("input[type='file']")
        if await inp.count() == 0:
            return False
        await inp.set_input_files(files=[file])
        return True

    # -------------------------------------------------------------- actions
    async def goto_page(self, target: str) -> bool:
        link = self.page.locator(f"[data-testid='stSidebarNavLink'][href$='/{PAGES[target]}']")
        if await link.count() == 0:
            return False
        await link.first.click()
        self.where = target
        self.refused_upload = None
        return True

    async def visit(self, target: str, label: Optional[str] = None) -> None:
        await self.act(label or f"switch page to {target}", lambda: self.goto_page(target))

    async def seed(self) -> bool:
        box = self._key("w_seed").locator("input")
        if await box.count() == 0:
            return False
        value = str(self.rng.randint(0, 3))
        if (await box.input_value()).strip() == value:
            return False
        await box.fill(value)
        await box.press("Enter")
        return True

    async def upload_action(self, kind: str) -> None:
        """Upload a file of ``kind`` (good / accepted / refused) on the day-night page and check the outcome."""
        if await self.has("dn_source") and not await self.has("dn_upload"):
            await self.act("day-night: image source", lambda: self.radio("dn_source", "upload"))
        file = self.rng.choice(self.files[kind])
        action = {"good": "day-night: upload a photo", "accepted": "day-night: upload an awkward image",
                  "refused": "day-night: upload a hostile file"}[kind]
        self.refused_upload = file["name"] if kind == "refused" else None
        seconds = await self.act(action, lambda: self.upload(file))
        if seconds is None or not self.alive:
            return
        p = self.last_problems
        if kind == "refused":
            said = [t for t in p["errors"] if file["name"] in t]
            if said:
                self.report.expected(self.idx, file["name"], said[0], True)
            else:
                self.report.error(self.idx, action, "hostile file not refused",
                                  f"{file['name']}: no error box naming it (images shown: {p['images']})")
        elif p["images"] < 2:
            self.report.error(self.idx, action, "upload not translated",
                              f"{file['name']}: {p['images']} images shown; errors {p['errors']}")
        elif kind == "accepted":
            self.report.expected(self.idx, file["name"], " | ".join(p["warnings"])[:600] or "(no note)", False)

    def menu(self) -> list[tuple[float, str, Callable]]:
        """(weight, action name, coroutine function) of what a user can do on the current page."""
        r = self.rng
        others = [p for p in PAGES if p != self.where]
        m: list[tuple[float, str, Callable]] = [
            (3.0, "switch page", lambda: self.visit(r.choice(others))),
            (0.6, "sidebar: run", lambda: self.act("sidebar: run", lambda: self.choose("w_run"))),
            (0.6, "sidebar: layer", lambda: self.act("sidebar: layer", lambda: self.choose("w_layer"))),
            (0.4, "sidebar: seed", lambda: self.act("sidebar: seed", self.seed)),
        ]
        page = {
            "histograms": [
                (1.5, "histograms: Resample", lambda: self.act("histograms: Resample",
                                                               lambda: self.button("Resample"))),
                (1.0, "histograms: minibatch size", lambda: self.act("histograms: minibatch size",
                                                                     lambda: self.slide("hist_size", 2))),
                (1.0, "histograms: K", lambda: self.act("histograms: K", lambda: self.slide("hist_k", 2))),
                (1.0, "histograms: channels", lambda: self.act("histograms: channels",
                                                               lambda: self.slide("hist_count", 4))),
            ],
            "evolution": [
                (2.0, "evolution: snapshot slider", lambda: self.act("evolution: snapshot slider",
                                                                     lambda: self.slide("evo_step", 3))),
                (1.0, "evolution: colour", lambda: self.act("evolution: colour", lambda: self.radio("evo_colour"))),
                (1.0, "evolution: run projection", self.projection),
            ],
            "day_night": [
                (1.0, "day-night: translator", lambda: self.act("day-night: translator",
                                                                lambda: self.choose("dn_translator"))),
                (1.0, "day-night: direction", lambda: self.act("day-night: direction",
                                                               lambda: self.radio("dn_direction"))),
                (1.5, "day-night: strength", lambda: self.act("day-night: strength",
                                                              lambda: self.slide("dn_strength", 4))),
                (0.7, "day-night: bundled photo", self.bundled_photo),
                (1.5, "day-night: upload a photo", lambda: self.upload_action("good")),
                (0.6, "day-night: upload an awkward image", lambda: self.upload_action("accepted")),
                (0.6, "day-night: upload a hostile file", lambda: self.upload_action("refused")),
            ],
            "compare": [
                (1.0, "compare: x axis", lambda: self.act("compare: x axis", lambda: self.radio("cmp_x"))),
                (1.0, "compare: live minibatch", lambda: self.act("compare: live minibatch",
                                                                  lambda: self.slide("cmp_size", 1))),
                (1.0, "compare: smoothing", lambda: self.act("compare: smoothing",
                                                             lambda: self.slide("cmp_smooth", 5))),
            ],
            "across": [
                (1.5, "across: view", lambda: self.act("across: view", lambda: self.radio("tr_view"))),
                (2.0, "across: a control of the view", self.across_control),
            ],
        }.get(self.where, [])
        return m + page

    async def across_control(self) -> None:
        """On page 6, move one of the shown view's controls (step window, range, bins, colour, k, ...)."""
        controls = [("tr_d_range", "slide"), ("tr_d_tail", "slide"), ("tr_d_bins", "slide"), ("tr_d_which", "radio"),
                    ("tr_x_tail", "slide"), ("tr_x_bins", "slide"), ("tr_x_which", "radio"), ("tr_g_colour", "radio"),
                    ("tr_q_k", "slide"), ("tr_q_which", "radio")]
        shown = [(k, how) for k, how in controls if await self.has(k)]
        if not shown:
            return
        key, how = self.rng.choice(shown)
        fn = (lambda: self.slide(key, 2)) if how == "slide" else (lambda: self.radio(key))
        await self.act(f"across: {key}", fn)

    async def projection(self) -> None:
        """Set the projection (PCA mostly, t-SNE sometimes; 500 or 1,000 images) and press Run projection."""
        method = "t-SNE" if self.rng.random() < 0.15 else "PCA"
        if await self.has("evo_method"):
            await self.radio("evo_method", method)  # inside the form: no rerun until submitted
        await self.act(f"evolution: run projection ({method})", lambda: self.button("Run projection"))

    async def bundled_photo(self) -> None:
        if not await self.has("dn_photo"):
            await self.act("day-night: image source", lambda: self.radio("dn_source", "bundled photo"))
        await self.act("day-night: bundled photo", lambda: self.choose("dn_photo"))

    async def warm_up(self, every_page: bool = True) -> None:
        """Open the app and visit every page once (the first visit's time is recorded per page)."""
        t0 = time.perf_counter()
        runs = self.runs_finished
        await self.page.goto(self.base + "/", wait_until="domcontentloaded", timeout=120_000)
        seconds = await self.wait_idle(t0, runs, True)  # until the first script run has finished
        self.report.action(self.idx, "warm-up: open the app (home)", seconds)
        await self.check("warm-up: open the app (home)")
        for target in ("histograms", "evolution", "day_night", "compare", "across", "home") if every_page else ():
            await self.visit(target, f"warm-up: first visit of {target}")

    async def run(self, deadline: float) -> None:
        while self.alive and time.perf_counter() < deadline:
            menu = self.menu()
            _, _, fn = self.rng.choices(menu, weights=[w for w, _, _ in menu])[0]
            await fn()
            await asyncio.sleep(self.rng.uniform(*self.think))


# ============================================================================ the record
class Report:
    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self.t0 = time.perf_counter()
        self.times: dict[str, list[float]] = {}
        self.errors: list[dict] = []
        self.error_count = 0
        self.notes: list[dict] = []
        self.expected_messages: dict[str, dict] = {}
        self.memory: list[dict] = []

    def now(self) -> float:
        return round(time.perf_counter() - self.t0, 2)

    def action(self, session: int, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)
        if self.verbose:
            print(f"[{self.now():7.1f}s] session {session}: {name} {seconds:.2f} s", flush=True)

    def error(self, session: int, action: str, kind: str, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < 300:  # all are counted; the first 300 are kept with their text
            self.errors.append({"t_s": self.now(), "session": session, "action": action, "kind": kind,
                                "text": text[:1000]})
        print(f"[{self.now():7.1f}s] ERROR session {session} {action}: {kind}: {text[:300]}", flush=True)

    def note(self, session: int, action: str, text: str) -> None:
        self.notes.append({"t_s": self.now(), "session": session, "action": action, "text": text[:500]})
        if self.verbose:
            print(f"[{self.now():7.1f}s] note session {session}: {action}: {text[:300]}", flush=True)

    def expected(self, session: int, file: str, text: str, refused: bool) -> None:
        e = self.expected_messages.setdefault(file, {"file": file, "refused": refused, "count": 0,
                                                     "message": text[:600]})
        e["count"] += 1

    def table(self) -> list[dict]:
        def pct(v: list[float], q: float) -> float:
            s = sorted(v)
            return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]
        rows = []
        for name, v in sorted(self.times.items()):
            rows.append({"action": name, "count": len(v), "median_s": round(statistics.median(v), 3),
                         "p95_s": round(pct(v, 0.95), 3), "worst_s": round(max(v), 3),
                         "mean_s": round(statistics.fmean(v), 3)})
        return rows

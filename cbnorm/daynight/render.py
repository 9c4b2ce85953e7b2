"""Day-for-night: a documented night renderer and the paired day/night set of real photos built with it.

The "American night" experiment (context-normalization.txt, section IV-E) needs day and night images of
the same scenes. VERI-Wild is not available offline, so the night context is *rendered* from real photos
with a model of what the eye (and a camera) sees at night, after

* Haro, Bertalmio, Caselles, "Visual acuity in day for night", IJCV 2006 (cited by the paper for the
  American night: day-for-night should lower acuity as well as light and colour), and
* Thompson, Shirley, Ferwerda, "A spatial post-processing algorithm for images of night scenes",
  Journal of Graphics Tools 2002 (scotopic luminance, blue shift, loss of saturation and acuity, noise).

``render_night(day, params)`` on a uint8 sRGB photo (H, W, 3), in this order:

1. **Linear light.** sRGB decoding (IEC 61966-2-1), then CIE XYZ (D65) with the sRGB matrix.
2. **Scotopic luminance** (rod vision), Thompson et al. eq. from Larson et al.:
   ``V = Y (1.33 (1 + (Y + Z) / X) - 1.68)``, divided by its value for the white point (2.573) so that a
   white surface keeps V = Y. Blues gain and reds lose brightness (the Purkinje shift).
3. **Blue shift.** The rod image has no hue of its own; night pictures show it bluish. The scotopic image is
   V times the colour of chromaticity ``(x, y) = lerp(D65 white (0.3127, 0.3290), (0.25, 0.25),
   blue_shift)`` (the night "blue" of Jensen et al. 2000, used by Thompson et al.).
4. **Loss of acuity.** Rod vision is blurry: the scotopic image is blurred with a Gaussian of standard
   deviation ``blur_sigma`` pixels (Haro et al. and Thompson et al. blur in proportion to the rod share;
   our blend weight below plays that part).
5. **Light level / mesopic blend and loss of saturation.** The cone (photopic) image is desaturated toward
   its own luminance Y by ``saturation`` (1 = unchanged, 0 = grey), and blended with the rod image:
   ``(1 - scotopic) * photopic + scotopic * blurred_scotopic``. ``scotopic`` in [0, 1] is the light-level
   parameter: 0 = daylight (cones only), 1 = starlight (rods only); moonlight is in between.
6. **Darkening.** Linear light times ``2 ** -exposure_stops``.
7. **Sensor noise** in linear light, from a seeded generator: Gaussian with variance
   ``noise_shot * signal + noise_read ** 2`` (shot noise grows with the signal, read noise does not).
8. **Display.** sRGB encoding, then an extra tone curve ``v ** gamma`` (gamma > 1 crushes the shadows, as
   night footage is graded), rounding to uint8.

Every parameter lives in :class:`NightParams`, which a day/night run stores in ``config.json`` under
``"renderer"``; the same parameters and seed give the same night image, bit for bit.

The paired set
--------------
Day = the photo; night = ``render_night(photo)`` of the whole photo (so the blur and noise have the photo's
scale), with the seed ``params.seed + index of the photo in PHOTOS``. Photos (natural colour scenes shipped
with the libraries, no download):

* training (crops are drawn from these): ``astronaut``, ``coffee``, ``rocket``, ``motorcycle`` (left image of
  ``skimage.data.stereo_motorcycle``), ``flower`` (``sklearn.datasets.load_sample_image("flower.jpg")``);
* held out (whole photos, only for evaluation, never cropped for training): ``chelsea`` (a cat indoors) and
  ``china`` (``load_sample_image("china.jpg")``, a temple under a sky).

A training step samples random crop locations (photo, top, left) uniformly over the training photos and
takes the day and night crops at the same place: same location in both contexts = a positive pair of the
siamese network, different location = a negative pair; the autoencoder learns day->night and night->day on
such aligned crops.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = ["NightParams", "render_night", "scotopic_luminance", "srgb_to_linear", "linear_to_srgb",
           "rgb_to_xyz", "xyz_to_rgb", "PHOTOS", "TRAIN_PHOTOS", "HOLDOUT_PHOTOS", "CONTEXTS", "load_photo",
           "DayNightPairs", "photo_seed"]

#: the two contexts, in id order: 0 = day, 1 = night
CONTEXTS = ("day", "night")

# sRGB (D65) <-> XYZ, IEC 61966-2-1
_RGB2XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                     [0.2126729, 0.7151522, 0.0721750],
                     [0.0193339, 0.1191920, 0.9503041]])
_XYZ2RGB = np.linalg.inv(_RGB2XYZ)
_WHITE_XY = (0.3127, 0.3290)
_NIGHT_XY = (0.25, 0.25)


def srgb_to_linear(v: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear light."""
    v = np.asarray(v, dtype=np.float64)
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(v: np.ndarray) -> np.ndarray:
    """Linear light (clipped to [0, 1]) -> sRGB-encoded values in [0, 1]."""
    v = np.clip(np.asarray(v, dtype=np.float64), 0.0, 1.0)
    return np.where(v <= 0.0031308, 12.92 * v, 1.055 * np.power(v, 1 / 2.4) - 0.055)


def rgb_to_xyz(rgb_lin: np.ndarray) -> np.ndarray:
    return rgb_lin @ _RGB2XYZ.T


def xyz_to_rgb(xyz: np.ndarray) -> np.ndarray:
    return xyz @ _XYZ2RGB.T


def scotopic_luminance(xyz: np.ndarray) -> np.ndarray:
    """Relative scotopic luminance V (Thompson et al. 2002) of XYZ (..., 3): ``Y (1.33 (1 + (Y+Z)/X) - 1.68)``
    divided by its value at the D65 white, so that white keeps V = Y; clipped at 0."""
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    v = y * (1.33 * (1.0 + (y + z) / np.maximum(x, 1e-6)) - 1.68)
    wx, wy = _WHITE_XY
    white = (1.33 * (1.0 + (1.0 + (1 - wx - wy) / wy) / (wx / wy)) - 1.68)
    return np.clip(v / white, 0.0, None)


def _chromaticity_rgb(x: float, y: float) -> np.ndarray:
    """Linear RGB of luminance Y = 1 at chromaticity (x, y)."""
    return xyz_to_rgb(np.array([x / y, 1.0, (1.0 - x - y) / y]))


@dataclass(frozen=True)
class NightParams:
    """Parameters of :func:`render_night` (see the module docstring for each step)."""

    scotopic: float = 0.6          # light level: weight of the rod image, 0 = daylight vision, 1 = starlight
    blue_shift: float = 0.7        # 0 = grey rod image, 1 = full night blue (x, y) = (0.25, 0.25)
    saturation: float = 0.5        # saturation kept by the cone image (1 = all, 0 = grey)
    exposure_stops: float = 2.0    # darkening: linear light times 2 ** -stops
    gamma: float = 1.25            # extra tone curve on the encoded image (> 1 deepens the shadows)
    blur_sigma: float = 1.2        # loss of acuity: Gaussian blur of the rod image, in pixels
    noise_shot: float = 2e-4       # shot-noise variance per unit of linear signal
    noise_read: float = 2e-3       # read-noise standard deviation (linear light)
    seed: int = 0                  # seed of the noise generator

    def __post_init__(self) -> None:
        for name in ("scotopic", "blue_shift", "saturation"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"NightParams.{name} must be a number in [0, 1], got {v!r}")
        for name in ("exposure_stops", "blur_sigma", "noise_shot", "noise_read"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 <= v <= 20):
                raise ValueError(f"NightParams.{name} must be a number in [0, 20], got {v!r}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not 0.2 <= self.gamma <= 5:
            raise ValueError(f"NightParams.gamma must be a number in [0.2, 5], got {self.gamma!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"NightParams.seed must be a non-negative int, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "NightParams":
        """From a config's ``"renderer"`` object; ``ValueError`` for unknown keys or bad values."""
        if not isinstance(d, Mapping):
            raise ValueError(f"renderer parameters must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown renderer parameters {unknown}; known: {sorted(known)}")
        return cls(**dict(d))


def render_night(day: np.ndarray, params: Optional[NightParams] = None, seed: Optional[int] = None
                 ) -> np.ndarray:
    """Day-for-night of a uint8 sRGB image (H, W, 3) -> uint8 (H, W, 3). ``seed`` overrides ``params.seed``."""
    from scipy.ndimage import gaussian_filter

    p = params or NightParams()
    day = np.asarray(day)
    if day.ndim != 3 or day.shape[2] != 3 or day.dtype != np.uint8:
        raise ValueError(f"day must be a uint8 RGB array (H, W, 3), got {day.dtype} {day.shape}")
    rgb = srgb_to_linear(day / 255.0)
    xyz = rgb_to_xyz(rgb)
    lum = xyz[..., 1:2]
    # rod image: scotopic luminance in the (blue-shifted) night colour
    wx, wy = _WHITE_XY
    nx, ny = _NIGHT_XY
    cx, cy = wx + p.blue_shift * (nx - wx), wy + p.blue_shift * (ny - wy)
    rod = scotopic_luminance(xyz)[..., None] * _chromaticity_rgb(cx, cy)
    if p.blur_sigma > 0:
        rod = gaussian_filter(rod, sigma=(p.blur_sigma, p.blur_sigma, 0), mode="reflect")
    # cone image, desaturated toward its luminance
    cone = lum + p.saturation * (rgb - lum)
    lin = (1.0 - p.scotopic) * cone + p.scotopic * rod
    lin = np.clip(lin, 0.0, None) * 2.0 ** (-p.exposure_stops)
    if p.noise_shot > 0 or p.noise_read > 0:
        rng = np.random.default_rng(p.seed if seed is None else seed)
        std = np.sqrt(p.noise_shot * lin + p.noise_read ** 2)
        lin = lin + std * rng.standard_normal(lin.shape)
    enc = linear_to_srgb(lin) ** p.gamma
    return np.clip(np.rint(enc * 255.0), 0, 255).astype(np.uint8)


# ============================================================================ photos
def _skimage(name: str):
    def load() -> np.ndarray:
        import skimage.data

        img = getattr(skimage.data, name)()
        return img[0] if isinstance(img, tuple) else img
    return load


def _sklearn(name: str):
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)
    return load


#: name -> loader of a uint8 RGB photo (all shipped with scikit-image / scikit-learn; no download)
PHOTOS = {
    "astronaut": _skimage("astronaut"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "motorcycle": _skimage("stereo_motorcycle"),
    "flower": _sklearn("flower.jpg"),
    "chelsea": _skimage("chelsea"),
    "china": _sklearn("china.jpg"),
}
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "motorcycle", "flower")
HOLDOUT_PHOTOS = ("chelsea", "china")


@lru_cache(maxsize=None)
def _load_photo_cached(name: str) -> np.ndarray:
    img = np.ascontiguousarray(np.asarray(PHOTOS[name]()), dtype=np.uint8)
    img.setflags(write=False)
    return img


def load_photo(name: str) -> np.ndarray:
    """uint8 RGB (H, W, 3) of one of :data:`PHOTOS` (read-only, cached)."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; choose one of {sorted(PHOTOS)}")
    return _load_photo_cached(name)


def photo_seed(params: NightParams, name: str) -> int:
    """Noise seed of the night rendering of photo ``name``: ``params.seed`` + its index in :data:`PHOTOS`."""
    return int(params.seed) + list(PHOTOS).index(name)


class DayNightPairs:
    """Day photos and their night renderings, and aligned random crops of them.

    ``day[i]``, ``night[i]``: uint8 (H_i, W_i, 3) of ``names[i]``. ``sample(n, crop, rng)`` draws ``n`` crop
    locations uniformly (a photo with probability proportional to its number of possible crops, then a
    position) and returns ``(day_crops, night_crops, locations)``: uint8 (n, crop, crop, 3) twice and int
    (n, 3) rows of (photo index, top, left).
    """

    def __init__(self, names: Sequence[str] = TRAIN_PHOTOS, params: Optional[NightParams] = None) -> None:
        self.params = params or NightParams()
        self.names = tuple(names)
        if not self.names:
            raise ValueError("DayNightPairs needs at least one photo")
        self.day = [load_photo(n) for n in self.names]
        self.night = [render_night(d, self.params, seed=photo_seed(self.params, n))
                      for n, d in zip(self.names, self.day)]

    def __len__(self) -> int:
        return len(self.names)

    def locations(self, n: int, crop: int, rng: np.random.Generator) -> np.ndarray:
        if crop < 1 or any(crop > min(d.shape[:2]) for d in self.day):
            raise ValueError(f"crop={crop} must be >= 1 and fit in every photo ({[d.shape[:2] for d in self.day]})")
        sizes = np.array([(d.shape[0] - crop + 1) * (d.shape[1] - crop + 1) for d in self.day], np.float64)
        photo = rng.choice(len(self.day), size=n, p=sizes / sizes.sum())
        top = np.array([rng.integers(0, self.day[i].shape[0] - crop + 1) for i in photo])
        left = np.array([rng.integers(0, self.day[i].shape[1] - crop + 1) for i in photo])
        return np.stack([photo, top, left], axis=1).astype(np.int64)

    def crops(self, locations: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
        day = np.stack([self.day[i][t:t + crop, l:l + crop] for i, t, l in locations])
        night = np.stack([self.night[i][t:t + crop, l:l + crop] for i, t, l in locations])
        return day, night

    def sample(self, n: int, crop: int, rng: np.random.Generator):
        loc = self.locations(n, crop, rng)
        day, night = self.crops(loc, crop)
        return day, night, loc

    def pixels(self, context: str) -> np.ndarray:
        """All pixels of one context as uint8 (M, 3)."""
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
        imgs = self.day if context == "day" else self.night
        return np.concatenate([im.reshape(-1, 3) for im in imgs])

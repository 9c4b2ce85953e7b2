"""Day <-> night (context-normalization.txt IV-E), in one package:

* ``render``: the night renderer and the paired day/night set of real photos (its names are re-exported here:
  ``from cbnorm.daynight import NightParams, DayNightPairs, PHOTOS``);
* ``transfer``: the translators (swapping a trained context layer's parameters, fitted context statistics)
  and the Reinhard / histogram-matching baselines;
* ``scores``: what a day <-> night run is scored on (translation PSNR, pair verification), recomputed by
  ``python -m cbnorm.evaluate RUN --check``.

The trainer is ``cbnorm.train.daynight`` (``python -m cbnorm.train.daynight``).
"""
from __future__ import annotations

from .render import (CONTEXTS, HOLDOUT_PHOTOS, PHOTOS, TRAIN_PHOTOS, DayNightPairs, NightParams, linear_to_srgb,
                     load_photo, photo_seed, render_night, rgb_to_xyz, scotopic_luminance, srgb_to_linear, xyz_to_rgb)

__all__ = ["NightParams", "render_night", "scotopic_luminance", "srgb_to_linear", "linear_to_srgb", "rgb_to_xyz",
           "xyz_to_rgb", "PHOTOS", "TRAIN_PHOTOS", "HOLDOUT_PHOTOS", "CONTEXTS", "load_photo", "DayNightPairs",
           "photo_seed"]

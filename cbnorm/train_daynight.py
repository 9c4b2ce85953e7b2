"""Deprecated path: the day <-> night trainer moved to :mod:`cbnorm.train.daynight` (``python -m
cbnorm.train.daynight``); this module and ``python -m cbnorm.train_daynight`` go in the next version."""
from __future__ import annotations

import sys
import warnings

from .train.daynight import *  # noqa: F401,F403
from .train.daynight import __all__, main  # noqa: F401

warnings.warn("cbnorm.train_daynight moved to cbnorm.train.daynight; the old path will be removed in the next "
              "version", DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    sys.exit(main())

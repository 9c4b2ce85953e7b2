"""Deprecated path: the translators moved to :mod:`cbnorm.daynight.transfer` (this module goes in the next
version)."""
from __future__ import annotations

import warnings

from .daynight.transfer import *  # noqa: F401,F403
from .daynight.transfer import __all__  # noqa: F401

warnings.warn("cbnorm.transfer moved to cbnorm.daynight.transfer; the old path will be removed in the next version",
              DeprecationWarning, stacklevel=2)

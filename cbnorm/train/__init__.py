"""Training: ``python -m cbnorm.train`` (classifiers, cbnorm.train.classify), its learning-rate and snapshot
schedules (cbnorm.train.schedules) and sweeps over norms x seeds x settings (cbnorm.train.sweep)."""
from __future__ import annotations

from .classify import DEFAULTS, build_parser, main, train

__all__ = ["train", "main", "build_parser", "DEFAULTS"]

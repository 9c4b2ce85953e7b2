"""What the hostile-input cases share: the magnitude beyond which an input value may make its own sample's
output non-finite, and the error a broken contract raises (bench/hostile.py).
"""
from __future__ import annotations

#: beyond this magnitude an input value may make its own sample's output non-finite (squares overflow float32)
HUGE = 1e15


class ContractViolation(AssertionError):
    """A door broke its promise (wrong exception type, empty message, state changed, NaN leaked, ...)."""

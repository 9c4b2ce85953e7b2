"""What the training CLIs (classify, gan, daynight) parse alike."""
from __future__ import annotations

import json
from typing import Any, Mapping

__all__ = ["json_opt"]


def json_opt(value: Any, name: str) -> dict:
    """A JSON-object option (``--norm-kwargs '{"em_iters": 1}'``) as a dict: None or "" -> {}, a mapping as
    given; ``ValueError`` naming the option for anything that is not a JSON object."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    try:
        out = json.loads(value)
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"--{name.replace('_', '-')} must be a JSON object, got {value!r} ({err})") from None
    if not isinstance(out, dict):
        raise ValueError(f"--{name.replace('_', '-')} must be a JSON object, got {value!r}")
    return out

"""What the AppTest files share: reading Plotly figures back from Streamlit's AppTest and the no-error check."""
from __future__ import annotations

import base64
import json

import numpy as np


def arr(v) -> np.ndarray:
    """A Plotly JSON array: a list or {"dtype", "bdata"} (numpy arrays travel as typed binary arrays)."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
    return np.asarray(v)


def chart_keys(at) -> list[str]:
    return [c.proto.id.rsplit("-", 1)[-1] for c in at.get("plotly_chart")]


def chart(at, key: str) -> dict:
    """The Plotly figure of the chart with widget key ``key``."""
    for c in at.get("plotly_chart"):
        if c.proto.id.endswith(f"-{key}"):
            return json.loads(c.proto.spec)
    raise AssertionError(f"no chart {key!r} among {chart_keys(at)}")


def no_problem(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]

"""cbnorm.app.captions: every caption names the numbers it was composed from."""
from __future__ import annotations

import pytest

pytest.importorskip("streamlit")
from cbnorm.app import captions as W  # noqa: E402


def test_channels_and_bins_and_outside_values_are_named():
    bins = {"edges": list(range(41)), "lo": -2.5, "hi": 3.25, "below": [3, 0], "above": [1, 4]}
    panel = {"n_values": 12345, "subsampled": True, "source": "the layer's own mixture"}
    text = W.distributions_caption("layer1.0.bn1", "x_hat", (0, 5), panel, bins)
    assert "channels 0, 5" in text and "12,345 values per step" in text and "40 bins on [-2.5, 3.25]" in text
    assert "8 values outside the range" in text and "subsampled to" in text
    bins.update(below=[0, 0], above=[0, 0])
    assert "outside" not in W.distributions_caption("bn", "input", (), dict(panel, subsampled=False), bins)
    assert W.channels_text(()) == "all channels" and W.channels_text((3,)) == "channel 3"


def test_live_notes_and_duplicates_only_when_there_is_something_to_say():
    outs = [{"name": "a", "note": "the recorded probe batch", "subsampled": False},
            {"name": "b", "note": "live", "subsampled": True}]
    notes = W.live_notes(outs)
    assert len(notes) == 2 and notes[0].endswith(": a") and "per run" in notes[1]
    assert W.live_notes([{"name": "b", "note": "live", "subsampled": False}]) == []
    assert W.duplicates_note([{"label": "g", "duplicates": []}]) == ""
    assert W.duplicates_note([{"label": "g", "duplicates": ["run-s0-copy"]}]).endswith("run-s0-copy (g)")
    assert W.machine_note({}) == "Machine: not recorded in this file."
    assert W.machine_note({"cpu": "x", "torch": "2"}) == "Machine: cpu = x · torch = 2"

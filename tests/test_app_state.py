"""cbnorm.app.state: the widget state every page keeps across views and reruns (on a plain dict as the session)."""
from __future__ import annotations

import pytest

pytest.importorskip("streamlit")
from cbnorm.app import state  # noqa: E402


def test_memory_keeps_a_views_settings_while_its_widgets_are_not_drawn():
    ss = {"tr_d_k": 4, "tr_d_dl": "button", "tr_x_size": 512, "other": 1}
    m = state.Memory("kept", ("tr_d_", "tr_x_"), ss=ss)
    assert ss["kept"] == {"tr_d_k": 4, "tr_x_size": 512}  # settings only, not buttons or other pages' keys
    del ss["tr_d_k"]  # the view is not drawn in this run: Streamlit dropped its widget
    ss["tr_x_size"] = 1024
    m = state.Memory("kept", ("tr_d_", "tr_x_"), ss=ss)
    assert m.get("tr_d_k", 3) == 4 and m.get("tr_x_size", 256) == 1024 and m.get("tr_d_new", "d") == "d"
    assert m.index("tr_x_size", [256, 512, 1024], 256) == 2
    assert m.index("tr_d_k", [1, 2, 3], 3) == 2  # remembered 4 is no option any more: the default's index


def test_ensure_and_keep():
    ss = {"a": 5, "t": (1, 9), "m": [1, 2], "w_run": "mn"}
    state.ensure("a", [1, 2, 3], 2, ss=ss)
    state.ensure("t", [1, 2, 9], (1,), ss=ss)
    state.ensure("m", [1, 2], [1], many=True, ss=ss)
    state.ensure("missing", ["x"], "x", ss=ss)
    assert ss["a"] == 2 and ss["t"] == (1, 9) and ss["m"] == [1, 2] and ss["missing"] == "x"
    state.ensure("m", [2, 3], [3], many=True, ss=ss)
    assert ss["m"] == [3]
    state.keep("run", ss=ss)
    assert ss["run"] == "mn"


def test_prune_keeps_the_members_still_offered_and_seeds_a_default_once():
    ss = {}
    assert state.prune("runs", ["a", "b", "c"], ["a", "b"], ss=ss) == ["a", "b"]  # first time: the default
    ss["runs"] = ["b", "c", "gone"]
    assert state.prune("runs", ["a", "b", "c"], ["a"], ss=ss) == ["b", "c"]  # a lost member does not reset
    ss["runs"] = []
    assert state.prune("runs", ["a"], ["a"], ss=ss) == []  # an emptied choice stays empty (the page says so)

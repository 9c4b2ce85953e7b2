"""Widget state kept across views and reruns, the same way on every page.

Streamlit forgets a widget's value in a run where the widget is not drawn (another view of the page, another
page), and a widget whose options changed under it (another run, layer or step) raises or shows a stale value.
Three tools, all on ``st.session_state`` (or any dict given as ``ss``, for tests):

* :class:`Memory`: a page's remembered widget values (keys with the page's prefix), copied at the top of each
  run; ``memory.get(key, default)`` and ``memory.index(key, options, default)`` seed a widget drawn again;
* :func:`ensure`: put a widget's value back among its current options (one value, a tuple or a list);
* :func:`prune`: a multiselect's choice keeps the members still among its options (a default the first time);
* :func:`keep`: the ``on_change`` callback of a widget drawn under ``w_NAME`` whose value lives under ``NAME``
  (the selection that survives page switches: the sidebar's run and layer, a page's runs).
"""
from __future__ import annotations

from typing import Any, MutableMapping, Optional, Sequence

import streamlit as st

__all__ = ["Memory", "ensure", "keep", "prune"]

#: widget keys that are not settings (buttons, downloads, computed bookkeeping)
NOT_SETTINGS = ("_dl", "_draw", "_shown", "_submitted", "_available")


def _ss(ss: Optional[MutableMapping]) -> MutableMapping:
    return st.session_state if ss is None else ss


class Memory:
    """The remembered settings of one page: every session key that starts with one of ``prefixes`` (e.g.
    ``"tr_d_"`` for the distributions view of page 6), kept in ``ss[name]`` across runs where the widget is not
    drawn. Create it at the top of the page's script, before its widgets."""

    def __init__(self, name: str, prefixes: Sequence[str], ss: Optional[MutableMapping] = None) -> None:
        self.ss = _ss(ss)
        self.store: dict = self.ss.setdefault(name, {})
        self.store.update({k: v for k, v in self.ss.items() if isinstance(k, str) and k.startswith(tuple(prefixes))
                           and not k.endswith(NOT_SETTINGS)})

    def get(self, key: str, default: Any) -> Any:
        return self.store.get(key, default)

    def index(self, key: str, options: Sequence, default: Any) -> int:
        """The index of the remembered value among ``options`` (``default``'s when it is not one of them)."""
        v = self.get(key, default)
        return list(options).index(v) if v in options else list(options).index(default)


def ensure(key: str, options: Sequence, default: Any, many: bool = False,
           ss: Optional[MutableMapping] = None) -> None:
    """Reset widget ``key`` to ``default`` unless its value is among ``options`` (with ``many``: a list of
    options; a tuple value: every element)."""
    ss = _ss(ss)
    v = ss.get(key)
    if many:
        ok = isinstance(v, list) and all(x in options for x in v)
    elif isinstance(v, tuple):
        ok = all(x in options for x in v)
    else:
        ok = v in options
    if not ok:
        ss[key] = default


def prune(key: str, options: Sequence, default: Sequence, ss: Optional[MutableMapping] = None) -> list:
    """Keep the members of list widget ``key`` that are still among ``options`` (``default`` when it has no value
    yet); returns the list. Unlike ``ensure(..., many=True)`` a choice survives losing one of its members."""
    ss = _ss(ss)
    v = ss.get(key)
    ss[key] = list(default) if v is None else [x for x in v if x in options]
    return ss[key]


def keep(name: str, ss: Optional[MutableMapping] = None) -> None:
    """``on_change`` callback: copy widget ``w_NAME``'s value into the persistent key ``NAME``."""
    ss = _ss(ss)
    ss[name] = ss[f"w_{name}"]

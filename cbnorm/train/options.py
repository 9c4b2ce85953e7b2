"""What the training CLIs (classify, gan, daynight) parse alike."""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Mapping

__all__ = ["json_opt", "given_options"]


def given_options(given: Any, build_parser: Callable[[], argparse.ArgumentParser], defaults: Mapping[str, Any],
                  caller: str, what: str = "options") -> dict[str, Any]:
    """What a trainer was called with — an ``argparse.Namespace``, a mapping (the CLI's names, with ``-`` or
    ``_``) or a list of CLI arguments (parsed by ``build_parser()``) — as {dest name: value}. ``TypeError`` for
    anything else, ``ValueError`` naming the options ``defaults`` does not know."""
    if isinstance(given, argparse.Namespace):
        out = dict(vars(given))
    elif isinstance(given, Mapping):
        out = {str(k).replace("-", "_"): v for k, v in given.items()}
    elif isinstance(given, (list, tuple)):
        out = dict(vars(build_parser().parse_args([str(a) for a in given])))
    else:
        raise TypeError(f"{caller} takes an argparse.Namespace, a dict of options or a list of CLI arguments, "
                        f"got {type(given).__name__}")
    unknown = sorted(set(out) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; valid: {sorted(defaults)}")
    return out


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

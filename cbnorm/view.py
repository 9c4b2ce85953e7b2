"""``cbnorm-view LOGDIR`` (or ``python -m cbnorm.view LOGDIR``): start the app on any directory of runs.

Runs are found in nested folders (as ``tensorboard --logdir``); LOGDIR may also be one run. Options after
LOGDIR go to ``streamlit run`` (``--server.port 8502``, ``--server.headless true``, ...). The app itself
(``app.py`` and ``pages/``) ships with the source checkout this package was installed from.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from .runs import find_runs

__all__ = ["main", "app_path"]


def app_path() -> Path:
    """The app's entry point, ``app.py`` next to the package (an editable install or a checkout)."""
    return Path(__file__).resolve().parents[1] / "app.py"


def command(logdir: Path, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(app_path()), *extra]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="cbnorm-view", description=__doc__.split("\n\n")[0],
                                epilog="Options after LOGDIR are passed to `streamlit run`.")
    p.add_argument("logdir", help="a directory of runs (nested folders are searched) or one run")
    args, extra = p.parse_known_args(argv)
    logdir = Path(args.logdir).expanduser().resolve()
    if not logdir.is_dir():
        p.error(f"{logdir} is not a directory")
    if not app_path().is_file():
        p.error(f"the app is not next to this cbnorm ({app_path()} is missing): install cbnorm from its source "
                f"checkout (pip install -e '.[app]') to get app.py and pages/")
    runs = find_runs(logdir)
    print(f"cbnorm-view: {len(runs)} run(s) under {logdir}" + ("" if runs else " (the app will say how to add one)"),
          flush=True)
    env = {**os.environ, "CBNORM_RUNS": str(logdir)}
    return subprocess.call(command(logdir, extra), env=env)


if __name__ == "__main__":
    sys.exit(main())

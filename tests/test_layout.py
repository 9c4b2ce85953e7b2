"""The library never imports the app: every module of cbnorm outside cbnorm.app imports without Streamlit,
Plotly or pandas, and no file there names them (nor cbnorm.app)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP_ONLY = ("streamlit", "plotly", "pandas")

PROBE = r"""
import importlib, json, pkgutil, sys
import cbnorm
names, failed = [], {}


def walk(path, prefix):  # pkgutil.walk_packages would import cbnorm.app to look inside it
    for info in pkgutil.iter_modules(path, prefix):
        if info.name == "cbnorm.app" or info.name.endswith(".__main__"):  # __main__ runs a program
            continue
        try:
            module = importlib.import_module(info.name)
            names.append(info.name)
        except Exception as err:  # reported: a module that cannot be imported at all
            failed[info.name] = f"{type(err).__name__}: {err}"
            continue
        if info.ispkg:
            walk(module.__path__, info.name + ".")


walk(cbnorm.__path__, "cbnorm.")
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"streamlit", "plotly", "pandas"})
print(json.dumps({"imported": names, "failed": failed, "heavy": heavy,
                  "app": sorted(m for m in sys.modules if m == "cbnorm.app" or m.startswith("cbnorm.app."))}))
"""


def test_library_modules_import_without_streamlit_plotly_or_pandas():
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert "cbnorm.runs" in report["imported"] and "cbnorm.analysis" in report["imported"]
    assert report["failed"] == {}, report["failed"]
    assert report["heavy"] == [], f"importing the library imported {report['heavy']}"
    assert report["app"] == [], f"importing the library imported {report['app']}"


def test_no_library_file_names_the_app_or_its_packages():
    pattern = re.compile(r"^\s*(from|import)\s+(streamlit|plotly|pandas|cbnorm\.app|\.app)\b|"
                         r"^\s*from\s+(cbnorm|\.)\s+import\s+.*\bapp\b", re.M)
    bad = []
    for path in sorted((ROOT / "cbnorm").rglob("*.py")):
        if (ROOT / "cbnorm" / "app") in path.parents:
            continue
        for m in pattern.finditer(path.read_text(encoding="utf-8")):
            bad.append(f"{path.relative_to(ROOT)}: {m.group(0).strip()}")
    assert bad == []


def test_old_app_modules_are_gone():
    for old in ("app_state.py", "figures.py", "app_daynight.py"):
        assert not (ROOT / "cbnorm" / old).exists(), old


def test_pages_are_thin_and_named_once():
    """Every page is widgets and plots (logic, captions and widget state live in cbnorm.app): none is much over
    150 lines, and the navigation, Home's tour and the files agree (cbnorm.app.navigation is the one table)."""
    import ast

    pages = sorted((ROOT / "pages").glob("*.py"))
    long = {p.name: n for p in pages if (n := len(p.read_text().splitlines())) > 175}
    assert not long, f"pages over 175 lines: {long}"
    assert len((ROOT / "app.py").read_text().splitlines()) <= 120  # the frame only
    tree = ast.parse((ROOT / "cbnorm" / "app" / "navigation.py").read_text())
    files = [c.args[1].value for c in ast.walk(tree) if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "Page"]
    assert sorted(files) == [f"pages/{p.name}" for p in pages] and files[0] == "pages/0_Home.py"

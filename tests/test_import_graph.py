"""The import graph of the cbnorm package, read from its source with ``ast`` (every import statement, at module
level or inside a function, so a local import cannot hide a circle): no circle; no library module imports the
app (``cbnorm.app``) or the package root; the app's services import no trainer (``cbnorm.train``)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "cbnorm"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py")) if "__pycache__" not in p.parts}


def is_package(name: str, mods: dict[str, Path]) -> bool:
    return name in mods and mods[name].name == "__init__.py"


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported cbnorm module, line) for every import statement of the module."""
    tree = ast.parse(path.read_text(), str(path))
    base = name if is_package(name, mods) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name == "cbnorm" or a.name.startswith("cbnorm.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == "cbnorm" or target.startswith("cbnorm.")):
                continue
            for a in node.names:  # `from pkg import sub` imports the submodule when there is one
                sub = f"{target}.{a.name}"
                out.append((sub if sub in mods else target, node.lineno))
    return out


def graph() -> dict[str, dict[str, int]]:
    """importer -> {imported module: line}, with the packages Python initialises on the way (the ancestors of
    the imported module that are not the importer's own)."""
    mods = modules()
    g: dict[str, dict[str, int]] = {m: {} for m in mods}
    for m, p in mods.items():
        own = {".".join(m.split(".")[:i]) for i in range(1, len(m.split(".")) + 1)}
        for target, line in imports_of(m, p, mods):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                t = ".".join(parts[:i])
                if t in mods and t not in own and t != m:
                    g[m].setdefault(t, line)
    return g


def circles(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_reader_sees_local_imports_and_finds_a_planted_circle():
    """The checks can fail: a circle hidden behind a function-local import is found."""
    g = {"cbnorm.a": {"cbnorm.b": 1}, "cbnorm.b": {"cbnorm.c": 3}, "cbnorm.c": {"cbnorm.a": 9}, "cbnorm.d": {}}
    assert circles(g) == [["cbnorm.a", "cbnorm.b", "cbnorm.c"]]
    mods = modules()
    local = [t for t, _ in imports_of("cbnorm", mods["cbnorm"], mods)]
    assert "cbnorm.record" in local and "cbnorm.runs" in local  # imported inside __getattr__ only


def test_no_import_circle_in_the_package():
    g = graph()
    found = circles(g)
    detail = ["; ".join(f"{a} -> {b} (line {g[a][b]})" for a in c for b in c if b in g[a]) for c in found]
    assert not found, "import circles:\n" + "\n".join(detail)


def test_the_library_imports_neither_the_app_nor_the_package_root():
    g = graph()
    bad = [(m, t, line) for m, ts in g.items() for t, line in ts.items()
           if not m.startswith("cbnorm.app") and t.startswith("cbnorm.app")]
    assert not bad, f"library modules importing the app: {bad}"
    root = [(m, line) for m, ts in g.items() for t, line in ts.items() if t == "cbnorm" and m != "cbnorm"]
    assert not root, f"modules importing the package root (use cbnorm._version and the submodules): {root}"


def test_the_app_services_import_no_trainer():
    g = graph()
    bad = [(m, t, line) for m, ts in g.items() if m.startswith("cbnorm.app")
           for t, line in ts.items() if t.startswith("cbnorm.train")]
    assert not bad, f"app services importing training code: {bad}"


def test_old_import_paths_still_work_for_one_version_with_a_deprecation_warning():
    import importlib
    import subprocess
    import sys

    import pytest

    for old, new, name in (("cbnorm.transfer", "cbnorm.daynight.transfer", "translate"),
                           ("cbnorm.train_daynight", "cbnorm.train.daynight", "train_daynight")):
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
            mod = importlib.import_module(old)
        assert getattr(mod, name) is getattr(importlib.import_module(new), name)
    r = subprocess.run([sys.executable, "-m", "cbnorm.train_daynight", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "--translator" in r.stdout, r.stderr[-2000:]


def test_no_function_local_import_of_the_package():
    """Imports of cbnorm's own modules sit at the top of a module, where a reader sees them; only the package
    root keeps its heavy attributes (load_run, watch) lazy through ``__getattr__``, with a comment."""
    mods = modules()
    local = []
    for name, path in mods.items():
        if name == "cbnorm":
            continue
        tree = ast.parse(path.read_text(), str(path))
        top = {id(n) for n in tree.body}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and id(node) not in top and (
                            node.level or (node.module or "").split(".")[0] == "cbnorm"):
                        local.append(f"{name}:{node.lineno}")
                    elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "cbnorm" for a in node.names):
                        local.append(f"{name}:{node.lineno}")
    assert not local, f"function-local imports of cbnorm modules: {sorted(set(local))}"

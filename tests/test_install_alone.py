"""`pip install .` without extras, in a fresh virtual environment: every library module imports, a model is
converted and trains a step, a run is written and read back, and neither streamlit nor plotly is installed.

Needs pip to reach the package registries (CI does); ``CBNORM_SKIP_INSTALL_TEST=1`` skips it for quick local
runs. About a minute: torch comes from this machine's disk (``pip install torch==2.13.0``)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)  # spawns pip in a fresh venv: a hang fails here with its stack

ROOT = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent("""
    import importlib, importlib.util, pkgutil, sys, tempfile
    import cbnorm
    for name in ("streamlit", "plotly", "pandas", "sklearn", "umap", "openTSNE"):
        assert importlib.util.find_spec(name) is None, name + " is installed without the extras"
    # cbnorm.app needs the app extra, cbnorm.integrations.* their frameworks (the lightning extra)
    mods = [m.name for m in pkgutil.walk_packages(cbnorm.__path__, "cbnorm.")
            if not m.name.startswith(("cbnorm.app", "cbnorm.integrations.")) and not m.name.endswith("__main__")]
    for m in mods:
        importlib.import_module(m)
    assert not any(k.split(".")[0] in ("streamlit", "plotly") for k in sys.modules)
    import torch
    from torch import nn
    import cbnorm.models, cbnorm.runs
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    net = cbnorm.convert(net, "mn", num_components=2)
    model = cbnorm.models.build_model("resnet20", in_channels=1, num_classes=3, width=0.25, norm="acn",
                                      norm_layers="layer3.*")
    opt = torch.optim.SGD(list(model.parameters()), lr=0.1)
    x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 3, (8,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward(); opt.step()
    net(x)
    with tempfile.TemporaryDirectory() as d:
        path = d + "/w.safetensors"
        cbnorm.runs.save_weights(path, model)
        assert set(cbnorm.runs.read_safetensors(path)[0]) == set(model.state_dict())
    print("ALONE-OK", len(mods), "modules", float(loss))
""")


@pytest.mark.slow
def test_pip_install_without_extras(tmp_path):
    if os.environ.get("CBNORM_SKIP_INSTALL_TEST"):
        pytest.skip("CBNORM_SKIP_INSTALL_TEST is set")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))

    def pip(*args):
        r = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                           capture_output=True, text=True, timeout=900)
        if r.returncode and ("Could not find a version" in r.stderr or "connection" in r.stderr.lower()):
            pytest.skip(f"pip cannot reach a package index here: {r.stderr[-300:]}")
        assert r.returncode == 0, r.stderr[-2000:]

    pip("torch==2.13.0")
    pip(str(ROOT))  # a regular (non-editable) install, no extras
    r = subprocess.run([py, "-c", CHECK], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "ALONE-OK" in r.stdout

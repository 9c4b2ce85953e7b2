"""checkpoints/README.md's table and seed figures are what checkpoints/table.py computes from the committed
runs' files: a retrained run without a regenerated README fails here."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_matches_the_committed_runs():
    out = subprocess.run([sys.executable, str(ROOT / "checkpoints" / "table.py")], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    readme = (ROOT / "checkpoints" / "README.md").read_text(encoding="utf-8")
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) >= 2 + 15  # header, rule, the 15 classifier runs
    missing = [line for line in table if line not in readme]
    assert not missing, f"checkpoints/README.md is stale; rerun python checkpoints/table.py: {missing[:3]}"
    # the seed summary's headline numbers appear in the README's prose
    for norm in ("bn", "mn", "acn"):
        line = next(l for l in out.splitlines() if l.strip().startswith(f"{norm} "))
        best = line.split("best ")[1].split(";")[0]  # "0.8918 ± 0.0018"
        assert best.split(" ± ")[0] in readme and best.split(" ± ")[1] in readme, (norm, best)

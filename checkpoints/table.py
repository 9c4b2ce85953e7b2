"""The test-accuracy table and the seed summary of checkpoints/README.md, from the committed runs' files.

    python checkpoints/table.py            # prints the Markdown table, then the seed summary

Every figure comes from a run's ``metrics.json`` / ``config.json`` (which ``python -m cbnorm.evaluate
NAME --check`` recomputes from the weights) and the seed summary from ``cbnorm.curves.summarize_groups``,
the same function the Compare page calls.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cbnorm.curves import summarize_groups  # noqa: E402


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.4f}"


def main() -> int:
    rows, groups = [], {}
    for d in sorted((ROOT / "checkpoints").glob("fmnist-*")):
        if not (d / "metrics.json").exists():
            continue
        m = json.loads((d / "metrics.json").read_text())
        t = json.loads((d / "config.json").read_text())["training"]
        n_snap = len(list((d / "snapshots").glob("step_*.safetensors"))) if (d / "snapshots").is_dir() else 0
        points = len(m.get("evals") or []) or len(m.get("epochs") or [])
        best = max(e["test_acc"] for e in m["epochs"])
        rows.append(f"| `{d.name}` | {t['norm']} | {t['seed']} | {m['epochs_done']} | {_fmt(m['test_acc'])} | "
                    f"{_fmt(m.get('test_acc_mixed'))} | {_fmt(m.get('test_acc_oracle'))} | {best:.4f} | {points} | "
                    f"{m['params']:,} | {m['steps_done']} | {n_snap} |")
        if m.get("evals"):
            groups.setdefault(t["norm"], []).append((t["seed"], m))
    print("| run | norm at conv3 | seed | epochs | test_acc | CN+ mixed | oracle (leaks label) | best (epoch ends) "
          "| test points | params | steps | snapshots |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    s = summarize_groups({"committed": groups})["settings"]["committed"]
    print(f"\nBN's mean curve peaks at {s['reference_acc']:.4f} at update {s['reference_step']}")
    for norm, g in sorted(s["norms"].items(), key=lambda kv: (kv[0] != "bn", kv[0])):
        per_seed = ", ".join("never" if v is None else str(v) for v in g["steps_to_reference_per_seed"])
        p = g.get("welch_p")
        print(f"  {norm:8s} seeds {g['seeds']}: best {g['best_acc_mean']:.4f} ± {g['best_acc_sd']:.4f}; "
              f"steps to BN's best: mean curve {g['steps_to_reference']}, per seed {per_seed}; "
              f"Welch p {'—' if p is None else f'{p:.2f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sweeps: norms x seeds x settings, one run directory each, in parallel processes, resumable; and the
summary of a sweep: mean +- sd curves, best accuracy, steps to reach BN's best with a bootstrap interval.

    python -m cbnorm.train.sweep --out runs/mn-protocol --norms bn,mn,acn,mode --seeds 0,1,2 \\
        --setting small="--lr 0.01" --setting large="--lr 0.05" --jobs 2 -- \\
        --dataset fashion-mnist --optimizer rmsprop --schedule exponential --lr-factor 0.93 --lr-every 2 ...
    python -m cbnorm.train.sweep --out runs/mn-protocol --summary       # summarise what is there

Layout: ``OUT/SETTING/NORM/seedS`` (each a run of ``python -m cbnorm.train``), ``OUT/sweep.json`` (the plan),
``OUT/summary.json``. A finished run is skipped, an interrupted one resumed (``--resume``), so the same
command continues a sweep. Everything after ``--`` goes to every run; a setting adds its own arguments.

Summary, per setting (``summarize``), on each run's dense test curve (``metrics.json`` "evals": the fixed
test subset every ``--eval-every`` steps; else the per-epoch full test set):
* per norm: the curves of every seed on their common steps, mean and sd over seeds, each seed's best
  accuracy and final full-test accuracy;
* the **reference**: the maximum of BN's mean curve (the MN paper's "maximum test accuracy of the batch
  normalized model", Table 3) and the step where BN's mean curve reaches it;
* per norm: the first step where its mean curve reaches the reference, the same per seed, their mean with a
  95% bootstrap interval over seeds (``None`` where a seed never reaches it), and the reduction against BN's
  step in percent (the paper's "31-47%");
* whether the difference of best accuracies to BN exceeds the seed spread: |mean difference| larger than
  twice its standard error sqrt(sd_x^2 / n_x + sd_bn^2 / n_bn) (about a 95% interval), with Welch's t-test.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ..curves import curve_of, summarize_groups
from ..runs import read_json, write_json_atomic

__all__ = ["plan", "run_sweep", "summarize", "summarize_groups", "curve_of", "main"]


def _parse_setting(text: str) -> tuple[str, list[str]]:
    name, sep, args = text.partition("=")
    name = name.strip()
    if not sep or not name or "/" in name or name.startswith("."):
        raise ValueError(f"--setting must be NAME=\"ARGS\" (a plain name), got {text!r}")
    return name, shlex.split(args)


def plan(out: Path, norms: Sequence[str], seeds: Sequence[int], settings: Mapping[str, Sequence[str]],
         common: Sequence[str], norm_args: Optional[Mapping[str, Sequence[str]]] = None) -> list[dict]:
    """Every run of the sweep: {"setting", "norm", "seed", "dir", "argv"} (argv for ``cbnorm.train``)."""
    jobs = []
    for setting, extra in settings.items():
        for norm in norms:
            for seed in seeds:
                d = out / setting / norm / f"seed{seed}"
                argv = [*common, *extra, *(norm_args or {}).get(norm, ()), "--norm", norm, "--seed", str(seed),
                        "--out", str(d), "--quiet"]
                jobs.append({"setting": setting, "norm": norm, "seed": int(seed), "dir": str(d), "argv": argv})
    return jobs


def _state(run_dir: Path) -> str:
    """"done", "partial" (resume it) or "new"."""
    if not (run_dir / "config.json").exists():
        return "new"
    try:
        cfg, m = read_json(run_dir / "config.json"), read_json(run_dir / "metrics.json")
    except (ValueError, OSError):
        return "partial"
    return "done" if m.get("epochs_done", 0) >= cfg["training"]["epochs"] else "partial"


def run_sweep(jobs: Sequence[dict], n_parallel: int = 1, threads: Optional[int] = None, log=print) -> list[dict]:
    """Run the jobs, ``n_parallel`` processes at a time, each with ``threads`` torch threads (default: the
    cores shared out). Returns the jobs with their "returncode" and "seconds"; failures are reported, and
    the other runs go on."""
    threads = threads or max(1, (os.cpu_count() or 1) // max(n_parallel, 1))
    pending = [dict(j) for j in jobs]
    running: list[tuple[dict, subprocess.Popen, float]] = []
    done: list[dict] = []
    while pending or running:
        while pending and len(running) < n_parallel:
            job = pending.pop(0)
            state = _state(Path(job["dir"]))
            if state == "done":
                job.update(returncode=0, seconds=0.0, skipped=True)
                done.append(job)
                continue
            argv = job["argv"] + ["--threads", str(threads)]
            if state == "partial":  # continue it, with the resumable options the plan gives now (e.g. --epochs)
                argv = ["--out", job["dir"], "--resume", "--quiet", "--threads", str(threads)]
                for opt in ("--epochs", "--snapshot-every", "--eval-batch-size"):
                    if opt in job["argv"]:
                        argv += [opt, job["argv"][job["argv"].index(opt) + 1]]
            Path(job["dir"]).parent.mkdir(parents=True, exist_ok=True)
            logf = open(Path(job["dir"]).parent / f"{Path(job['dir']).name}.log", "a", encoding="utf-8")
            proc = subprocess.Popen([sys.executable, "-m", "cbnorm.train", *argv], stdout=logf,
                                    stderr=subprocess.STDOUT)
            logf.close()
            running.append((job, proc, time.perf_counter()))
            log(f"started {job['setting']}/{job['norm']}/seed{job['seed']} ({state})")
        time.sleep(0.5)
        for item in list(running):
            job, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            job.update(returncode=proc.returncode, seconds=time.perf_counter() - t0)
            done.append(job)
            log(f"{'finished' if proc.returncode == 0 else 'FAILED (see its .log)'} {job['setting']}/{job['norm']}/"
                f"seed{job['seed']} in {job['seconds']:.0f} s")
    return done


# ============================================================================ summary
def summarize(out: Path, reference: str = "bn") -> dict:
    """The summary of the finished runs of the sweep in ``out`` (``OUT/SETTING/NORM/seedS``), also written to
    ``out/summary.json``."""
    out = Path(out)
    if not out.is_dir():
        raise ValueError(f"no sweep directory {out}")
    settings: dict[str, dict[str, list[tuple[int, dict]]]] = {}
    for sdir in sorted(p for p in out.iterdir() if p.is_dir()):
        for ndir in sorted(p for p in sdir.iterdir() if p.is_dir()):
            for rdir in sorted(ndir.glob("seed*")):
                if _state(rdir) == "done":
                    settings.setdefault(sdir.name, {}).setdefault(ndir.name, []).append(
                        (int(rdir.name[4:]), read_json(rdir / "metrics.json")))
    result = summarize_groups(settings, reference)
    write_json_atomic(out / "summary.json", result)
    return result


# ============================================================================ CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    common: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, common = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m cbnorm.train.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--norms", default="bn", help="comma-separated norms (bn,mn,acn,mode)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (0,1,2)")
    p.add_argument("--setting", action="append", default=[], help='NAME="train args" (repeatable)')
    p.add_argument("--norm-args", action="append", default=[], help='NORM="train args" for one norm only')
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--summary", action="store_true", help="only summarise the runs that are there")
    a = p.parse_args(argv)
    out = Path(a.out)
    try:
        if not a.summary:
            settings = dict(_parse_setting(s) for s in a.setting) or {"default": []}
            norm_args = dict(_parse_setting(s) for s in a.norm_args)
            norms = [n.strip() for n in a.norms.split(",") if n.strip()]
            seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
            jobs = plan(out, norms, seeds, settings, common, norm_args)
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / "sweep.json", {"norms": norms, "seeds": seeds, "settings": settings,
                                                   "norm_args": norm_args, "common": common})
            done = run_sweep(jobs, a.jobs, a.threads)
            failed = [j for j in done if j["returncode"]]
            if failed:
                print(f"{len(failed)} run(s) failed: " + ", ".join(j["dir"] for j in failed), file=sys.stderr)
        summary = summarize(out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, s in summary["settings"].items():
        print(f"[{name}] reference {summary['reference_norm']} best {s.get('reference_acc', float('nan')):.4f} "
              f"at step {s.get('reference_step')}")
        for norm, g in s["norms"].items():
            print(f"  {norm:6s} best {g['best_acc_mean']:.4f} +- {g['best_acc_sd']:.4f} (n={len(g['seeds'])}); "
                  f"steps to reference {g.get('steps_to_reference')} (per seed {g.get('steps_to_reference_per_seed')})"
                  if "best_acc_mean" in g else f"  {norm}: {len(g['seeds'])} seed(s)")
    return 1 if not a.summary and any(j["returncode"] for j in done) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

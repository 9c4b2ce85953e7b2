"""The app under load: N concurrent browser sessions doing random, realistic things for D seconds.

    python bench/load.py [--sessions 10] [--duration 300] [--out bench/results/load.json]

Starts `streamlit run app.py` as a subprocess (headless, bound to 127.0.0.1 on a free port, no file watcher,
no usage statistics) on the committed checkpoints/ (or $CBNORM_RUNS / --runs), then one headless Chromium
(/usr/bin/chromium, never a downloaded one) with one browser context per session, driven by Playwright's
async API. Each session

1. opens the app and visits every page once (warm-up; session 0 first, alone, so the cold computations are
   paid once, then all sessions together; ``--warmup first``: only session 0 visits the pages);
2. then, until ``--duration`` seconds have passed, loops over random actions a user takes on the page it is
   on: switch pages in the sidebar, change the run / layer / seed, move sliders (minibatch size, K, snapshot,
   strength, ...), click buttons (Resample, Run projection), choose radio options, pick a bundled photo and
   upload images on the day-night page: small PNG / JPEG photos, and sometimes a hostile file (text named
   .png, an empty file, a truncated PNG, a decompression bomb, a 16-bit PNG, an animated GIF, an
   EXIF-rotated JPEG, a CMYK JPEG). Between actions it waits ``--think`` seconds (uniform).

For each action the time until the app is idle again is measured: the server has finished a script run
for the page since the interaction (its "script_finished" message on the page's websocket, when the action
causes a rerun), the page's script state is "notRunning", Streamlit's status widget ("running" /
"connecting") is gone, and the page stays so for 250 ms. Then the page is checked for errors.

Errors (each with its text): an exception box (``stException``), an error box (``st.error``) not caused by
a hostile upload, a hostile upload that is neither refused with a message naming the file nor translated,
an action that does not finish within ``--action-timeout`` seconds, a crashed page, a lost connection, and
the server process exiting. Refusals of hostile uploads are recorded apart (expected messages).

The server's memory (RSS of the server process and its children) is sampled every ``--sample`` seconds:
"start" is taken after the warm-up, "end" after the last action; growth = end / start - 1. Then, where gdb
is installed, the server is made to call glibc's malloc_trim(0) and measured once more: the difference is
freed heap memory the allocator had kept, not memory the app holds.

While it runs, the file ``--busy-flag`` (default /tmp/cbnorm_load_running) exists, so that timing
benchmarks on a shared machine can wait; it is removed at the end. The server and the browser are stopped
in ``finally`` (the server's whole process group).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import (CHROMIUM, CHROMIUM_ARGS, free_port, machine, start_server,  # noqa: E402,F401
                          stop_server, tree_cpu, tree_rss, trim_probe)
from bench.load_cases import BUSY_FLAG, Report, Session, upload_files  # noqa: E402,F401


# ============================================================================ the record
async def sample_memory(pid: int, report: Report, phase: dict, every: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        rss = tree_rss(pid)
        if rss is not None:
            report.memory.append({"t_s": report.now(), "phase": phase["name"], "rss_mb": round(rss / 2 ** 20, 1)})
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
        except asyncio.TimeoutError:
            pass


async def drive(base_url: str, server: subprocess.Popen, a: argparse.Namespace, report: Report) -> dict:
    from playwright.async_api import async_playwright

    files = upload_files(a.seed)
    phase = {"name": "warm-up"}
    marks: dict[str, Any] = {}
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_memory(server.pid, report, phase, a.sample, stop))

    def mark(name: str) -> None:
        rss = tree_rss(server.pid)
        marks[name] = {"t_s": report.now(), "rss_mb": None if rss is None else round(rss / 2 ** 20, 1)}
        if rss is not None:
            report.memory.append({"t_s": report.now(), "phase": name, "rss_mb": marks[name]["rss_mb"]})
        try:  # the server's own count of what its caches hold (its heap janitor writes it every 15 s)
            marks[name]["caches"] = json.loads(Path(a.cache_report).read_text())
        except (OSError, ValueError, AttributeError, TypeError):
            pass
        print(f"[{report.now():7.1f}s] {name}: server RSS {marks[name]['rss_mb']} MB", flush=True)

    async def watch_server() -> None:
        while not stop.is_set():
            if server.poll() is not None:
                report.error(-1, "(server)", "server exit", f"streamlit exited with code {server.returncode}")
                stop.set()
                return
            await asyncio.sleep(1.0)

    watcher = asyncio.create_task(watch_server())
    mark("server started")
    sessions: list[Session] = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for i in range(a.sessions):
                ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
                s = Session(i, ctx, base_url, random.Random(a.seed * 1000 + i), files, report, a.action_timeout,
                            (a.think_min, a.think_max))
                await s.open()
                sessions.append(s)
            # warm-up: session 0 alone (pays the cold computations), then the others together
            await asyncio.wait_for(sessions[0].warm_up(), timeout=a.warmup_timeout)
            mark("after one session's warm-up")
            if len(sessions) > 1:
                await asyncio.wait_for(asyncio.gather(*(s.warm_up(a.warmup == "all") for s in sessions[1:])),
                                       timeout=a.warmup_timeout)
            mark("start (every session warmed up)")
            phase["name"] = "load"
            cpu0 = (tree_cpu(server.pid), tree_cpu(os.getpid(), exclude=server.pid))
            t_start = time.perf_counter()
            deadline = t_start + a.duration
            tasks = [asyncio.create_task(s.run(deadline)) for s in sessions]
            done, pending = await asyncio.wait(tasks, timeout=a.duration + a.action_timeout + 60)
            for t in pending:  # should not happen: every action is bounded by the action timeout
                t.cancel()
                report.error(-1, "(driver)", "timeout", "a session did not finish its last action in time")
            for t in done:
                if t.exception() is not None:
                    report.error(-1, "(driver)", "driver error", repr(t.exception())[:500])
            load_s = time.perf_counter() - t_start
            cpu = {"server_cpu_s": round(tree_cpu(server.pid) - cpu0[0], 1),
                   "browser_and_driver_cpu_s": round(tree_cpu(os.getpid(), exclude=server.pid) - cpu0[1], 1),
                   "cores_s": round(load_s * (os.cpu_count() or 1), 1)}
            mark("end")
            if a.trim_probe:
                why = trim_probe(server.pid)
                if why is None:
                    mark("end, after malloc_trim")
                else:
                    report.note(-1, "(trim probe)", why)
            alive = [s for s in sessions if s.alive and not s.crashed and not s.page.is_closed()]
            for s in alive:  # still connected: the status widget does not say "connecting"
                st = await s.state()
                if st["status"] and "connect" in str(st["status"]).lower():
                    s.alive = False
                    report.error(s.idx, "(end)", "connection lost", str(st["status"]))
        finally:
            stop.set()
            await browser.close()
    await asyncio.gather(sampler, watcher, return_exceptions=True)
    return {"marks": marks, "load_s": load_s, "cpu": cpu,
            "sessions": [{"session": s.idx, "actions": s.actions, "alive_at_end": s.alive, "where_at_end": s.where}
                         for s in sessions]}


# ============================================================================ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=10, help="concurrent browser sessions (10)")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of random actions after warm-up (300)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "load.json"))
    ap.add_argument("--runs", default=None, help="runs directory (default $CBNORM_RUNS or <app-root>/checkpoints)")
    ap.add_argument("--app-root", default=str(ROOT), help="checkout whose app.py (and cbnorm) is served (this one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--think-min", type=float, default=0.5, help="pause between a session's actions, from (0.5 s)")
    ap.add_argument("--think-max", type=float, default=2.0, help="... to (2.0 s)")
    ap.add_argument("--action-timeout", type=float, default=180.0, help="an action not idle by then is an error")
    ap.add_argument("--warmup-timeout", type=float, default=600.0, help="limit of each warm-up stage (s)")
    ap.add_argument("--warmup", choices=["all", "first"], default="all",
                    help="all: every session visits every page before the load; first: only session 0 does, the "
                         "others just open the app (quicker)")
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between memory samples (5)")
    ap.add_argument("--busy-flag", default=BUSY_FLAG, help="file that exists while this runs ('' for none)")
    ap.add_argument("--verbose", action="store_true", help="print every action as it finishes")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable for the server (repeatable), e.g. OMP_NUM_THREADS=1")
    ap.add_argument("--no-trim-probe", dest="trim_probe", action="store_false",
                    help="skip the last measurement: the server's RSS after gdb makes it call malloc_trim(0)")
    a = ap.parse_args(argv)
    if a.sessions < 1 or a.duration <= 0:
        ap.error("--sessions must be >= 1 and --duration > 0")
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing (apt-get install chromium)", file=sys.stderr)
        return 2

    try:
        server_env = dict(kv.split("=", 1) for kv in a.server_env)
    except ValueError:
        ap.error("--server-env takes KEY=VALUE")
    root = Path(a.app_root).resolve()
    runs = Path(a.runs or os.environ.get("CBNORM_RUNS") or root / "checkpoints").resolve()
    info = machine(root)
    info["app_root"] = str(root)
    flag = Path(a.busy_flag) if a.busy_flag else None
    report = Report(a.verbose)
    result: dict[str, Any] = {}
    import tempfile

    log_path = Path(tempfile.mkstemp(prefix="cbnorm-load-", suffix=".log")[1])
    a.cache_report = str(log_path.with_suffix(".caches.json"))
    server_env.setdefault("CBNORM_CACHE_REPORT", a.cache_report)
    server = None
    port = None
    try:
        if flag is not None:
            flag.write_text(f"{os.getpid()} bench/load.py --sessions {a.sessions} --duration {a.duration}\n")
        port = free_port()
        t0 = time.perf_counter()
        server = start_server(runs, port, log_path, root, extra_env=server_env)
        print(f"server healthy on 127.0.0.1:{port} after {time.perf_counter() - t0:.1f} s", flush=True)
        result = asyncio.run(drive(f"http://127.0.0.1:{port}", server, a, report))
    finally:
        if server is not None:
            stop_server(server)
        if flag is not None:
            try:
                flag.unlink()
            except FileNotFoundError:
                pass
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    log_path.unlink(missing_ok=True)
    Path(a.cache_report).unlink(missing_ok=True)

    marks = result.get("marks", {})
    start = (marks.get("start (every session warmed up)") or {}).get("rss_mb")
    end = (marks.get("end") or {}).get("rss_mb")
    load_samples = [m["rss_mb"] for m in report.memory if m["phase"] in ("load", "end")]
    growth = None if not start or not end else round(100.0 * (end / start - 1.0), 1)
    sessions = result.get("sessions", [])
    warm = [r for r in report.table() if r["action"].startswith("warm-up")]
    rows = [r for r in report.table() if not r["action"].startswith("warm-up")]
    info["loadavg_end"] = list(os.getloadavg())
    summary = {
        "sessions_started": len(sessions), "sessions_alive_at_end": sum(s["alive_at_end"] for s in sessions),
        "actions": sum(r["count"] for r in rows), "load_seconds": round(result.get("load_s", 0.0), 1),
        "errors": report.error_count,
        "interactions_failed": len(report.notes),
        "memory_server_started_mb": (marks.get("server started") or {}).get("rss_mb"),
        "memory_after_one_session_mb": (marks.get("after one session's warm-up") or {}).get("rss_mb"),
        "memory_start_mb": start, "memory_end_mb": end,
        "memory_peak_mb": max(load_samples) if load_samples else None, "memory_growth_pct": growth,
        "memory_end_after_malloc_trim_mb": (marks.get("end, after malloc_trim") or {}).get("rss_mb"),
        "hostile_uploads_refused_with_message": sum(e["count"] for e in report.expected_messages.values()
                                                    if e["refused"]),
        "awkward_uploads_translated": sum(e["count"] for e in report.expected_messages.values() if not e["refused"]),
        "server_log_tracebacks": log.count("Traceback"),
    }
    summary.update(result.get("cpu", {}))
    summary["goal"] = "every session held to the end, no error, memory growth under 20%"
    summary["goal_met"] = bool(summary["sessions_alive_at_end"] == a.sessions and not report.error_count
                               and growth is not None and growth < 20.0)
    out = {
        "benchmark": "the app under load: concurrent Chromium sessions doing random actions (bench/load.py)",
        "parameters": {"sessions": a.sessions, "duration_s": a.duration, "seed": a.seed,
                       "think_s": [a.think_min, a.think_max], "action_timeout_s": a.action_timeout,
                       "warmup": a.warmup, "server_env": server_env,
                       "memory_sample_s": a.sample, "runs": str(runs), "port": port, "server": "127.0.0.1, headless, "
                       "--server.fileWatcherType none, --browser.gatherUsageStats false",
                       "browser": "one headless Chromium, one context (and page) per session"},
        "machine": info, "summary": summary, "actions": rows, "warm_up": warm,
        "errors": report.errors,
        "expected_messages": sorted(report.expected_messages.values(), key=lambda e: e["file"]),
        "notes": report.notes[:200], "sessions": sessions, "memory": report.memory,
        "server_log_tail": log[-4000:],
        "caches": {name: m.get("caches") for name, m in marks.items() if m.get("caches")},
        "note": "Each action's time runs from the interaction until the app is idle again (script not running, no "
                "status widget, 250 ms stable). The browser runs on the same CPU as the server. Memory: RSS of the "
                "server process tree; start = after every session's warm-up. caches: the server's count of what each "
                "Streamlit cache holds at each mark (cbnorm.app.shared.cache_report, written every 15 s).",
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    for r in rows:
        print(f"{r['action']:45s} n={r['count']:4d} median {r['median_s']:7.2f} s  p95 {r['p95_s']:7.2f} s  "
              f"worst {r['worst_s']:7.2f} s")
    print(f"wrote {a.out}")
    return 0 if summary["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())

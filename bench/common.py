"""Pieces the benchmark scripts (and the browser test) share: the CPU's name, and a loopback Streamlit
server on the committed app."""
from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(runs: Path, port: int, log_path: Path, root: Path = ROOT, timeout: float = 90.0,
                 extra_env: Optional[dict] = None) -> subprocess.Popen:
    """`streamlit run <root>/app.py` headless on 127.0.0.1:port with CBNORM_RUNS=runs, in its own process
    group (``root`` first on the Python path, so its cbnorm is the one imported), output to ``log_path``;
    waits for the health endpoint."""
    path = os.pathsep.join([str(root)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, CBNORM_RUNS=str(runs), PYTHONUNBUFFERED="1", PYTHONPATH=path, **(extra_env or {}))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(root / "app.py"), "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}: {Path(log_path).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError("streamlit did not become healthy in time")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


# ============================================================================ a process tree: memory and CPU


def trim_probe(pid: int) -> Optional[str]:
    """Ask the server's C allocator to give its free heap memory back (gdb calls glibc's malloc_trim(0) in
    the process): the RSS after it is what the server really holds. None when done, else why not."""
    import shutil

    gdb = shutil.which("gdb")
    if gdb is None:
        return "gdb is not installed"
    try:
        r = subprocess.run([gdb, "-p", str(pid), "-batch", "-nx", "-iex", "set auto-solib-add off",
                            "-ex", "sharedlibrary libc", "-ex", "call (int) malloc_trim(0)"],
                           capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        return f"gdb failed: {err}"
    return None if r.returncode == 0 and "$1 =" in r.stdout else f"gdb failed: {r.stderr[-300:]}"


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        if q in out:
            continue
        out.append(q)
        todo += _children(q)
    return out


def tree_cpu(pid: int, exclude: Optional[int] = None) -> float:
    """CPU seconds (user + system) used so far by the live processes of ``pid``'s tree, less ``exclude``'s
    tree (Linux /proc; 0 elsewhere)."""
    skip = set(_tree(exclude)) if exclude is not None else set()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for q in _tree(pid):
        if q in skip:
            continue
        try:
            fields = Path(f"/proc/{q}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / tick


def tree_rss(pid: int) -> Optional[int]:
    """Resident memory (bytes) of ``pid`` and all its descendants: psutil when installed, else /proc."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            p = psutil.Process(pid)
            procs = [p] + p.children(recursive=True)
            total = 0
            for q in procs:
                try:
                    total += q.memory_info().rss
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return None
    total, todo, seen = 0, [pid], set()
    while todo:
        q = todo.pop()
        if q in seen:
            continue
        seen.add(q)
        try:
            with open(f"/proc/{q}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            if q == pid:
                return None
            continue
        todo += _children(q)
    return total


# ============================================================================ machine
def machine(root: Path = ROOT) -> dict:
    cpu = cpu_model()
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "memory_gb": mem,
                            "python": platform.python_version(), "loadavg_start": list(os.getloadavg())}
    try:
        import streamlit

        info["streamlit"] = streamlit.__version__
    except ImportError:
        pass
    try:
        info["chromium"] = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True,
                                          timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                            timeout=10).stdout.strip()
        info["git_dirty_files"] = len(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                                     cwd=root, capture_output=True, text=True,
                                                     timeout=10).stdout.splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    return info

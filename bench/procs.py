"""Processes under test: started pinned to a core with taskset, read for their ports, measured from /proc."""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
from collections.abc import Iterable, Sequence

from services.shared.processes import Child, start_child, stop_together

SERVER_CORE = 0
LOAD_CORE = 1
# Servers run with the checkout's root on their path, so `python -m bench.<baseline>` works from any cwd.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


# A started benchmark process is the supervisor's child: name, address, metrics port, pid.
Proc = Child


def pin_self(core: int = LOAD_CORE) -> None:
    """Pin the calling process (the load generator and its children) to one core."""
    if len(os.sched_getaffinity(0)) > 1 and (os.cpu_count() or 1) > core:
        os.sched_setaffinity(0, {core})


async def start(
    name: str,
    module_args: Sequence[str],
    *,
    core: int,
    cwd: pathlib.Path,
    env: dict[str, str] | None = None,
    python: str = sys.executable,
) -> Proc:
    """Start `python -m <module_args>` pinned to `core`; wait for its 'listening on' line on stdout.

    `python` is the interpreter: the project's own, or a peer system's virtualenv (bench/peer_autogen_system.py).
    """
    cwd.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a local directory, before the process starts
    command = [python, "-m", *module_args]
    if (os.cpu_count() or 1) > core:
        command = ["taskset", "-c", str(core), *command]
    return await start_child(
        name,
        command,
        cwd / f"{name}.log",
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        cwd=cwd,
        # Its own process group: a Ctrl-C of the bench reaches it only through stop().
        new_session=True,
    )


async def stop(procs: Iterable[Proc], grace_seconds: float = 15.0) -> None:
    """SIGTERM every process at once (each drains on its own), SIGKILL whatever outlives the grace."""
    await stop_together(procs, grace_seconds)


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds the processes have used so far (threads included)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            # After the ")" that ends the command name, utime and stime are fields 12 and 13.
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def rss_bytes(pids: Iterable[int]) -> int:
    """Resident set size of the processes, summed."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int(pathlib.Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    return total


def open_fds(pids: Iterable[int]) -> int:
    """Open file descriptors of the processes, summed."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def threads(pids: Iterable[int]) -> int:
    """OS threads of the processes, summed."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += len(os.listdir(f"/proc/{pid}/task"))
    return total


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread of a process, keyed 'name/tid' (OS thread names; the main thread so called)."""
    out: dict[str, float] = {}
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                base = pathlib.Path(f"/proc/{pid}/task/{tid}")
                name = "main thread" if tid == str(pid) else (base / "comm").read_text().strip()
                if name == "python":  # Python threads keep the process's name: aiosqlite's worker, /metrics
                    name = "other Python threads"
                fields = (base / "stat").read_text().rsplit(")", 1)[1].split()
                out[f"{name}/{tid}"] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


def product_revision() -> str:
    """The product code a process started now would run: the last commit that changed services/ or protos/,
    plus a digest of uncommitted changes to them.

    Others may commit or edit while a run goes on; samples taken on different code must not be averaged
    silently, so every sample carries this. Commits elsewhere (bench/, docs/) do not change it.
    """
    import hashlib
    import subprocess

    def git(*args: str) -> bytes:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, check=False).stdout

    head = git("log", "-1", "--format=%h", "HEAD", "--", "services", "protos").decode().strip() or "unknown"
    diff = git("diff", "HEAD", "--", "services", "protos")
    untracked = git("ls-files", "--others", "--exclude-standard", "--", "services")
    digest = hashlib.sha1(diff)
    for name in sorted(untracked.decode().split()):
        with contextlib.suppress(OSError):
            digest.update(name.encode() + (REPO_ROOT / name).read_bytes())
    return head if not diff and not untracked.strip() else f"{head}+{digest.hexdigest()[:7]}"

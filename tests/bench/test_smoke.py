"""The benchmark harness keeps working: tiny runs of its scenarios, each validated by the servers' own counts.

Timings are never asserted here; `make bench` measures, these only prove the
harness still starts every system, drives it and checks the server agrees.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

from tests.tools import require_tool

REPO = pathlib.Path(__file__).resolve().parents[2]


def _tiny(scenarios: str) -> subprocess.CompletedProcess[str]:
    """`python -m bench smoke --profile tiny --only …` in its own process (it pins itself to a core)."""
    return subprocess.run(
        [sys.executable, "-m", "bench", "smoke", "--profile", "tiny", "--only", scenarios],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_read_scenarios_run_under_h2load_and_are_validated() -> None:
    require_tool("h2load")
    result = _tiny("reads")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[get_c10] repeat 1 suite" in result.stdout
    assert "[stream_replay] repeat 1 echo" in result.stdout


def test_burst_scenario_runs_every_system_and_is_validated() -> None:
    result = _tiny("bursts")
    assert result.returncode == 0, result.stdout + result.stderr
    for system in ("minimal", "suite", "seed"):
        assert f"[burst_10] repeat 1 {system} @" in result.stdout

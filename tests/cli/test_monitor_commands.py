"""`roundtable monitor` and `roundtable report` reach the monitor's own tools."""

from __future__ import annotations

import pathlib
from collections.abc import Awaitable, Callable

from tests.cli.test_client_auth import roundtable
from tests.suite import Suite

MakeSuite = Callable[..., Awaitable[Suite]]


async def test_monitor_and_report_commands(make_suite: MakeSuite, tmp_path: pathlib.Path) -> None:
    suite = await make_suite()
    address = suite.monitor_host.address
    code, out, err = await roundtable("monitor", "--address", address, "--once")
    assert code == 0, err
    assert "Roundtable fleet" in out and "discussions running" in out
    report_file = tmp_path / "report.md"
    code, out, err = await roundtable("report", "--address", address, "--window", "60", "--out", str(report_file))
    assert code == 0, err
    assert report_file.read_text().startswith("#")
    assert report_file.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

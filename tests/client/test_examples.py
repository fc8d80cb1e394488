"""The examples/ programs and the SDK README's quickstart run as a user would run them, against a real suite."""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import sys

from tests.suite import Suite

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SDK_README = REPO / "clients" / "python" / "README.md"


async def run(address: str, *argv: str, timeout_seconds: float = 240) -> tuple[int, str]:
    """Run a Python program in a process of its own with ROUNDTABLE_ADDRESS set; its exit code and stdout+stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        # Outside the repo: the examples need the installed SDK, nothing of the server's code.
        cwd=EXAMPLES.parent.parent,
        env={**os.environ, "ROUNDTABLE_ADDRESS": address, "PYTHONPATH": ""},
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout_seconds)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_stream_one_prints_every_answer_the_summary_and_completed(suite: Suite) -> None:
    code, out = await run(
        suite.session_host.address, str(EXAMPLES / "stream_one.py"), "Tea or coffee?", "--personas", "scientist"
    )
    assert code == 0, out
    assert "[round 1] 科学家:" in out and "[round 2] 科学家:" in out
    assert "SUMMARY by 主持人:" in out
    assert out.rstrip().endswith("status: COMPLETED")


async def test_many_at_once_gets_100_through_a_cap_of_20(capped_suite: Suite) -> None:
    code, out = await run(capped_suite.session_host.address, str(EXAMPLES / "many_at_once.py"), "--count", "100")
    assert code == 0, out
    assert "100 of 100 discussions completed" in out
    retries = re.search(r"(\d+) retries", out)
    assert retries and int(retries.group(1)) >= 80, out


async def test_resume_after_restart_picks_up_after_the_last_event_it_handled(
    suite: Suite, tmp_path: pathlib.Path
) -> None:
    state = tmp_path / "follow.json"
    script = str(EXAMPLES / "resume_after_restart.py")
    code, first = await run(suite.session_host.address, script, "--state", str(state), "--stop-after", "4")
    assert code == 3, first
    assert "stopping after sequence 4" in first and state.exists()
    code, second = await run(suite.session_host.address, script, "--state", str(state))
    assert code == 0, second
    sequences = [int(s) for s in re.findall(r"^#(\d+) ", first + second, re.MULTILINE)]
    assert sequences == sorted(set(sequences)), "an event was handled twice or out of order"
    assert "resuming" in second and min(int(s) for s in re.findall(r"^#(\d+) ", second, re.MULTILINE)) > 4
    assert "status COMPLETED" in second and not state.exists()


def quickstart() -> str:
    """The first code block of the SDK's README (the five-line quickstart)."""
    match = re.search(r"## Quickstart\n\n```python\n(.*?)```", SDK_README.read_text(encoding="utf-8"), re.DOTALL)
    assert match, "the README has no quickstart block"
    return match.group(1)


async def test_the_readme_quickstart_is_five_lines_and_runs(suite: Suite) -> None:
    code_lines = [line for line in quickstart().splitlines() if line.strip()]
    assert len(code_lines) == 5, code_lines
    code, out = await run(suite.session_host.address, "-c", quickstart())
    assert code == 0, out
    assert "[round 2] " in out

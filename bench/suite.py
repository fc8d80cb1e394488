"""The suite under test as production runs it: each service its own process, started with flags, on core 0.

Like `roundtable up` (services/cli/launcher.py): monitor first, then agents, then
session pointed at them; SQLite store, metrics and logging on. Two LLM set-ups:
`fake` runs bench.fake_agents (the shipped agent service with a fixed-latency LLM in
process), `sim` runs the shipped agent service against the simulator through the
`openai` SDK. The simulator stands in for a provider, so it runs beside the load
generator on core 1, not on the server's core.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Literal

from bench import procs

LLM = Literal["fake", "sim"]

# Caps raised so that a burst measures the machinery, not the admission policy (which has its own tests).
RAISED_CAPS = [
    "--max-concurrent-sessions", "100000",
    "--max-queued-sessions", "100000",
    "--max-concurrent-sessions-per-principal", "100000",
    "--max-retained-discussions-per-principal", "10000000",
    "--max-pending-rpcs", "100000",
]  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """Shipped settings switched for diagnosis: which part of the cost goes where."""

    store: Literal["sqlite", "memory"] = "sqlite"
    # No per-session log files, console at WARNING.
    quiet: bool = False
    # asyncio's own loop instead of the shipped uvloop (--event-loop asyncio).
    asyncio_loop: bool = False
    # One RunDiscussion stream per discussion instead of the shipped lanes (--agents-transport calls).
    calls: bool = False

    @classmethod
    def parse(cls, name: str) -> Variant:
        """'suite+memory+quiet+asyncio+calls' → the variant; plain 'suite' is the suite as shipped."""
        parts = set(name.split("+")[1:])
        unknown = parts - {"memory", "quiet", "asyncio", "calls"}
        if unknown:
            raise ValueError(f"unknown suite variant(s) {sorted(unknown)} in {name!r}")
        return cls(
            store="memory" if "memory" in parts else "sqlite",
            quiet="quiet" in parts,
            asyncio_loop="asyncio" in parts,
            calls="calls" in parts,
        )


@dataclass
class Suite:
    """The started processes of one suite."""

    session: procs.Proc
    agents: procs.Proc
    monitor: procs.Proc
    simulator: procs.Proc | None = None
    workdir: pathlib.Path = field(default_factory=pathlib.Path)

    @property
    def services(self) -> list[procs.Proc]:
        """Our three services (not the simulator, which stands in for a provider)."""
        return [self.monitor, self.agents, self.session]

    @property
    def pids(self) -> list[int]:
        """Process ids of our services."""
        return [p.pid for p in self.services]

    @property
    def all(self) -> list[procs.Proc]:
        """Every process, in start order."""
        return [*([self.simulator] if self.simulator else []), *self.services]

    async def stop(self) -> None:
        """SIGTERM every process; each drains and stops on its own."""
        await procs.stop(self.all)


async def start_suite(
    workdir: pathlib.Path,
    *,
    llm: LLM = "fake",
    latency_seconds: float = 1.0,
    summary_latency_seconds: float | None = None,
    answer_words: int = 60,
    session_flags: list[str] | None = None,
    agents_flags: list[str] | None = None,
    simulator_flags: list[str] | None = None,
    variant: Variant | None = None,
) -> Suite:
    """Start monitor, agents (fake LLM or simulator) and session, each on core 0, in a fresh workdir."""
    variant = variant or Variant()
    workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a local directory, before anything starts
    started: list[procs.Proc] = []
    try:
        simulator = None
        llm_flags: list[str] = []
        agents_module = "services.agents"
        if llm == "sim":
            simulator = await procs.start(
                "simulator",
                [
                    "services.simulator",
                    "--port", "0",
                    "--first-token-latency-ms", str(latency_seconds * 1000),
                    # Fast enough that the whole answer follows the first token at once.
                    "--tokens-per-second", "1000000",
                    *(simulator_flags or []),
                ],
                core=procs.LOAD_CORE,
                cwd=workdir,
            )  # fmt: skip
            started.append(simulator)
            llm_flags = [
                "--llm-base-url", simulator.address,
                "--llm-backend", "simulator",
                "--llm-max-tokens", str(answer_words),
            ]  # fmt: skip
        else:
            agents_module = "bench.fake_agents"
            llm_flags = ["--fake-latency-seconds", str(latency_seconds), "--fake-answer-words", str(answer_words)]
            if summary_latency_seconds is not None:
                llm_flags += ["--fake-summary-latency-seconds", str(summary_latency_seconds)]
        # Quiet: no per-session files (an empty directory turns them off), and only warnings on the console.
        log_dir = "" if variant.quiet else str(workdir / "logs")
        common = ["--port", "0", "--metrics-port", "0", "--session-log-dir", log_dir]
        if variant.quiet:
            common += ["--log-level", "WARNING"]
        loop = ["--event-loop", "asyncio"] if variant.asyncio_loop else []
        common += loop
        monitor = await procs.start(
            "monitor",
            ["services.monitor", "--port", "0", "--metrics-port", "0", *loop],
            core=procs.SERVER_CORE,
            cwd=workdir,
        )
        started.append(monitor)
        reports = ["--monitor-address", monitor.address]
        agents = await procs.start(
            "agents",
            [
                agents_module,
                *common,
                *reports,
                *llm_flags,
                "--max-concurrent-llm-calls", "100000",
                "--max-agent-sets", "100000",
                *(agents_flags or []),
            ],
            core=procs.SERVER_CORE,
            cwd=workdir,
        )  # fmt: skip
        started.append(agents)
        session = await procs.start(
            "session",
            [
                "services.session",
                *common,
                *reports,
                "--agents-address", agents.address,
                "--store", variant.store,
                "--sqlite-path", str(workdir / "var" / "roundtable.db"),
                *RAISED_CAPS,
                *(["--agents-transport", "calls"] if variant.calls else []),
                *(session_flags or []),
            ],
            core=procs.SERVER_CORE,
            cwd=workdir,
        )  # fmt: skip
        started.append(session)
    except BaseException:
        await procs.stop(started, grace_seconds=5)
        raise
    return Suite(session=session, agents=agents, monitor=monitor, simulator=simulator, workdir=workdir)

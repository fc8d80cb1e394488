"""Every system a scenario compares, started the same way and read through one interface.

`suite` and `suite-sim` are the product (bench.suite); `echo`, `minimal` and `seed`
are the baselines of this folder. Counts come from the suite's /metrics or from a
baseline's /bench.Control/Stats, so a run is validated by the server, not the client.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from bench import procs
from bench.control import read_stats
from bench.promtext import Scrape, scrape
from bench.suite import Suite, Variant, start_suite

SESSION_METHOD_LABELS = {"grpc_service": "roundtable.session.v1.SessionService"}
# roundtable_discussions_finished_total's status label holds the enum value name.
COMPLETED = "DISCUSSION_STATUS_COMPLETED"


@dataclass(frozen=True)
class Counts:
    """Server-side counts at one moment."""

    created_ok: int
    create_errors: int
    completed: int
    finished_not_completed: int
    rpc_ok: int
    rpc_errors: dict[str, int]
    msgs_sent: int
    active: int
    expired: int = 0

    def minus(self, before: Counts) -> Counts:
        """What happened between `before` and this."""
        codes = {k: v - before.rpc_errors.get(k, 0) for k, v in self.rpc_errors.items()}
        return Counts(
            created_ok=self.created_ok - before.created_ok,
            create_errors=self.create_errors - before.create_errors,
            completed=self.completed - before.completed,
            finished_not_completed=self.finished_not_completed - before.finished_not_completed,
            rpc_ok=self.rpc_ok - before.rpc_ok,
            rpc_errors={k: v for k, v in codes.items() if v},
            msgs_sent=self.msgs_sent - before.msgs_sent,
            active=self.active,
            expired=self.expired - before.expired,
        )


@dataclass
class System:
    """A started system: where it answers, its processes, and how to read its counts."""

    name: str
    address: str
    procs: list[procs.Proc]
    suite: Suite | None = None

    @property
    def pids(self) -> list[int]:
        """Our server processes (the simulator, a stand-in provider, is not ours)."""
        if self.suite is not None:
            return self.suite.pids
        return [p.pid for p in self.procs]

    @property
    def probe_kind(self) -> str:
        """The trivial RPC that probes responsiveness: health on the suite, the stats call on baselines."""
        return "health" if self.suite is not None else "stats"

    async def counts(self, method: str | None = None) -> Counts:
        """Server-side counts; `method` narrows the RPC ones (e.g. GetDiscussion)."""
        if self.suite is None:
            stats = await read_stats(self.address)
            return Counts(
                created_ok=stats.created,
                create_errors=0,
                completed=stats.completed,
                finished_not_completed=0,
                rpc_ok=stats.ok,
                rpc_errors={"ERROR": stats.errors} if stats.errors else {},
                msgs_sent=stats.msgs_sent,
                active=stats.created - stats.completed,
            )
        session = await self.scrape_session()
        return counts_from_scrape(session, method)

    async def scrape_session(self) -> Scrape:
        """The session service's /metrics."""
        assert self.suite is not None
        return await scrape(self.suite.session.metrics_port)

    async def scrape_agents(self) -> Scrape:
        """The agent service's /metrics."""
        assert self.suite is not None
        return await scrape(self.suite.agents.metrics_port)

    async def stop(self) -> None:
        """Stop every process of the system."""
        if self.suite is not None:
            await self.suite.stop()
        else:
            await procs.stop(self.procs)


def counts_from_scrape(session: Scrape, method: str | None) -> Counts:
    """Counts from the session service's metrics."""
    handled = "grpc_server_handled_total"
    rpc_labels = dict(SESSION_METHOD_LABELS, **({"grpc_method": method} if method else {}))
    codes = session.by_label(handled, "grpc_code", **rpc_labels)
    create_codes = session.by_label(handled, "grpc_code", grpc_method="CreateDiscussion", **SESSION_METHOD_LABELS)
    finished = session.by_label("roundtable_discussions_finished_total", "status")
    return Counts(
        created_ok=int(create_codes.get("OK", 0)),
        create_errors=int(sum(v for k, v in create_codes.items() if k != "OK")),
        completed=int(finished.get(COMPLETED, 0)),
        finished_not_completed=int(sum(v for k, v in finished.items() if k != COMPLETED)),
        rpc_ok=int(codes.get("OK", 0)),
        rpc_errors={k: int(v) for k, v in codes.items() if k != "OK" and v},
        msgs_sent=int(session.total("grpc_server_msg_sent_total", **rpc_labels)),
        active=int(session.total("roundtable_discussions_active")),
        expired=int(session.total("roundtable_discussions_expired_total")),
    )


async def start_system(
    name: str,
    workdir: pathlib.Path,
    *,
    latency_seconds: float = 1.0,
    summary_latency_seconds: float | None = None,
    answer_words: int = 60,
    payload: pathlib.Path | None = None,
    session_flags: list[str] | None = None,
) -> System:
    """Start one system, its server processes on core 0."""
    if name.split("+")[0] in ("suite", "suite-sim"):
        suite = await start_suite(
            workdir,
            llm="sim" if name.startswith("suite-sim") else "fake",
            variant=Variant.parse(name),
            latency_seconds=latency_seconds,
            summary_latency_seconds=summary_latency_seconds,
            answer_words=answer_words,
            session_flags=session_flags,
        )
        return System(name=name, address=suite.session.address, procs=suite.all, suite=suite)
    if name == "echo":
        if payload is None:
            raise ValueError("the echo server needs a payload")
        args = ["bench.echo_server", "--payload", str(payload)]
    elif name == "minimal":
        args = ["bench.minimal_server", "--latency-seconds", str(latency_seconds)]
        if summary_latency_seconds is not None:
            args += ["--summary-latency-seconds", str(summary_latency_seconds)]
    elif name == "seed":
        args = ["bench.seed_server", "--latency-seconds", str(latency_seconds)]
    else:
        raise ValueError(f"unknown system {name!r}")
    proc = await procs.start(name, args, core=procs.SERVER_CORE, cwd=workdir)
    return System(name=name, address=proc.address, procs=[proc])

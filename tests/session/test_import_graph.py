"""The session service's layering, read from its imports: the servicer translates, Discussions combines,
and only the agents port speaks gRPC to the agent service."""

from __future__ import annotations

import ast
from pathlib import Path

SESSION = Path(__file__).resolve().parents[2] / "services" / "session"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (from-imports as module.name too, so `from x import y` shows x.y)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def session_modules() -> dict[str, set[str]]:
    """Each session service module (path relative to services/session) and what it imports."""
    return {str(path.relative_to(SESSION)): imported_modules(path) for path in sorted(SESSION.rglob("*.py"))}


def test_the_servicer_reaches_state_only_through_discussions() -> None:
    imports = imported_modules(SESSION / "servicer.py")
    forbidden = {
        "services.session.runner",
        "services.session.admission",
        "services.session.notifier",
        "services.session.stores",
        "services.session.redis",
        "services.session.agents_client",
    }
    reached = {m for m in imports for f in forbidden if m == f or m.startswith(f + ".")}
    assert not reached, f"servicer.py imports {sorted(reached)}: it should go through Discussions"
    assert "services.session.discussions" in imports


def test_only_the_agents_port_imports_the_agent_services_stubs() -> None:
    users = {
        name
        for name, imports in session_modules().items()
        if any(m.startswith("services.gen.roundtable.agents") for m in imports)
    }
    assert users == {"agents_client.py", "agents_lanes.py"}


def test_only_the_wiring_servicer_and_agents_port_import_grpc() -> None:
    users = {name for name, imports in session_modules().items() if "grpc" in imports or "grpc.aio" in imports}
    assert users <= {"agents_client.py", "agents_lanes.py", "servicer.py", "service.py"}, users


def test_discussions_is_the_only_module_that_combines_admission_runner_and_store() -> None:
    combiners = {
        name
        for name, imports in session_modules().items()
        if {"services.session.admission", "services.session.runner"} <= {m.rsplit(".", 1)[0] for m in imports} | imports
    }
    assert combiners == {"discussions.py"}, combiners

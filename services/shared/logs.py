"""One logging set-up; session id and agent name travel in contextvars, not in logger objects.

Any code running for a session logs through its module logger as usual; a filter
stamps the record with the session context, so console lines read
``... - [Session-<id>] - Session-<id>-Agent-<name> - INFO - ...`` as in the seed.
Logger objects are never created per session: the logging module keeps them
forever, which would leak memory for every session ever served.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from services.shared.session_logs import SessionLogFiles, install
from services.shared.settings import LogFormat, ServiceSettings

session_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("session_id", default="")
agent_var: contextvars.ContextVar[str] = contextvars.ContextVar("agent", default="")


@contextmanager
def session_context(session_id: str, agent: str = "") -> Iterator[None]:
    """Tag every log line in this block (and tasks started in it) with the session and agent."""
    session_token = session_id_var.set(session_id)
    agent_token = agent_var.set(agent) if agent else None
    try:
        yield
    finally:
        if agent_token is not None:
            agent_var.reset(agent_token)
        session_id_var.reset(session_token)


def session_logger_name(session_id: str, agent: str = "") -> str:
    """The seed's logger name: ``Session-<id>`` or ``Session-<id>-Agent-<name>``."""
    return f"Session-{session_id}-Agent-{agent}" if agent else f"Session-{session_id}"


class SessionContextFilter(logging.Filter):
    """Adds session_id, agent, session_tag and session-scoped logger names to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Stamp the record; never drops one."""
        session_id = session_id_var.get()
        agent = agent_var.get()
        record.session_id = session_id
        record.agent = agent
        record.session_tag = f"[Session-{session_id}]" if session_id else "[-]"
        if session_id:
            record.name = session_logger_name(session_id, agent)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for Kubernetes log pipelines."""

    def format(self, record: logging.LogRecord) -> str:
        """Serialise timestamp, severity, logger, session, agent and message."""
        entry = {
            "timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "severity": record.levelname,
            "logger": record.name,
            "session_id": getattr(record, "session_id", ""),
            "agent": getattr(record, "agent", ""),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


# The seed's formats: the console tags each line with its session; a session's own file needs no tag.
TEXT_FORMAT = "%(asctime)s - %(session_tag)s - %(name)s - %(levelname)s - %(message)s"
FILE_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


def _formatter(log_format: LogFormat, text_format: str) -> logging.Formatter:
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
        return formatter
    return logging.Formatter(text_format, datefmt="%Y-%m-%d %H:%M:%S")


def setup_logging(settings: ServiceSettings, service: str) -> None:
    """Configure the root logger once for a service process: console, and per-session files if on."""
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(SessionContextFilter())
    console.setFormatter(_formatter(settings.log_format, TEXT_FORMAT))
    handlers: list[logging.Handler] = [console]
    if settings.session_log_dir is not None:
        files = SessionLogFiles(
            settings.session_log_dir, settings.session_log_max_bytes, settings.session_log_max_open_files
        )
        files.addFilter(SessionContextFilter())
        files.setFormatter(_formatter(settings.log_format, FILE_FORMAT))
        install(files)
        handlers.append(files)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(settings.log_level.upper())
    # Third-party chatter at INFO drowns the discussion log.
    for noisy in ("httpx", "openai", "aiohttp.access", "aiosqlite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger(__name__).debug("logging configured for %s", service)

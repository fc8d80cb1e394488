"""One logging set-up; session id and agent name travel in contextvars, not in logger objects.

Any code running for a session logs through its module logger as usual; a filter
stamps the record with the session context, so console lines read
``... - [Session-<id>] - Session-<id>-Agent-<name> - INFO - ...`` as in the seed.
Logger objects are never created per session: the logging module keeps them
forever, which would leak memory for every session ever served.

Writing is off the event loop: the root logger's one handler stamps the record
(contextvars are only visible on the task that logs) and queues it; one
listener thread formats it and writes the console and the session files, and
flushes the files whenever its queue runs dry.
"""

from __future__ import annotations

import atexit
import contextvars
import json
import logging
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from logging.handlers import QueueHandler, QueueListener

from services.shared import tracing
from services.shared.session_logs import SessionLogFiles, install, session_log_files
from services.shared.settings import LogFormat, ServiceSettings

# The longest the session files of a busy process go unflushed while the queue never runs dry.
FLUSH_INTERVAL_SECONDS = 1.0

session_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("session_id", default="")
agent_var: contextvars.ContextVar[str] = contextvars.ContextVar("agent", default="")


class session_context:  # lower case: called like the context-manager function it replaced
    """Tag every log line in this block (and tasks started in it) with the session and agent.

    A small class rather than @contextmanager: one is held across the awaits of every running
    discussion and agent, and a generator-based one costs several times the memory.
    """

    __slots__ = ("_agent", "_agent_token", "_session_id", "_session_token")

    def __init__(self, session_id: str, agent: str = "") -> None:
        self._session_id = session_id
        self._agent = agent
        self._session_token: contextvars.Token[str] | None = None
        self._agent_token: contextvars.Token[str] | None = None

    def __enter__(self) -> None:
        self._session_token = session_id_var.set(self._session_id)
        if self._agent:
            self._agent_token = agent_var.set(self._agent)

    def __exit__(self, *_: object) -> None:
        if self._agent_token is not None:
            agent_var.reset(self._agent_token)
        if self._session_token is not None:
            session_id_var.reset(self._session_token)


def session_logger_name(session_id: str, agent: str = "") -> str:
    """The seed's logger name: ``Session-<id>`` or ``Session-<id>-Agent-<name>``."""
    return f"Session-{session_id}-Agent-{agent}" if agent else f"Session-{session_id}"


class SessionContextFilter(logging.Filter):
    """Adds session_id, agent, session_tag, session-scoped logger names and the active span's ids to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Stamp the record; never drops one."""
        session_id = session_id_var.get()
        agent = agent_var.get()
        record.session_id = session_id
        record.agent = agent
        # Read here, on the task that logs: the active span is a contextvar, invisible to the listener thread.
        ids = tracing.active_ids()
        if ids is not None:
            record.trace_id, record.span_id = ids
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
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            entry["trace_id"] = trace_id
            entry["span_id"] = getattr(record, "span_id", "")
        # A queued record carries its traceback as text (see _StampingQueueHandler.prepare).
        exception = record.exc_text or (self.formatException(record.exc_info) if record.exc_info else "")
        if exception:
            entry["exception"] = exception
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


class _StampingQueueHandler(QueueHandler):
    """Queues records for the listener thread, stamped (by its filter) and with their message merged."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """Merge the message and render a traceback now, on the caller, and leave formatting to the sinks."""
        # Arguments may change after the call returns, and a traceback keeps frames alive: resolve
        # both here. The record is this handler's alone (the root has no other), so no copy.
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        return record


_TRACEBACKS = logging.Formatter()


class _Action:
    """Work queued behind the records already logged, done on the listener thread."""

    def __init__(self, run: Callable[[], None]) -> None:
        self.run = run


class _SinkListener(QueueListener):
    """Writes queued records to the sinks; flushes them when the queue runs dry or every FLUSH_INTERVAL_SECONDS."""

    def __init__(self, log_queue: queue.SimpleQueue[logging.LogRecord | _Action | None], *sinks: logging.Handler):
        super().__init__(log_queue, *sinks, respect_handler_level=True)
        self._queue = log_queue
        self._last_flush = time.monotonic()

    def submit(self, action: Callable[[], None]) -> None:
        """Run the action on the listener thread once every record queued before it is written."""
        self._queue.put_nowait(_Action(action))

    def handle(self, record: logging.LogRecord | _Action) -> None:
        """Write one record (or run one action), then flush if nothing is waiting."""
        if isinstance(record, _Action):
            try:
                record.run()
            except Exception:  # the listener thread must outlive a failed action
                traceback.print_exc(file=sys.stderr)
        else:
            super().handle(record)
        if self._queue.empty() or time.monotonic() - self._last_flush >= FLUSH_INTERVAL_SECONDS:
            self.flush_sinks()

    def flush_sinks(self) -> None:
        """Flush every sink (the listener thread's, or anyone's once it has stopped)."""
        self._last_flush = time.monotonic()
        for sink in self.handlers:
            sink.flush()

    def stop(self) -> None:
        """Write everything queued so far, flush the sinks and end the thread."""
        super().stop()
        self.flush_sinks()


_listener: _SinkListener | None = None


def setup_logging(settings: ServiceSettings, service: str) -> None:
    """Configure the root logger once for a service process: console, and per-session files if on."""
    stop_logging()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(_formatter(settings.log_format, TEXT_FORMAT))
    sinks: list[logging.Handler] = [console]
    files: SessionLogFiles | None = None
    if settings.session_log_dir is not None:
        files = SessionLogFiles(
            settings.session_log_dir, settings.session_log_max_bytes, settings.session_log_max_open_files
        )
        files.setFormatter(_formatter(settings.log_format, FILE_FORMAT))
        sinks.append(files)
    log_queue: queue.SimpleQueue[logging.LogRecord | _Action | None] = queue.SimpleQueue()
    # The sinks run on the listener thread, where the session context is not visible: stamp here.
    stamping = _StampingQueueHandler(log_queue)
    stamping.addFilter(SessionContextFilter())
    global _listener
    _listener = _SinkListener(log_queue, *sinks)
    install(files, run_in_order=_listener.submit)
    root = logging.getLogger()
    root.handlers[:] = [stamping]
    root.setLevel(settings.log_level.upper())
    # Third-party chatter at INFO drowns the discussion log.
    for noisy in ("httpx", "openai", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # No format here prints file, line or function: skip logging's stack walk for them on every
    # line (CPU, and a frame object kept alive per suspended coroutine that logged).
    logging._srcfile = None  # the documented switch (logging HOWTO, "Optimization")
    _listener.start()
    logging.getLogger(__name__).debug("logging configured for %s", service)


def flush(timeout_seconds: float = 5.0) -> bool:
    """Block until every line logged so far is written and flushed (before reading a session file)."""
    if _listener is None:
        files = session_log_files()
        for handler in [*logging.getLogger().handlers, *([files] if files is not None else [])]:
            handler.flush()
        return True
    listener = _listener
    written = threading.Event()

    def flush_and_tell() -> None:
        listener.flush_sinks()
        written.set()

    listener.submit(flush_and_tell)
    return written.wait(timeout_seconds)


def stop_logging() -> None:
    """Write and flush what is queued, stop the listener thread and close the sinks (exit, tests)."""
    global _listener
    listener, _listener = _listener, None
    if listener is None:
        return
    install(None)
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _StampingQueueHandler)]
    listener.stop()
    for sink in listener.handlers:
        sink.close()


# Registered after logging's own exit hook, so it runs first: the queue is written before the sinks close.
atexit.register(stop_logging)

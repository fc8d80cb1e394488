"""Prometheus metrics every service exports: go-grpc-prometheus names, event-loop lag, the /metrics endpoint."""

from __future__ import annotations

import asyncio
import threading
import time
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import Counter, Histogram

GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

SERVER_FAULT_CODES: tuple[str, ...] = ("UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED")
"""The grpc_code values that are the server's fault: what an error rate counts, in the monitor's alert and in
the RoundtableHighErrorRate rule (deploy/prometheus/rules.yml, kept equal by tests/deploy/test_rules.py).
Refusals (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNAUTHENTICATED, ...) and CANCELLED are the
caller's doing; counting them let a burst of bad or throttled calls page as an outage."""

# Names, labels and buckets follow go-grpc-prometheus so stock dashboards work.
SERVER_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", GRPC_LABELS)
SERVER_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure.",
    (*GRPC_LABELS, "grpc_code"),
)
SERVER_MSG_RECEIVED = Counter("grpc_server_msg_received_total", "Stream messages received by the server.", GRPC_LABELS)
SERVER_MSG_SENT = Counter("grpc_server_msg_sent_total", "Stream messages sent by the server.", GRPC_LABELS)
SERVER_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Response latency of RPCs handled by the server, until the last message is sent.",
    GRPC_LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

CLIENT_STARTED = Counter("grpc_client_started_total", "RPCs started by the client.", GRPC_LABELS)
CLIENT_HANDLED = Counter("grpc_client_handled_total", "RPCs completed by the client.", (*GRPC_LABELS, "grpc_code"))
CLIENT_HANDLING_SECONDS = Histogram(
    "grpc_client_handling_seconds",
    "Latency of RPCs made by the client, until the last message is received.",
    GRPC_LABELS,
    buckets=SERVER_HANDLING_SECONDS._upper_bounds[:-1],
)

# One series per process (no labels, like the other roundtable_* metrics): the scrape's job and instance say whose.
EVENT_LOOP_LAG_SECONDS = Histogram(
    "roundtable_event_loop_lag_seconds",
    "How much later than asked a timer on the event loop fired: how long ready work waits for the loop.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


async def watch_event_loop_lag(interval_seconds: float, histogram: Histogram = EVENT_LOOP_LAG_SECONDS) -> None:
    """Sleep interval_seconds over and over, observing each time how late the sleep ended; runs until cancelled."""
    while True:
        due = time.monotonic() + interval_seconds
        await asyncio.sleep(interval_seconds)
        # The wake-up waits behind every callback ready before it, so the overshoot is what any of them waits.
        histogram.observe(max(0.0, time.monotonic() - due))


def split_method(full_method: str) -> tuple[str, str]:
    """'/pkg.Service/Method' → ('pkg.Service', 'Method')."""
    _, service, method = full_method.split("/", 2) if full_method.count("/") >= 2 else ("", "", full_method)
    return service, method


class MetricsServer:
    """The /metrics HTTP endpoint of one process, on its own thread."""

    def __init__(self, host: str, port: int) -> None:
        server, thread = prometheus_client.start_http_server(port, addr=host)
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.port: int = server.server_port

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()

"""What every baseline server shares: its counters, served on /bench.Control/Stats, and how it announces itself.

The baselines have no Prometheus interceptor (that would tax the ceiling they stand
for); plain integers cost nothing, and the runner reads them over gRPC to validate a
run the same way it reads grpc_server_handled_total from the suite.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import grpc

STATS_METHOD = "/bench.Control/Stats"
SESSION_SERVICE = "roundtable.session.v1.SessionService"


@dataclass
class Counters:
    """RPCs answered OK or not, stream messages sent, discussions created and completed."""

    ok: int = 0
    errors: int = 0
    msgs_sent: int = 0
    created: int = 0
    completed: int = 0

    def to_json(self) -> bytes:
        """The counters as a JSON object."""
        return json.dumps(asdict(self)).encode()


def stats_handler(counters: Counters, lock: threading.Lock | None = None) -> grpc.GenericRpcHandler:
    """A generic handler answering /bench.Control/Stats with the counters (raw JSON bytes, no protobuf).

    With a lock, the handler is a plain function for the threaded (seed) server; without, a coroutine.
    """

    def read() -> bytes:
        if lock is None:
            return counters.to_json()
        with lock:
            return counters.to_json()

    def behaviour(request: bytes, context: Any) -> bytes:
        return read()

    async def async_behaviour(request: bytes, context: Any) -> bytes:
        return read()

    handler: Callable[..., Any] = behaviour if lock is not None else async_behaviour
    stats: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(handler)
    return grpc.method_handlers_generic_handler("bench.Control", {"Stats": stats})


async def read_stats(address: str) -> Counters:
    """Fetch a baseline's counters."""
    async with grpc.aio.insecure_channel(address) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(STATS_METHOD)
        raw = await call(b"", timeout=30)
    return Counters(**json.loads(raw))


def announce(name: str, port: int) -> None:
    """The line the runner waits for, in the services' format."""
    print(f"{name} listening on 127.0.0.1:{port} metrics -1", flush=True)

"""A TCP proxy in front of a server that breaks the connections through it: cut (RST), or freeze (a silent
network: bytes stop flowing, nobody is told), as a flaky network does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

CHUNK_BYTES = 65_536


@dataclass
class _Connection:
    """Both sockets of one proxied connection; a frozen one drops what it reads."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    frozen: bool = False
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        self.client.transport.abort()
        self.upstream.transport.abort()


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to `upstream`; `cut()` resets every open connection, `freeze()` silences them."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._server: asyncio.Server | None = None
        self._open: list[_Connection] = []
        self.connections = 0
        self.cuts = 0

    @property
    def address(self) -> str:
        """host:port to dial instead of the upstream."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    def cut(self) -> None:
        """Reset every connection now: the client sees its stream break mid-flight."""
        self.cuts += 1
        self._abort_all()

    def freeze(self) -> None:
        """Stop every open connection's bytes, both ways, without closing it; new connections work."""
        for connection in self._open:
            connection.frozen = True

    async def stop(self) -> None:
        """Close the listener and every connection."""
        if self._server is not None:
            self._server.close()
        pumps = [pump for connection in self._open for pump in connection.pumps]
        self._abort_all()
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _abort_all(self) -> None:
        for connection in self._open:
            connection.abort()
        self._open.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            client_writer.transport.abort()
            return
        self.connections += 1
        connection = _Connection(client_writer, upstream_writer)
        self._open.append(connection)
        for source, sink in ((client_reader, upstream_writer), (upstream_reader, client_writer)):
            connection.pumps.append(asyncio.create_task(self._pump(connection, source, sink)))

    async def _pump(self, connection: _Connection, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while chunk := await source.read(CHUNK_BYTES):
                if connection.frozen:
                    continue
                sink.write(chunk)
                await sink.drain()
        connection.abort()
        if connection in self._open:
            self._open.remove(connection)


@contextlib.asynccontextmanager
async def cutting_proxy(upstream: str) -> AsyncIterator[CuttingProxy]:
    """A running CuttingProxy, stopped on exit."""
    proxy = CuttingProxy(upstream)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()

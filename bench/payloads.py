"""Canned replies for the echo baseline: a real discussion's document and events, so sizes match the suite's."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from services.gen.roundtable.session.v1 import session_pb2

TOPIC = "Should cities ban cars from their centres?"
PERSONAS = ("scientist", "philosopher", "economist")


@dataclass(frozen=True)
class Payload:
    """A document and its event log."""

    document: session_pb2.Discussion
    events: list[session_pb2.DiscussionEvent]

    def write(self, path: pathlib.Path) -> None:
        """Length-prefixed messages: the document first, then every event."""
        chunks = [self.document.SerializeToString(), *(e.SerializeToString() for e in self.events)]
        path.write_bytes(b"".join(len(c).to_bytes(4, "big") + c for c in chunks))

    @classmethod
    def read(cls, path: pathlib.Path) -> Payload:
        """Inverse of write()."""
        data = path.read_bytes()
        chunks: list[bytes] = []
        offset = 0
        while offset < len(data):
            size = int.from_bytes(data[offset : offset + 4], "big")
            chunks.append(data[offset + 4 : offset + 4 + size])
            offset += 4 + size
        return cls(
            document=session_pb2.Discussion.FromString(chunks[0]),
            events=[session_pb2.DiscussionEvent.FromString(c) for c in chunks[1:]],
        )


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: no compression flag, 4-byte big-endian length, the bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message

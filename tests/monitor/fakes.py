"""Test doubles shared by the monitor tests."""

from __future__ import annotations

from google.protobuf import timestamp_pb2


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp for seconds since the epoch."""
    value = timestamp_pb2.Timestamp()
    value.FromNanoseconds(int(seconds * 1e9))
    return value

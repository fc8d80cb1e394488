"""Domain errors, and their one mapping to gRPC status codes with rich details."""

from __future__ import annotations

import math

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


class RoundtableError(Exception):
    """Base of the errors a caller can act on; the message is shown to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def details(self) -> list[object]:
        """google.rpc detail messages to attach to the status."""
        return []


class InvalidArgument(RoundtableError):
    """The request is malformed; retrying it unchanged will fail again."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field

    def details(self) -> list[object]:
        """A BadRequest naming the field."""
        if not self.field:
            return []
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=bounded(self.field, 200), description=bounded(str(self))
                    )
                ]
            )
        ]


class Unauthenticated(RoundtableError):
    """The caller did not prove who it is."""

    code = grpc.StatusCode.UNAUTHENTICATED


class AlreadyExists(RoundtableError):
    """The name the client proposed is taken."""

    code = grpc.StatusCode.ALREADY_EXISTS


class NotFound(RoundtableError):
    """The named thing does not exist (or is not the caller's)."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(RoundtableError):
    """The request is valid but the thing is not in a state that allows it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(RoundtableError):
    """A dependency is down; the same request may be retried."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(RoundtableError):
    """A limit is reached; retry after the given delay."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_seconds: float, subject: str, limit: str) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
        self.subject = subject
        self.limit = limit

    def details(self) -> list[object]:
        """RetryInfo with the delay and QuotaFailure naming the limit."""
        seconds = max(self.retry_after_seconds, 0.0)
        whole = math.floor(seconds)
        return [
            error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
            ),
            error_details_pb2.QuotaFailure(
                violations=[error_details_pb2.QuotaFailure.Violation(subject=self.subject, description=self.limit)]
            ),
        ]


# Trailers carry the message three times (grpc-message percent-encoded, at up to 3 bytes per UTF-8
# byte, and twice in the details); past 8 KiB a client may refuse them. 500 bytes keeps all under 3 KiB.
MAX_MESSAGE_BYTES = 500


def bounded(text: str, limit_bytes: int = MAX_MESSAGE_BYTES) -> str:
    """Text cut to `limit_bytes` of UTF-8, saying so, so that echoing a huge input can't break the reply."""
    encoded = text.encode()
    if len(encoded) <= limit_bytes:
        return text
    kept = encoded[:limit_bytes].decode(errors="ignore")
    return kept + f"… ({len(text) - len(kept)} more characters)"


def to_grpc_status(error: RoundtableError) -> grpc.Status:
    """The grpc.Status (code, message, google.rpc.Status details) for a domain error."""
    status = status_pb2.Status(code=getattr(code_pb2, error.code.name), message=bounded(str(error)))
    for detail in error.details():
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


def retry_delay_seconds(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay a server attached to an error, if any."""
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None

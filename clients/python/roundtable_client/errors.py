"""Typed exceptions for the session API's errors, carrying the gRPC status and its google.rpc details."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class QuotaViolation:
    """One limit a RESOURCE_EXHAUSTED hit: whose (`subject`, e.g. "principal:alice") and which (`description`)."""

    subject: str
    description: str


@dataclass(frozen=True)
class FieldViolation:
    """One request field an INVALID_ARGUMENT names, and what is wrong with it."""

    field: str
    description: str


class RoundtableError(Exception):
    """A call that failed: its gRPC status code and message, and the server's RetryInfo and QuotaFailure, if any."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        retry_delay_seconds: float | None = None,
        quota_violations: Sequence[QuotaViolation] = (),
        field_violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        # The server's RetryInfo: the earliest a retry can succeed; None when it sent none.
        self.retry_delay_seconds = retry_delay_seconds
        self.quota_violations = tuple(quota_violations)
        self.field_violations = tuple(field_violations)


class InvalidArgument(RoundtableError):
    """The request is malformed (topic, personas, rounds, ids); sending it again unchanged fails again."""


class Unauthenticated(RoundtableError):
    """No valid API key was sent."""


class PermissionDenied(RoundtableError):
    """The caller is known but not allowed to make this call."""


class NotFound(RoundtableError):
    """No such discussion for this caller (another caller's discussions are never revealed)."""


class AlreadyExists(RoundtableError):
    """The proposed discussion id is taken by another create of this caller."""


class FailedPrecondition(RoundtableError):
    """The discussion is not in a state that allows the call (cancel a finished one)."""


class ResourceExhausted(RoundtableError):
    """A limit was reached; `retry_delay_seconds` says when to come back, `quota_violations` which limit."""


class Unavailable(RoundtableError):
    """The service or one of its dependencies is unreachable; the same call may be retried."""


class DeadlineExceeded(RoundtableError):
    """The call's deadline passed (retries included)."""


class Cancelled(RoundtableError):
    """The call was cancelled."""


_BY_CODE: dict[grpc.StatusCode, type[RoundtableError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def from_rpc_error(error: grpc.aio.AioRpcError) -> RoundtableError:
    """The typed exception for a failed call, with the RetryInfo, QuotaFailure and BadRequest it carried."""
    code = error.code()
    retry_delay_seconds: float | None = None
    quotas: list[QuotaViolation] = []
    fields: list[FieldViolation] = []
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # details that contradict the status line: keep the status line
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_delay_seconds = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            quotas.extend(QuotaViolation(v.subject, v.description) for v in failure.violations)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    kind = _BY_CODE.get(code, RoundtableError)
    return kind(
        code,
        error.details() or "",
        retry_delay_seconds=retry_delay_seconds,
        quota_violations=quotas,
        field_violations=fields,
    )

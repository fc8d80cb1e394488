"""Hypothesis strategies for hostile requests: every request message of every service, and raw bytes.

Structured strategies build real protobuf messages whose fields hold hostile values (huge and
empty strings, control and format characters, wrong names, negative and huge numbers, enum values
that do not exist, timestamps and durations out of range, fields left unset). Raw strategies build
whole serialized payloads: valid messages with unknown fields added (still decodable), and
truncated, corrupted or hand-made bytes with invalid UTF-8, bad tags and bad lengths (mostly not).
"""

from __future__ import annotations

import base64
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from services.gen.roundtable.agents.v1 import agents_pb2
from services.gen.roundtable.monitor.v1 import monitor_pb2
from services.gen.roundtable.session.v1 import session_pb2

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT64_MAX = 2**64 - 1

# Canonical persona names and their aliases (services/agents/personas.toml); 主持人 is the moderator.
PERSONA_NAMES = ("科学家", "哲学家", "经济学家", "工程师", "主持人")
PERSONA_ALIASES = ("scientist", "philosopher", "economist", "engineer", "moderator")
KNOWN_PERSONAS = PERSONA_NAMES + PERSONA_ALIASES
MODERATOR_KEYS = frozenset({"主持人", "moderator"})
MONITORED_SERVICES = ("session", "agents", "monitor")


@dataclass(frozen=True)
class Probe:
    """One request to send: the serialized payload, and for server streams when the client cancels."""

    payload: bytes
    metadata: tuple[tuple[str, str | bytes], ...] = ()
    # Streams only: cancel after reading this many messages (0: at once); None reads to the end.
    cancel_after: int | None = None
    origin: str = "structured"


# ---------------------------------------------------------------------------------------------
# Scalars


def _ints(lo: int, hi: int, *interesting: int) -> st.SearchStrategy[int]:
    """Boundary values, small values and anything in [lo, hi]."""
    edges = sorted({v for v in (lo, lo + 1, -2, -1, 0, 1, 2, 3, hi - 1, hi, *interesting) if lo <= v <= hi})
    return st.one_of(st.sampled_from(edges), st.integers(max(lo, -5), min(hi, 15)), st.integers(lo, hi))


int32s = _ints(INT32_MIN, INT32_MAX, 4, 5, 6, 10, 11, 12, 13, 3600, 3601, 86_400)
int64s = _ints(INT64_MIN, INT64_MAX, INT32_MAX, INT32_MAX + 1, 2**53 + 1, 2**62)
uint64s = _ints(0, UINT64_MAX, INT64_MAX, INT64_MAX + 1, 2**53 + 1)
doubles = st.one_of(
    st.sampled_from([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324]),
    st.floats(),
)

# Characters a naive validator forgets: controls, format characters (bidi overrides, BOM,
# zero-width), line and paragraph separators, odd spaces.
_nasty_chars = st.characters(categories=["Cc", "Cf", "Zl", "Zp", "Zs", "Co"])
_FILLERS = ("x", "议", "\x00", "\u202e", "😀", " ", "\n", "%", "\ufeff", "é", "\u200b", "\x7f")
# Longer than any limit (128, 200, 4,000), past the 8 KiB / 16 KiB metadata limits if echoed
# in an error message, and large but still under max_message_bytes.
_HUGE_SIZES = (129, 201, 3_999, 4_000, 4_001, 8_193, 16_385, 70_000)
_TRICKY = (
    "",
    " ",
    "\t\n ",
    "\u3000",
    "null",
    "None",
    "undefined",
    "../../etc/passwd",
    "%s%s%n%x",
    "' OR 1=1 --",
    "'; DROP TABLE discussions; --",
    "\r\n\r\n",
    "{}",
    "\U0010ffff",
    "a\u0301",
    "İ",
    "ß",
    "ﬁ",
    "\u202eevil",
    "🤖" * 3,
    "0" * 32,
    "f" * 32,
    "F" * 32,
    "0123456789abcdef" * 2 + "\n",
)

hostile_text = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=_nasty_chars, min_size=1, max_size=20),
    st.sampled_from(_TRICKY),
    st.builds(lambda fill, n: (fill * n)[:n], st.sampled_from(_FILLERS), st.sampled_from(_HUGE_SIZES)),
)

persona_names = st.one_of(
    st.sampled_from(KNOWN_PERSONAS),
    st.sampled_from(KNOWN_PERSONAS).map(lambda name: f"  {name.upper()}\t"),
    hostile_text,
)

_plausible_topics = st.sampled_from(
    ("Should cities ban cars?", "是否应该禁止城市汽车？", "Is fuzzing worth it?", "a", "多行\n话题\t带制表符")
)
topics = st.one_of(_plausible_topics, hostile_text)

hex32 = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
_malformed_ids = st.one_of(
    hostile_text,
    st.text(alphabet="0123456789abcdef", min_size=31, max_size=31),
    st.text(alphabet="0123456789abcdef", min_size=33, max_size=33),
    st.text(alphabet="0123456789ABCDEF", min_size=32, max_size=32),
    hex32.map(lambda value: f" {value}"),
    hex32.map(lambda value: value + "\x00"),
)

durations = st.one_of(
    st.builds(duration_pb2.Duration, seconds=int64s, nanos=int32s),
    st.builds(duration_pb2.Duration, seconds=st.integers(-10, 2 * 86_400), nanos=st.integers(-(10**9), 10**9)),
)
timestamps = st.one_of(
    st.builds(timestamp_pb2.Timestamp, seconds=int64s, nanos=int32s),
    st.builds(timestamp_pb2.Timestamp, seconds=st.integers(0, 4_102_444_800), nanos=st.integers(0, 10**9 - 1)),
)


_UNSET = object()


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The strategy's value, or (one time in eight) _UNSET."""
    return st.tuples(st.sampled_from(range(8)), strategy).map(lambda pair: _UNSET if pair[0] == 0 else pair[1])


def _message(cls: type[Message], **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Message]:
    """A message of `cls`; any field may be left unset (missing fields are part of the fuzz)."""
    return st.fixed_dictionaries({name: _maybe(value) for name, value in fields.items()}).map(
        lambda values: cls(**{name: value for name, value in values.items() if value is not _UNSET})
    )


# ---------------------------------------------------------------------------------------------
# SessionService


def discussion_ids(real: list[str]) -> st.SearchStrategy[str]:
    """Real ids of this suite, well-formed unknown ones and malformed ones."""
    choices = [hex32, _malformed_ids]
    if real:
        choices.insert(0, st.sampled_from(real))
    return st.one_of(*choices)


create_discussion = _message(
    session_pb2.CreateDiscussionRequest,
    topic=topics,
    personas=st.one_of(
        st.lists(st.sampled_from(KNOWN_PERSONAS), min_size=1, max_size=4), st.lists(persona_names, max_size=14)
    ),
    rounds=st.one_of(st.integers(0, 2), int32s),
    request_id=st.one_of(hostile_text, st.sampled_from(["same-key-1", "same-key-2"]), st.uuids().map(str)),
    ttl=durations,
    token_budget=int64s,
)


def get_discussion(real: list[str]) -> st.SearchStrategy[Message]:
    return _message(session_pb2.GetDiscussionRequest, discussion_id=discussion_ids(real))


def stream_discussion(real: list[str]) -> st.SearchStrategy[Message]:
    return _message(
        session_pb2.StreamDiscussionRequest,
        discussion_id=discussion_ids(real),
        after_sequence=int64s,
    )


def cancel_discussion(real: list[str]) -> st.SearchStrategy[Message]:
    return _message(session_pb2.CancelDiscussionRequest, discussion_id=discussion_ids(real))


def delete_discussion(real: list[str]) -> st.SearchStrategy[Message]:
    return _message(session_pb2.DeleteDiscussionRequest, discussion_id=discussion_ids(real))


def _page_token(created: int, discussion_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created}:{discussion_id}".encode()).decode()


page_tokens = st.one_of(
    hostile_text,
    st.binary(max_size=40).map(lambda raw: base64.urlsafe_b64encode(raw).decode()),
    # Shaped like the server's own cursors (base64 of "<created_at_ns>:<id>"), with any integer.
    st.builds(_page_token, int64s, st.one_of(hex32, hostile_text)),
    st.builds(_page_token, st.integers(), hex32),
)

list_discussions = _message(
    session_pb2.ListDiscussionsRequest,
    page_size=int32s,
    page_token=page_tokens,
    status=st.one_of(st.sampled_from(sorted(session_pb2.DiscussionStatus.values())), int32s),
)

# ---------------------------------------------------------------------------------------------
# AgentService

session_ids = st.one_of(hex32, hostile_text, st.sampled_from(["shared-a", "shared-b"]))

prior_answers = st.lists(
    _message(agents_pb2.PriorAnswer, agent=persona_names, round=int32s, text=hostile_text), max_size=4
)

run_discussion = _message(
    agents_pb2.RunDiscussionRequest,
    session_id=session_ids,
    topic=topics,
    personas=st.one_of(
        st.lists(st.sampled_from(KNOWN_PERSONAS), min_size=1, max_size=5), st.lists(persona_names, max_size=8)
    ),
    rounds=st.one_of(st.integers(1, 3), st.integers(0, 11), int32s),
    start_round=st.one_of(st.sampled_from([0, 1]), st.integers(-1, 12), int32s),
    prior_answers=st.one_of(st.just([]), prior_answers),
    token_budget=int64s,
)


def release_session(real: list[str]) -> st.SearchStrategy[Message]:
    ids = st.one_of(st.sampled_from(real), session_ids) if real else session_ids
    return _message(agents_pb2.ReleaseSessionRequest, session_id=ids)


def get_agent_stats(real: list[str]) -> st.SearchStrategy[Message]:
    ids = st.one_of(st.sampled_from(real), session_ids) if real else session_ids
    return _message(agents_pb2.GetAgentStatsRequest, session_id=ids)


list_personas = st.just(agents_pb2.ListPersonasRequest())

# ---------------------------------------------------------------------------------------------
# MonitorService


def _counters(bounds: list[float], counts: list[int], **rest: Any) -> monitor_pb2.MethodCounters:
    return monitor_pb2.MethodCounters(bucket_upper_bounds_seconds=bounds, bucket_counts=counts, **rest)


_bucket_pairs = st.lists(st.tuples(doubles, uint64s), max_size=8).map(
    lambda pairs: ([bound for bound, _ in pairs], [count for _, count in pairs])
)
method_counters = st.one_of(
    # Matching bounds and counts (the report is placed in the fleet view) ...
    st.builds(
        lambda pair, rest: _counters(pair[0], pair[1], **rest),
        _bucket_pairs,
        st.fixed_dictionaries(
            {},
            optional={
                "method": st.one_of(
                    st.sampled_from(["/roundtable.session.v1.SessionService/GetDiscussion", "/x/y"]), hostile_text
                ),
                "handled_total": uint64s,
                "error_total": uint64s,
                "latency_sum_seconds": doubles,
            },
        ),
    ),
    # ... or any lengths at all.
    _message(
        monitor_pb2.MethodCounters,
        method=hostile_text,
        handled_total=uint64s,
        error_total=uint64s,
        bucket_upper_bounds_seconds=st.lists(doubles, max_size=6),
        bucket_counts=st.lists(uint64s, max_size=6),
        latency_sum_seconds=doubles,
    ),
)

instance_report = _message(
    monitor_pb2.InstanceReport,
    instance_id=st.one_of(st.sampled_from(["fuzz-a", "fuzz-b", "fuzz-c"]), hostile_text),
    service=st.one_of(st.sampled_from(MONITORED_SERVICES), hostile_text),
    address=hostile_text,
    reported_at=timestamps,
    methods=st.lists(method_counters, max_size=4),
    active_sessions=int64s,
    queued_sessions=int64s,
    session_capacity=int64s,
    live_agent_sets=int64s,
    cpu_percent=doubles,
    rss_bytes=int64s,
    started_at=timestamps,
)

get_performance_summary = _message(monitor_pb2.GetPerformanceSummaryRequest, window_seconds=int32s)
get_concurrency_stats = st.just(monitor_pb2.GetConcurrencyStatsRequest())

# ---------------------------------------------------------------------------------------------
# Wire format: unknown fields, metadata, raw and corrupted payloads


def _varint(value: int) -> bytes:
    value &= UINT64_MAX
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def length_delimited(field: int, data: bytes) -> bytes:
    """A field of wire type 2 (string, bytes, message)."""
    return _key(field, 2) + _varint(len(data)) + data


_unknown_field_numbers = st.one_of(st.integers(20, 18_999), st.integers(20_000, 2**29 - 1))
_unknown_field = st.one_of(
    st.builds(lambda n, v: _key(n, 0) + _varint(v), _unknown_field_numbers, uint64s),
    st.builds(lambda n, v: _key(n, 1) + v, _unknown_field_numbers, st.binary(min_size=8, max_size=8)),
    st.builds(length_delimited, _unknown_field_numbers, st.binary(max_size=64)),
    st.builds(lambda n, v: _key(n, 5) + v, _unknown_field_numbers, st.binary(min_size=4, max_size=4)),
)
# Valid wire format a server must skip: proto3 keeps unknown fields.
unknown_fields = st.lists(_unknown_field, min_size=1, max_size=6).map(b"".join)

_metadata_value = st.text(alphabet=string.ascii_letters + string.digits + " -_.:/=+", max_size=200)
metadata = st.one_of(
    st.just(()),
    st.just(()),
    st.just(()),
    st.lists(
        st.one_of(
            st.tuples(st.just("authorization"), st.one_of(_metadata_value, _metadata_value.map("Bearer ".__add__))),
            st.tuples(st.just("x-session-id"), _metadata_value),
            st.tuples(st.just("x-fuzz-bin"), st.binary(max_size=64)),
            st.tuples(st.text(alphabet=string.ascii_lowercase + "-", min_size=1, max_size=20), _metadata_value).filter(
                lambda kv: not kv[0].startswith("grpc-") and not kv[0].endswith("-bin")
            ),
        ),
        min_size=1,
        max_size=3,
    ).map(tuple),
)

_INVALID_UTF8 = (
    b"\xff",
    b"\xfe\xff",
    b"\xc3\x28",
    b"\xa0\xa1",
    b"\xe2\x28\xa1",
    b"\xf0\x28\x8c\xbc",
    b"\xed\xa0\x80",  # a UTF-16 surrogate, encoded
    b"\xc0\xaf",  # overlong "/"
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b"\xe4\xbd",  # truncated 议
)


def _string_fields(cls: type[Message]) -> list[int]:
    return [field.number for field in cls.DESCRIPTOR.fields if field.type == FieldDescriptor.TYPE_STRING]


def _flip(payload: bytes, index: int, mask: int) -> bytes:
    if not payload:
        return bytes([mask])
    index %= len(payload)
    return payload[:index] + bytes([payload[index] ^ mask]) + payload[index + 1 :]


def _truncate(payload: bytes, keep: int) -> bytes:
    return payload[: keep % (len(payload) + 1)]


def raw_payloads(cls: type[Message], structured: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    """Whole payloads as bytes: random, corrupted from valid ones, and hand-made undecodable ones."""
    valid = structured.map(lambda message: message.SerializeToString())
    choices: list[st.SearchStrategy[bytes]] = [
        st.binary(max_size=96),
        st.builds(_truncate, valid, st.integers(0, 2**16)),
        st.builds(_flip, valid, st.integers(0, 2**16), st.integers(1, 255)),
        st.builds(bytes.__add__, valid, st.binary(min_size=1, max_size=16)),
        st.builds(bytes.__add__, valid, unknown_fields),
        # Wire types 6 and 7 do not exist; field number 0 is invalid.
        st.builds(lambda n, wt: _key(n, wt) + b"\x00", st.integers(1, 30), st.sampled_from([6, 7])),
        st.just(_key(0, 0) + b"\x01"),
        # A varint that never ends, and a length longer than the payload.
        st.just(b"\x08" + b"\x80" * 11),
        st.builds(lambda n: _key(n, 2) + _varint(1000) + b"abc", st.integers(1, 30)),
        # An end-group with no start-group.
        st.builds(lambda n: _key(n, 4), st.integers(1, 30)),
    ]
    fields = _string_fields(cls)
    if fields:
        choices.append(
            st.builds(
                lambda message, field, bad, prefix: (
                    message.SerializeToString() + length_delimited(field, prefix.encode() + bad)
                ),
                structured,
                st.sampled_from(fields),
                st.sampled_from(_INVALID_UTF8),
                st.text(max_size=8),
            )
        )
    return st.one_of(*choices)


def structured_probes(
    structured: st.SearchStrategy[Message], *, streaming: bool = False, max_events: int = 4
) -> st.SearchStrategy[Probe]:
    """Serialized structured requests, sometimes with unknown fields and hostile metadata."""
    suffix = st.one_of(st.just(b""), st.just(b""), st.just(b""), unknown_fields)
    cancel: st.SearchStrategy[int | None] = st.one_of(st.none(), st.integers(0, max_events)) if streaming else st.none()
    return st.builds(
        lambda message, extra, md, cancel_after: Probe(
            message.SerializeToString() + extra, metadata=md, cancel_after=cancel_after
        ),
        structured,
        suffix,
        metadata,
        cancel,
    )


def raw_probes(
    cls: type[Message], structured: st.SearchStrategy[Message], *, streaming: bool = False
) -> st.SearchStrategy[Probe]:
    cancel: st.SearchStrategy[int | None] = st.one_of(st.none(), st.integers(0, 3)) if streaming else st.none()
    return st.builds(
        lambda payload, cancel_after: Probe(payload, cancel_after=cancel_after, origin="raw"),
        raw_payloads(cls, structured),
        cancel,
    )


def empty_message_probes(cls: type[Message], *, streaming: bool = False) -> st.SearchStrategy[Probe]:
    """For requests without fields, the structured fuzz is unknown fields (and metadata)."""
    del cls, streaming
    return st.builds(
        lambda extra, md: Probe(extra, metadata=md),
        st.one_of(st.just(b""), unknown_fields),
        metadata,
    )


StrategyFactory = Callable[[list[str]], st.SearchStrategy[Message]]

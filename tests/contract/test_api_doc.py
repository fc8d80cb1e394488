"""docs/api.md agrees with the protos and the code: its reference is generated from the protos, every name it
mentions exists, and its status codes and limits are the ones the services raise."""

from __future__ import annotations

import pathlib
import re

import grpc
from google.protobuf import descriptor_pool

from scripts.api_reference import API_DOC, BEGIN, END, render
from services.gen.roundtable.common.v1 import discussion_pb2
from services.gen.roundtable.session.v1 import session_pb2
from services.shared.errors import RoundtableError
from services.shared.interceptor import INSTANCE_METADATA_KEY
from services.shared.tracing import TRACE_ID_METADATA_KEY

SERVICES = pathlib.Path(__file__).resolve().parents[2] / "services"
# Codes gRPC itself produces for the public API, beside the services' own errors.
TRANSPORT_CODES = {grpc.StatusCode.DEADLINE_EXCEEDED}
PROTO_NAME = re.compile(r"\broundtable\.[a-z]+\.v\d+\.[A-Z]\w*(?:/\w+)?")
LIMIT_ARGUMENT = re.compile(r"\blimit=(.+)")
QUOTED_NAME = re.compile(r'"([a-z_]+)"')


def api_doc() -> str:
    """docs/api.md as committed."""
    return API_DOC.read_text(encoding="utf-8")


def section(title: str) -> str:
    """One `## title` section of docs/api.md, up to the next one."""
    after = api_doc().split(f"\n## {title}\n", 1)[1]
    return after.split("\n## ", 1)[0]


def first_column(text: str) -> set[str]:
    """The backticked first cells of the Markdown table rows in text."""
    return set(re.findall(r"^\| `([^`]+)` \|", text, re.MULTILINE))


def subclasses(cls: type[RoundtableError]) -> list[type[RoundtableError]]:
    """cls and every class derived from it."""
    found = [cls]
    for sub in cls.__subclasses__():
        found += subclasses(sub)
    return found


def test_reference_is_generated_from_the_protos() -> None:
    """The reference section is exactly what scripts/api_reference.py makes of the protos now."""
    text = api_doc()
    assert render(text) == text, "run: python scripts/api_reference.py --write"


def test_reference_documents_every_public_rpc_and_type_and_nothing_else() -> None:
    """Each RPC, message and enum of the public protos has its entry; no entry names something they lack."""
    reference = api_doc().split(BEGIN, 1)[1].split(END, 1)[0]
    files = (session_pb2.DESCRIPTOR, discussion_pb2.DESCRIPTOR)
    services = {service for file in files for service in file.services_by_name}
    types = {name for file in files for name in (*file.message_types_by_name, *file.enum_types_by_name)}
    headings = set(re.findall(r"^#### (\w+)$", reference, re.MULTILINE))
    assert headings == services | types
    rpcs = {method.name for method in session_pb2.DESCRIPTOR.services_by_name["SessionService"].methods}
    assert first_column(reference.split("#### SessionService", 1)[1].split("####", 1)[0]) == rpcs


def test_every_proto_name_the_doc_mentions_exists() -> None:
    """roundtable.* services, types and service/RPC paths named anywhere in the doc resolve in the protos."""
    pool = descriptor_pool.Default()
    mentioned = set(PROTO_NAME.findall(api_doc()))
    assert mentioned, "the doc names no roundtable type"
    for name in sorted(mentioned):
        service_name, _, method = name.partition("/")
        if method:
            assert pool.FindServiceByName(service_name).methods_by_name.get(method), name
            continue
        for find in (pool.FindServiceByName, pool.FindMessageTypeByName, pool.FindEnumTypeByName):
            try:
                find(name)
                break
            except KeyError:
                continue
        else:
            raise AssertionError(f"docs/api.md names {name}, which no proto defines")


def test_status_codes_are_the_ones_the_services_raise() -> None:
    """The status table lists each code a domain error maps to (and the transport's deadline), no more."""
    raised = {error.code for error in subclasses(RoundtableError)} | TRANSPORT_CODES
    documented = first_column(section("Status codes"))
    assert {name for name in documented if name.isupper()} == {code.name for code in raised}


def test_limits_are_the_ones_quota_failures_name() -> None:
    """The limits table lists every limit a RESOURCE_EXHAUSTED names in the services' code, no more."""
    named = set()
    for path in SERVICES.rglob("*.py"):
        if "gen" in path.relative_to(SERVICES).parts:
            continue
        for argument in LIMIT_ARGUMENT.findall(path.read_text(encoding="utf-8")):
            named |= set(QUOTED_NAME.findall(argument))
    documented = first_column(section("Status codes"))
    assert {name for name in documented if name.islower()} == named


def test_metadata_keys_are_the_ones_the_services_use() -> None:
    """The metadata table names the trailer the interceptor sets and the keys the servers read."""
    documented = first_column(section("Metadata"))
    assert documented == {
        "authorization",
        "x-session-id",
        INSTANCE_METADATA_KEY,
        "grpc-status-details-bin",
        "traceparent",
        TRACE_ID_METADATA_KEY,
    }

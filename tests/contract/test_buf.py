"""The contracts in protos/ pass `buf lint` (STANDARD, named exceptions) and `buf breaking` against the released
image, and an incompatible change to a copy of them is caught, naming what broke."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from tests.contract.conftest import PROTOS, RELEASED_IMAGE

SESSION_PROTO = pathlib.Path("roundtable/session/v1/session.proto")


@dataclass(frozen=True)
class Finding:
    """One problem buf reported: its rule and its message."""

    rule: str
    message: str
    path: str


def run_buf(buf: str, *args: str) -> tuple[int, list[Finding]]:
    """Run a buf check with JSON output; its exit code and findings."""
    result = subprocess.run([buf, *args, "--error-format", "json"], capture_output=True, text=True, check=False)
    findings = []
    for line in result.stdout.splitlines():
        entry = json.loads(line)
        findings.append(Finding(rule=entry["type"], message=entry["message"], path=entry["path"]))
    if result.returncode != 0 and not findings:
        pytest.fail(f"buf {' '.join(args)} failed without findings: {result.stderr}")
    return result.returncode, findings


def copy_protos(tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of protos/ (buf.yaml included) that a test may edit."""
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS, copy, ignore=shutil.ignore_patterns("released"))
    return copy


def edit(protos: pathlib.Path, proto: pathlib.Path, old: str, new: str) -> None:
    """Replace the one occurrence of `old` in a copied proto file."""
    path = protos / proto
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} must occur once in {proto}"
    path.write_text(text.replace(old, new), encoding="utf-8")


def test_protos_pass_buf_lint(buf: str) -> None:
    """The committed protos have no lint finding under the STANDARD rules and buf.yaml's exceptions."""
    code, findings = run_buf(buf, "lint", str(PROTOS))
    assert (code, findings) == (0, [])


def test_protos_keep_the_released_contract(buf: str) -> None:
    """No change since the released image breaks a client (FILE rules)."""
    code, findings = run_buf(buf, "breaking", str(PROTOS), "--against", str(RELEASED_IMAGE))
    assert (code, findings) == (0, [])


@pytest.mark.parametrize(
    ("old", "new", "rule", "named"),
    [
        pytest.param(
            "int64 token_budget = 6;",
            "int64 token_budget = 60;",
            "FIELD_NO_DELETE",
            'field "6" with name "token_budget" on message "CreateDiscussionRequest"',
            id="field-renumbered",
        ),
        pytest.param(
            "rpc GetDiscussion(GetDiscussionRequest)",
            "rpc FetchDiscussion(GetDiscussionRequest)",
            "RPC_NO_DELETE",
            'RPC "GetDiscussion" on service "SessionService"',
            id="rpc-renamed",
        ),
        pytest.param(
            "string request_id = 4;",
            "string idempotency_key = 4;",
            "FIELD_SAME_NAME",
            'Field "4" on message "CreateDiscussionRequest" changed name from "request_id" to "idempotency_key"',
            id="field-renamed",
        ),
        pytest.param(
            "int32 rounds = 3;",
            "int64 rounds = 3;",
            "FIELD_SAME_TYPE",
            'Field "3" with name "rounds" on message "CreateDiscussionRequest" changed type from "int32" to "int64"',
            id="field-type-changed",
        ),
        pytest.param(
            "  DISCUSSION_STATUS_INTERRUPTED = 7;\n",
            "",
            "ENUM_VALUE_NO_DELETE",
            'enum value "7" on enum "DiscussionStatus"',
            id="enum-value-deleted",
        ),
    ],
)
def test_an_incompatible_change_fails_buf_breaking(
    buf: str, tmp_path: pathlib.Path, old: str, new: str, rule: str, named: str
) -> None:
    """Renumbering, renaming or retyping what clients rely on fails `buf breaking`, naming the field or RPC."""
    protos = copy_protos(tmp_path)
    edit(protos, SESSION_PROTO, old, new)
    code, findings = run_buf(buf, "breaking", str(protos), "--against", str(RELEASED_IMAGE))
    assert code != 0
    flagged = [finding for finding in findings if finding.rule == rule]
    assert len(flagged) == 1, findings
    assert named in flagged[0].message
    assert flagged[0].path.endswith(str(SESSION_PROTO))


def test_an_added_field_keeps_the_contract(buf: str, tmp_path: pathlib.Path) -> None:
    """An additive change (a new field under a new number) passes: the check guards, it does not freeze."""
    protos = copy_protos(tmp_path)
    message = "message DeleteDiscussionRequest {\n"
    edit(protos, SESSION_PROTO, message, message + "  bool keep_logs = 2;\n")
    code, findings = run_buf(buf, "breaking", str(protos), "--against", str(RELEASED_IMAGE))
    assert (code, findings) == (0, [])


def test_lint_applies_the_standard_rules(buf: str, tmp_path: pathlib.Path) -> None:
    """A field named against the STANDARD rules fails lint, naming the rule."""
    protos = copy_protos(tmp_path)
    edit(protos, SESSION_PROTO, "int64 after_sequence = 2;", "int64 afterSequence = 2;")
    code, findings = run_buf(buf, "lint", str(protos))
    assert code != 0
    assert [finding.rule for finding in findings] == ["FIELD_LOWER_SNAKE_CASE"]
    assert "afterSequence" in findings[0].message


def test_lint_exceptions_do_not_reach_new_files(buf: str, tmp_path: pathlib.Path) -> None:
    """The response-name exception covers only the files that shipped: a new service must follow the rule."""
    protos = copy_protos(tmp_path)
    new_proto = protos / "roundtable" / "session" / "v2" / "session.proto"
    new_proto.parent.mkdir()
    new_proto.write_text(
        'syntax = "proto3";\n\n'
        "// A later version of the public API.\n"
        "package roundtable.session.v2;\n\n"
        "// Reads discussions.\n"
        "service SessionService {\n"
        "  // Returns one discussion.\n"
        "  rpc GetDiscussion(GetDiscussionRequest) returns (Discussion);\n"
        "}\n\n"
        "// Names the discussion.\n"
        "message GetDiscussionRequest {\n  string discussion_id = 1;\n}\n\n"
        "// The discussion.\n"
        "message Discussion {\n  string discussion_id = 1;\n}\n",
        encoding="utf-8",
    )
    code, findings = run_buf(buf, "lint", str(protos))
    assert code != 0
    assert [finding.rule for finding in findings] == ["RPC_RESPONSE_STANDARD_NAME"]
    assert findings[0].path.endswith("roundtable/session/v2/session.proto")

"""Print (or, with --write, put into docs/api.md) the public API's reference, built from its protos and comments."""

from __future__ import annotations

import pathlib
import sys
import tempfile
from collections.abc import Iterator

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
API_DOC = ROOT / "docs" / "api.md"
BEGIN, END = "<!-- reference:begin -->", "<!-- reference:end -->"
# The public contract: this file and the roundtable files it imports. The rest of protos/ is internal.
PUBLIC_PROTO = "roundtable/session/v1/session.proto"

# Field numbers of descriptor.proto, for the paths in SourceCodeInfo.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_ENUM_VALUE, _SERVICE_METHOD = 2, 2

_SCALAR_TYPES = {
    number: name.removeprefix("TYPE_").lower()
    for name, number in descriptor_pb2.FieldDescriptorProto.Type.items()
    if name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}


def public_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """The public proto file and the roundtable files it imports, dependencies first, with their comments."""
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as scratch:
        out = pathlib.Path(scratch) / "public.binpb"
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                "--include_imports",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                PUBLIC_PROTO,
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on {PUBLIC_PROTO} (exit {code})")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return [file for file in files if file.name.startswith("roundtable/")]


def _comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """Leading comments by descriptor path, each joined into one line."""
    found = {}
    for location in file.source_code_info.location:
        text = " ".join(line.strip() for line in location.leading_comments.splitlines() if line.strip())
        if text:
            found[tuple(location.path)] = text
    return found


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def _link(full_name: str, local: set[str]) -> str:
    """A type reference: a link to its section when documented here, else its full name."""
    name = full_name.lstrip(".")
    short = name.rsplit(".", 1)[-1]
    return f"[{short}](#{short.lower()})" if name in local else f"`{name}`"


def _field_type(field: descriptor_pb2.FieldDescriptorProto, local: set[str]) -> str:
    kind = _link(field.type_name, local) if field.type_name else _SCALAR_TYPES[field.type]
    if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        return f"repeated {kind}"
    return kind


def _check_flat(file: descriptor_pb2.FileDescriptorProto) -> None:
    """Nested types would need their own sections: refuse them rather than leave them out silently."""
    for message in file.message_type:
        if message.nested_type or message.enum_type:
            raise NotImplementedError(f"{file.name}: {message.name} has nested types; document them first")


def _service_sections(
    file: descriptor_pb2.FileDescriptorProto, comments: dict[tuple[int, ...], str], local: set[str]
) -> Iterator[str]:
    for index, service in enumerate(file.service):
        yield f"#### {service.name}"
        yield ""
        yield f"`{file.package}.{service.name}`: {comments.get((_FILE_SERVICE, index), '')}".rstrip(": ")
        yield ""
        yield "| RPC | request | response | what it does |"
        yield "|---|---|---|---|"
        for method_index, method in enumerate(service.method):
            request = ("stream " if method.client_streaming else "") + _link(method.input_type, local)
            response = ("stream " if method.server_streaming else "") + _link(method.output_type, local)
            meaning = comments.get((_FILE_SERVICE, index, _SERVICE_METHOD, method_index), "")
            yield f"| `{method.name}` | {request} | {response} | {_cell(meaning)} |"
        yield ""


def _message_sections(
    file: descriptor_pb2.FileDescriptorProto, comments: dict[tuple[int, ...], str], local: set[str]
) -> Iterator[str]:
    for index, message in enumerate(file.message_type):
        yield f"#### {message.name}"
        yield ""
        summary = comments.get((_FILE_MESSAGE, index), "")
        yield f"`{file.package}.{message.name}`" + (f": {summary}" if summary else "")
        yield ""
        if not message.field:
            yield "No fields."
            yield ""
            continue
        yield "| # | field | type | meaning |"
        yield "|---|---|---|---|"
        for field_index, field in enumerate(message.field):
            meaning = comments.get((_FILE_MESSAGE, index, _MESSAGE_FIELD, field_index), "")
            if field.HasField("oneof_index") and not field.proto3_optional:
                oneof = message.oneof_decl[field.oneof_index].name
                meaning = f"One of `{oneof}`. {meaning}".strip()
            yield f"| {field.number} | `{field.name}` | {_field_type(field, local)} | {_cell(meaning)} |"
        yield ""


def _enum_sections(file: descriptor_pb2.FileDescriptorProto, comments: dict[tuple[int, ...], str]) -> Iterator[str]:
    for index, enum in enumerate(file.enum_type):
        yield f"#### {enum.name}"
        yield ""
        summary = comments.get((_FILE_ENUM, index), "")
        yield f"`{file.package}.{enum.name}`" + (f": {summary}" if summary else "")
        yield ""
        yield "| value | number | meaning |"
        yield "|---|---|---|"
        for value_index, value in enumerate(enum.value):
            meaning = comments.get((_FILE_ENUM, index, _ENUM_VALUE, value_index), "")
            yield f"| `{value.name}` | {value.number} | {_cell(meaning)} |"
        yield ""


def reference() -> str:
    """The Markdown reference: services, then messages and enums of each public file."""
    files = public_files()
    local = set()
    for file in files:
        _check_flat(file)
        local |= {f"{file.package}.{message.name}" for message in file.message_type}
        local |= {f"{file.package}.{enum.name}" for enum in file.enum_type}
    short_names = [name.rsplit(".", 1)[-1] for name in local]
    duplicated = sorted({name for name in short_names if short_names.count(name) > 1})
    if duplicated:
        raise NotImplementedError(f"types share a short name (their sections would collide): {duplicated}")
    lines = ["Generated from the protos and their comments by `python scripts/api_reference.py --write`.", ""]
    public_first = sorted(files, key=lambda file: file.name != PUBLIC_PROTO)
    for file in public_first:
        comments = _comments(file)
        lines += [f"### `{file.package}` ({file.name})", ""]
        lines += _service_sections(file, comments, local)
        lines += _message_sections(file, comments, local)
        lines += _enum_sections(file, comments)
    return "\n".join(lines).rstrip("\n")


def render(document: str) -> str:
    """docs/api.md's text with the reference between the markers replaced."""
    head, rest = document.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{reference()}\n{END}{tail}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        API_DOC.write_text(render(API_DOC.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(reference())

"""The gRPC half of the API reference: the contract's comments, checked and rendered.

No maintained generator of documentation from .proto files installs from PyPI
(docs/reference.md), so this reads what protoc itself writes: the same
``grpc_tools.protoc`` that ``make protos`` runs produces a ``FileDescriptorSet`` with
``--include_source_info``, whose ``SourceCodeInfo`` carries each element's comments.
:func:`read_contract` names every element without one; :func:`render_protos` writes one
HTML page per package.
"""

from __future__ import annotations

import html
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent.parent / "protos"

# Field numbers in descriptor.proto, the path SourceCodeInfo gives each comment.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE, _FILE_SYNTAX, _FILE_PACKAGE = 4, 5, 6, 12, 2
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM, _MESSAGE_ONEOF = 2, 3, 4, 8
_ENUM_VALUE, _SERVICE_METHOD = 2, 2
_SCALARS = {
    number: name.removeprefix("TYPE_").lower()
    for name, number in descriptor_pb2.FieldDescriptorProto.Type.items()
}


@dataclass
class Element:
    """One documented element of the contract: its kind, full name, comment and parts."""

    kind: str
    name: str
    comment: str
    #: A field: its type as written (``repeated cuga.common.v1.PlanStep``); an RPC: request
    #: and response; a value or a field: its number.
    detail: str = ""
    number: int | None = None
    #: The full names of the messages and enums ``detail`` refers to, linked on the page.
    refs: list[str] = field(default_factory=list)
    parts: list[Element] = field(default_factory=list)


@dataclass
class Contract:
    """The gRPC contract: its packages' elements and every element's comment by name."""

    packages: dict[str, list[Element]] = field(default_factory=dict)
    headers: dict[str, list[str]] = field(default_factory=dict)
    comments: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def proto_descriptors(protos: Path = PROTOS) -> descriptor_pb2.FileDescriptorSet:
    """The contract's descriptors with their comments, compiled by grpcio-tools' protoc."""
    include = Path(protoc.__file__).parent / "_proto"
    files = [str(p.relative_to(protos)) for p in sorted(protos.glob("**/*.proto"))]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "contract.pb"
        args = ["grpc_tools.protoc", f"-I{protos}", f"-I{include}", "--include_source_info"]
        if protoc.main([*args, f"--descriptor_set_out={out}", *files]) != 0:
            raise SystemExit(f"protoc failed on {protos}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def read_contract(files: descriptor_pb2.FileDescriptorSet) -> Contract:
    """Every package, service, RPC, message, field, oneof, enum and value with its comment;
    ``problems`` names each without one (a comment before it, or after it on its line)."""
    contract = Contract()
    for file in files.file:
        comments = {tuple(loc.path): loc for loc in file.source_code_info.location}

        def comment(path: Sequence[int], comments: Any = comments) -> str:
            loc = comments.get(tuple(path))
            if loc is None:
                return ""
            text = loc.leading_comments.strip() or loc.trailing_comments.strip()
            return "\n".join(line.strip() for line in text.splitlines())

        def add(element: Element, file_name: str = file.name) -> Element:
            contract.comments[element.name] = element.comment
            if not element.comment:
                problem = f"{element.kind} {element.name} ({file_name}) has no comment"
                contract.problems.append(problem)
            return element

        elements = contract.packages.setdefault(file.package, [])
        header = _file_header(comments)
        contract.headers.setdefault(file.package, []).append(header)
        if not header:
            contract.problems.append(f"file {file.name} has no comment saying what it holds")
        for i, service in enumerate(file.service):
            path = [_FILE_SERVICE, i]
            full = f"{file.package}.{service.name}"
            svc = add(Element("service", full, comment(path)))
            for j, rpc in enumerate(service.method):
                request, response = rpc.input_type.lstrip("."), rpc.output_type.lstrip(".")
                detail = (
                    f"({'stream ' if rpc.client_streaming else ''}{request}) returns "
                    f"({'stream ' if rpc.server_streaming else ''}{response})"
                )
                rpc_el = Element(
                    "rpc",
                    f"{full}.{rpc.name}",
                    comment([*path, _SERVICE_METHOD, j]),
                    detail,
                    refs=[request, response],
                )
                svc.parts.append(add(rpc_el))
            elements.append(svc)
        for i, message in enumerate(file.message_type):
            _message(message, [_FILE_MESSAGE, i], file.package, comment, add, elements)
        for i, enum in enumerate(file.enum_type):
            elements.append(_enum(enum, [_FILE_ENUM, i], file.package, comment, add))
    return contract


def _file_header(comments: dict[tuple[int, ...], Any]) -> str:
    for path in ((_FILE_SYNTAX,), (_FILE_PACKAGE,)):
        loc = comments.get(path)
        if loc is None:
            continue
        for text in (*loc.leading_detached_comments, loc.leading_comments):
            if text.strip():
                return "\n".join(line.strip() for line in text.strip().splitlines())
    return ""


def _message(
    message: descriptor_pb2.DescriptorProto,
    path: list[int],
    scope: str,
    comment: Any,
    add: Any,
    into: list[Element],
) -> None:
    if message.options.map_entry:
        return  # map<K, V>: shown as the field's type
    full = f"{scope}.{message.name}"
    element = add(Element("message", full, comment(path)))
    maps = {
        f"{full}.{nested.name}": nested
        for nested in message.nested_type
        if nested.options.map_entry
    }
    oneofs = [o.name for o in message.oneof_decl]
    for i, oneof in enumerate(message.oneof_decl):
        if any(
            f.HasField("oneof_index") and f.proto3_optional
            for f in message.field
            if f.oneof_index == i
        ):
            continue  # a proto3 `optional`'s synthetic oneof
        oneof_el = Element("oneof", f"{full}.{oneof.name}", comment([*path, _MESSAGE_ONEOF, i]))
        element.parts.append(add(oneof_el))
    for i, fld in enumerate(message.field):
        type_text, refs = _field_type(fld, maps)
        if fld.HasField("oneof_index") and not fld.proto3_optional:
            type_text = f"{type_text} (oneof {oneofs[fld.oneof_index]})"
        field_el = Element(
            "field",
            f"{full}.{fld.name}",
            comment([*path, _MESSAGE_FIELD, i]),
            type_text,
            fld.number,
            refs,
        )
        element.parts.append(add(field_el))
    into.append(element)
    for i, nested in enumerate(message.nested_type):
        _message(nested, [*path, _MESSAGE_NESTED, i], full, comment, add, into)
    for i, enum in enumerate(message.enum_type):
        into.append(_enum(enum, [*path, _MESSAGE_ENUM, i], full, comment, add))


def _field_type(
    fld: descriptor_pb2.FieldDescriptorProto, maps: dict[str, descriptor_pb2.DescriptorProto]
) -> tuple[str, list[str]]:
    def one(f: descriptor_pb2.FieldDescriptorProto) -> tuple[str, list[str]]:
        if f.type_name:
            name = f.type_name.lstrip(".")
            return name, [name]
        return _SCALARS[f.type], []

    entry = maps.get(fld.type_name.lstrip("."))
    if entry is not None:
        (key, _), (value, refs) = one(entry.field[0]), one(entry.field[1])
        return f"map<{key}, {value}>", refs
    text, refs = one(fld)
    label = descriptor_pb2.FieldDescriptorProto
    if fld.label == label.LABEL_REPEATED:
        text = f"repeated {text}"
    elif fld.proto3_optional:
        text = f"optional {text}"
    return text, refs


def _enum(
    enum: descriptor_pb2.EnumDescriptorProto,
    path: list[int],
    scope: str,
    comment: Any,
    add: Any,
) -> Element:
    full = f"{scope}.{enum.name}"
    element = add(Element("enum", full, comment(path)))
    for i, value in enumerate(enum.value):
        value_el = Element(
            "enum value",
            f"{full}.{value.name}",
            comment([*path, _ENUM_VALUE, i]),
            number=value.number,
        )
        element.parts.append(add(value_el))
    return element


_STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
code{font:13px ui-monospace,monospace;background:#f3f3f3;padding:0 .2em}
section{border-top:1px solid #ddd;margin-top:1.5rem}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #eee;padding:.3em;
vertical-align:top;text-align:left}td:first-child{width:16rem}.comment{white-space:pre-line}
"""


def render_protos(contract: Contract, out: Path) -> None:
    """One page per package (``<package>.html``, an anchor per name inside it) and an index."""
    out.mkdir(parents=True, exist_ok=True)
    package_of = {
        element.name: package
        for package, elements in contract.packages.items()
        for element in elements
    }

    def ref(text: str, refs: list[str], package: str) -> str:
        shown = html.escape(text)
        for name in sorted(set(refs), key=len, reverse=True):
            target = package_of.get(name)
            if target is None:  # google.protobuf.*: documented by Protocol Buffers
                continue
            local = name.removeprefix(f"{target}.")
            href = f"#{local}" if target == package else f"{target}.html#{local}"
            shown = shown.replace(
                html.escape(name), f'<a href="{html.escape(href)}">{html.escape(name)}</a>', 1
            )
        return f"<code>{shown}</code>"

    def text(comment: str) -> str:
        return f'<div class="comment">{html.escape(comment)}</div>'

    index = ["<h1>gRPC contract</h1>", '<p><a href="../index.html">API reference</a></p>', "<ul>"]
    for package, elements in sorted(contract.packages.items()):
        headers = "\n\n".join(h for h in contract.headers[package] if h)
        index.append(f'<li><a href="{package}.html">{package}</a>: {html.escape(headers)}</li>')
        body = [
            f"<h1>{package}</h1>",
            '<p><a href="index.html">all packages</a></p>',
            text(headers),
        ]
        for element in elements:
            anchor = html.escape(element.name.removeprefix(f"{package}."))
            full = html.escape(element.name)
            body.append(f'<section id="{anchor}"><h2>{element.kind} <code>{full}</code></h2>')
            body.append(text(element.comment))
            if element.parts:
                body.append("<table>")
                for part in element.parts:
                    short = html.escape(part.name.rpartition(".")[2])
                    number = "" if part.number is None else f" = {part.number}"
                    detail = ref(part.detail, part.refs, package) if part.detail else ""
                    body.append(
                        f'<tr id="{html.escape(part.name.removeprefix(f"{package}."))}">'
                        f"<td>{part.kind} <code>{short}</code>"
                        f"{number}</td><td>{detail}{text(part.comment)}</td></tr>"
                    )
                body.append("</table>")
            body.append("</section>")
        write_page(out / f"{package}.html", package, body)
    index.append("</ul>")
    write_page(out / "index.html", "gRPC contract", index)


def write_page(path: Path, title: str, body: list[str]) -> None:
    """A standalone HTML page: ``body``'s parts under ``title``, in the contract's style."""
    path.write_text(
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}"
        f"</title><style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n",
        encoding="utf-8",
    )

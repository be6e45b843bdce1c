"""Load a proto2 ``.proto`` file into protobuf message classes without ``protoc``.

Why not a generated ``caffe_pb2.py``: generated code is tied to the protoc version that wrote
it (protobuf 4+ refuses gencode newer than the runtime and warns on older), and ``protoc`` is
not a dependency of this project. A ``FileDescriptorProto`` built at import time only uses the
stable descriptor API of the runtime, so the schema lives in one readable file
(``caffe.proto``) and works with any protobuf >= 4 in a clean environment.

The parser covers the subset of proto2 that such schemas use: ``syntax``, ``package``,
``message`` (nested), ``enum`` (nested), ``optional/required/repeated`` scalar, enum and message
fields with ``[default = ...]`` and ``[packed = true]``, and comments. Anything else is an error
(a ``ValueError`` naming the line), so a schema edit cannot be misread silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["load_proto"]

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<comment>//[^\n]*|/\*.*?\*/)
      | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<word>[A-Za-z_][A-Za-z0-9_.]*|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
      | (?P<punct>[{}\[\]=;,])
    )""",
    re.VERBOSE | re.DOTALL,
)

_SCALARS = {
    "double": descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
    "float": descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
    "uint64": descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
    "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
    "uint32": descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
    "sint32": descriptor_pb2.FieldDescriptorProto.TYPE_SINT32,
    "sint64": descriptor_pb2.FieldDescriptorProto.TYPE_SINT64,
    "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    "bytes": descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
}
_LABELS = {
    "optional": descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    "required": descriptor_pb2.FieldDescriptorProto.LABEL_REQUIRED,
    "repeated": descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
}


@dataclass
class _Tok:
    kind: str
    text: str
    line: int


def _tokenize(src: str, path: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(src):
        if src[pos:].strip() == "":
            break
        m = _TOKEN.match(src, pos)
        if m is None:
            line = src.count("\n", 0, pos) + 1
            raise ValueError(f"{path}:{line}: cannot parse {src[pos : pos + 20]!r}")
        kind = m.lastgroup or ""
        if kind != "comment":
            text = m.group(kind)
            toks.append(_Tok(kind, text, src.count("\n", 0, m.start(kind)) + 1))
        pos = m.end()
    return toks


@dataclass
class _Scope:
    full_name: str  # ".caffe.LayerParameter"
    proto: descriptor_pb2.DescriptorProto | descriptor_pb2.FileDescriptorProto
    pending: list[tuple[descriptor_pb2.FieldDescriptorProto, str, int]] = field(
        default_factory=list
    )


class _Parser:
    def __init__(self, toks: list[_Tok], path: str) -> None:
        self.toks = toks
        self.i = 0
        self.path = path
        self.enums: set[str] = set()
        self.messages: set[str] = set()
        self.unresolved: list[tuple[descriptor_pb2.FieldDescriptorProto, str, str, int]] = []

    def error(self, msg: str, tok: _Tok | None = None) -> ValueError:
        tok = tok or (self.toks[self.i] if self.i < len(self.toks) else None)
        where = f"{self.path}:{tok.line}" if tok else f"{self.path}: end of file"
        return ValueError(f"{where}: {msg}")

    def next(self) -> _Tok:
        if self.i >= len(self.toks):
            raise self.error("unexpected end of file")
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expect(self, text: str) -> None:
        tok = self.next()
        if tok.text != text:
            raise self.error(f"expected {text!r}, got {tok.text!r}", tok)

    def parse_file(self) -> descriptor_pb2.FileDescriptorProto:
        fdp = descriptor_pb2.FileDescriptorProto(name="caffe_converter_schema.proto")
        fdp.syntax = "proto2"
        package = ""
        while self.i < len(self.toks):
            tok = self.next()
            if tok.text == "syntax":
                self.expect("=")
                value = self.next().text.strip("\"'")
                if value != "proto2":
                    raise self.error(f"only proto2 is supported, got {value!r}", tok)
                self.expect(";")
            elif tok.text == "package":
                package = self.next().text
                fdp.package = package
                self.expect(";")
            elif tok.text == "message":
                self.parse_message(fdp.message_type.add(), f".{package}")
            elif tok.text == "enum":
                self.parse_enum(fdp.enum_type.add(), f".{package}")
            else:
                raise self.error(f"unexpected {tok.text!r} at file level", tok)
        self.resolve()
        return fdp

    def parse_enum(self, enum: descriptor_pb2.EnumDescriptorProto, scope: str) -> None:
        enum.name = self.next().text
        self.enums.add(f"{scope}.{enum.name}")
        self.expect("{")
        while True:
            tok = self.next()
            if tok.text == "}":
                return
            self.expect("=")
            number = self.next()
            try:
                value = int(number.text)
            except ValueError:
                raise self.error(f"bad enum value {number.text!r}", number) from None
            enum.value.add(name=tok.text, number=value)
            self.expect(";")

    def parse_message(self, msg: descriptor_pb2.DescriptorProto, scope: str) -> None:
        msg.name = self.next().text
        full = f"{scope}.{msg.name}"
        self.messages.add(full)
        self.expect("{")
        while True:
            tok = self.next()
            if tok.text == "}":
                return
            if tok.text == "message":
                self.parse_message(msg.nested_type.add(), full)
            elif tok.text == "enum":
                self.parse_enum(msg.enum_type.add(), full)
            elif tok.text in _LABELS:
                self.parse_field(msg.field.add(), _LABELS[tok.text], full)
            else:
                raise self.error(f"unexpected {tok.text!r} in message {msg.name}", tok)

    def parse_field(self, f: descriptor_pb2.FieldDescriptorProto, label: int, scope: str) -> None:
        type_tok = self.next()
        f.label = label  # type: ignore[assignment]
        f.name = self.next().text
        self.expect("=")
        num_tok = self.next()
        try:
            f.number = int(num_tok.text)
        except ValueError:
            raise self.error(f"bad field number {num_tok.text!r}", num_tok) from None
        if type_tok.text in _SCALARS:
            f.type = _SCALARS[type_tok.text]  # type: ignore[assignment]
        else:
            self.unresolved.append((f, type_tok.text, scope, type_tok.line))
        tok = self.next()
        if tok.text == "[":
            while True:
                opt = self.next().text
                self.expect("=")
                value = self.next()
                if opt == "default":
                    text = value.text
                    if value.kind == "string":
                        text = text[1:-1]
                    f.default_value = text
                elif opt == "packed":
                    f.options.packed = value.text == "true"
                else:
                    raise self.error(f"unsupported field option {opt!r}", value)
                sep = self.next().text
                if sep == "]":
                    break
                if sep != ",":
                    raise self.error(f"expected ',' or ']', got {sep!r}")
            tok = self.next()
        if tok.text != ";":
            raise self.error(f"expected ';' after field {f.name}, got {tok.text!r}", tok)

    def resolve(self) -> None:
        # proto scoping: look the name up from the innermost enclosing scope outwards.
        for f, name, scope, line in self.unresolved:
            parts = scope.split(".")
            for n in range(len(parts), 0, -1):
                candidate = ".".join([*parts[:n], name])
                if candidate in self.messages:
                    f.type = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE  # type: ignore[assignment]
                    f.type_name = candidate
                    break
                if candidate in self.enums:
                    f.type = descriptor_pb2.FieldDescriptorProto.TYPE_ENUM  # type: ignore[assignment]
                    f.type_name = candidate
                    break
            else:
                raise ValueError(f"{self.path}:{line}: unknown type {name!r} of field {f.name}")


def load_proto(path: str, source: str | None = None) -> dict[str, Any]:
    """Parse a proto2 file and return its message classes by full name (``"caffe.BlobProto"``)."""
    if source is None:
        with open(path, encoding="utf-8") as fh:
            source = fh.read()
    fdp = _Parser(_tokenize(source, path), path).parse_file()
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    file_desc = pool.FindFileByName(fdp.name)
    classes: dict[str, Any] = {}

    def collect(desc: Any) -> None:
        classes[desc.full_name] = message_factory.GetMessageClass(desc)
        for nested in desc.nested_types:
            collect(nested)

    for desc in file_desc.message_types_by_name.values():
        collect(desc)
    return classes

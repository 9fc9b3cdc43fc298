"""OTLP's trace messages (opentelemetry-proto's ExportTraceServiceRequest), written
straight to protobuf's wire format.

Why by hand: building the request from opentelemetry-proto's message classes cost about
15 us per span here, a KeyValue and an AnyValue object per attribute; writing the bytes
costs about 5 us (a stage's span 2 us). At about 17 spans per task that is a sixth of a
millisecond per image, on the same cores as the daemon (docs/benchmark.md, "What
tracing costs").

Only the fields spans.py sets are written; each function names the message it encodes,
and tests/test_spans.py checks the result against the real protobuf parser, through the
OTLP receiver. Field numbers: opentelemetry/proto/trace/v1/trace.proto and
common/v1/common.proto.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Any

_fixed64 = struct.Struct("<Q").pack
_double = struct.Struct("<d").pack


def varint(n: int) -> bytes:
    if n < 0:  # int64: two's complement, ten bytes
        n += 1 << 64
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: a string, bytes or a nested message."""
    return tag + varint(len(payload)) + payload


_texts: dict[tuple[bytes, str], bytes] = {}


def text_field(tag: bytes, text: str) -> bytes:
    """A string field whose text repeats (attribute keys, span names): encoded once.
    Bounded all the same, in case some caller makes its names up as it goes."""
    encoded = _texts.get((tag, text))
    if encoded is None:
        encoded = field(tag, text.encode())
        if len(_texts) < 4096:
            _texts[(tag, text)] = encoded
    return encoded


def any_value(value: Any) -> bytes:
    """AnyValue: string 1, bool 2, int64 3, double 4, ArrayValue 5."""
    if isinstance(value, str):
        return field(b"\x0a", value.encode())
    if isinstance(value, bool):  # before int: a bool is an int
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value)
    if isinstance(value, float):
        return b"\x21" + _double(value)
    if isinstance(value, list | tuple):  # ArrayValue: repeated AnyValue values = 1
        return field(b"\x2a", b"".join(field(b"\x0a", any_value(v)) for v in value))
    return field(b"\x0a", str(value).encode())


def key_values(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    """Repeated KeyValue (key 1, value 2) under `tag`."""
    if not attributes:
        return b""
    return b"".join(
        field(tag, text_field(b"\x0a", k) + field(b"\x12", any_value(v)))
        for k, v in attributes.items()
    )


def span(
    trace_id: bytes,
    span_id: bytes,
    parent_id: bytes,
    name: str,
    kind: int,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, Any],
    events: Iterable[tuple[str, int, Mapping[str, Any] | None]] = (),
    links: Iterable[tuple[bytes, bytes, Mapping[str, Any] | None]] = (),
    status: tuple[int, str] | None = None,
) -> bytes:
    """Span: trace_id 1, span_id 2, parent_span_id 4, name 5, kind 6, start 7, end 8,
    attributes 9, events 11 (time 1, name 2, attributes 3), links 13 (trace_id 1,
    span_id 2, attributes 4), status 15 (message 2, code 3)."""
    out = [
        b"\x0a\x10",
        trace_id,
        b"\x12\x08",
        span_id,
        b"\x22\x08" + parent_id if parent_id else b"",
        text_field(b"\x2a", name),
        b"\x30" + varint(kind),
        b"\x39" + _fixed64(start_ns),
        b"\x41" + _fixed64(end_ns),
        key_values(b"\x4a", attributes),
    ]
    for event_name, at, event_attributes in events:
        body = b"\x09" + _fixed64(at) + field(b"\x12", event_name.encode())
        out.append(field(b"\x5a", body + key_values(b"\x1a", event_attributes)))
    for link_trace, link_span, link_attributes in links:
        body = b"\x0a\x10" + link_trace + b"\x12\x08" + link_span
        out.append(field(b"\x6a", body + key_values(b"\x22", link_attributes)))
    if status is not None:
        code, message = status
        out.append(
            field(
                b"\x7a",
                (field(b"\x12", message.encode()) if message else b"") + b"\x18" + varint(code),
            )
        )
    return b"".join(out)


def resource(attributes: Mapping[str, Any]) -> bytes:
    """Resource: attributes 1."""
    return key_values(b"\x0a", attributes)


def request(resource_: bytes, scopes: Mapping[tuple[str, str], list[bytes]]) -> bytes:
    """ExportTraceServiceRequest: one ResourceSpans (resource 1, scope_spans 2), a
    ScopeSpans (scope 1: name 1, version 2; spans 2) per instrumentation scope."""
    scope_spans = b"".join(
        field(
            b"\x12",
            field(b"\x0a", field(b"\x0a", name.encode()) + field(b"\x12", version.encode()))
            + b"".join(field(b"\x12", s) for s in spans),
        )
        for (name, version), spans in scopes.items()
    )
    return field(b"\x0a", field(b"\x0a", resource_) + scope_spans)

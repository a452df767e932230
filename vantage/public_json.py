"""Protobuf messages in the public JSON shape, and back: one converter for every surface.

The CLI's ``--json`` output and the coordinator's JSON API (``/api/v1/``) render
messages with ``message_json``; JSON requests become messages with ``message_from_json``.
The shape is the one of ARCHITECTURE.md ("Public surface"):

- field names as in the .proto files (snake_case), every field present;
- enum values in lower case without their type's prefix (``VERDICT_STATE_GLOBAL`` is
  ``"global"``, ``FAILURE_CLASS_CONNECT_TIMEOUT`` is ``"connect_timeout"``), and the
  zero value (``*_UNSPECIFIED``: none) ``null``;
- timestamps in RFC 3339, UTC, to the second (``"2026-11-26T10:00:02Z"``); ``null``
  when unset;
- a message field that is not set (the other members of a oneof, say) and an unset
  ``optional`` scalar are ``null``;
- maps are objects with sorted keys; 64-bit integers are JSON numbers.

Fields may be added to this shape; none is renamed or removed.

Exceptions: ``JsonShapeError`` (a ``ValueError``; one line naming the field).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import cache
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

M = TypeVar("M", bound=Message)
_TIMESTAMP = Timestamp.DESCRIPTOR.full_name
_Render = Callable[[Any], Any]


class JsonShapeError(ValueError):
    """JSON that does not fit the message; ``str()`` is one line naming the field."""


# -- enums and timestamps -----------------------------------------------------------------


@cache
def _enum_prefix(enum: EnumDescriptor) -> str:
    """VerdictState -> 'VERDICT_STATE_'."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


@cache
def enum_names(enum: EnumDescriptor) -> dict[int, str]:
    """Every value but the zero one, by number: {5: 'global', ...} for VerdictState."""
    prefix = _enum_prefix(enum)
    return {
        value.number: value.name.removeprefix(prefix).lower()
        for value in enum.values
        if value.number != 0
    }


@cache
def _enum_numbers(enum: EnumDescriptor) -> dict[str, int]:
    return {name: number for number, name in enum_names(enum).items()}


def enum_text(enum: EnumDescriptor, number: int) -> str | None:
    """The public name of an enum value; None for the zero value (none). A number the
    descriptor does not know (a newer peer) reads as its digits."""
    if number == 0:
        return None
    return enum_names(enum).get(number, str(number))


def timestamp_text(stamp: Timestamp) -> str | None:
    """RFC 3339 in UTC with a Z, to the second; None when unset (zero)."""
    if stamp.seconds == 0 and stamp.nanos == 0:
        return None
    moment = datetime.fromtimestamp(stamp.seconds, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- rendering ---------------------------------------------------------------------------


def message_json(message: Message) -> dict[str, Any]:
    """``message`` in the public JSON shape (a dict ready for ``json.dumps``)."""
    return {name: render(message) for name, render in _plan(message.DESCRIPTOR)}


@cache
def _plan(descriptor: Descriptor) -> tuple[tuple[str, _Render], ...]:
    """Per field, how to read and render it: worked out once per message type."""
    return tuple((field.name, _field_renderer(field)) for field in descriptor.fields)


def _field_renderer(field: FieldDescriptor) -> _Render:
    name = field.name
    kind = _kind(field)
    if kind == "map":
        value = _value_renderer(_message(field).fields_by_name["value"])
        return lambda message: {
            key: value(item) for key, item in sorted(getattr(message, name).items())
        }
    single = _value_renderer(field)
    if field.is_repeated:
        return lambda message: [single(item) for item in getattr(message, name)]
    if kind == "message" or (field.has_presence and kind != "timestamp"):
        # Unset messages, proto3 `optional` scalars and unset oneof members: null.
        return lambda message: single(getattr(message, name)) if message.HasField(name) else None
    return lambda message: single(getattr(message, name))


def _value_renderer(field: FieldDescriptor) -> _Render:
    kind = _kind(field)
    if kind == "enum":
        enum = _enum(field)
        return lambda number: enum_text(enum, number)
    if kind == "timestamp":
        return timestamp_text
    if kind == "message":
        return message_json
    if kind == "bytes":
        return lambda data: base64.b64encode(data).decode()
    return _same


def _same(value: Any) -> Any:
    return value


def _kind(field: FieldDescriptor) -> str:
    """map, timestamp, message, enum, bytes or scalar."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        message = _message(field)
        if message.GetOptions().map_entry:
            return "map"
        return "timestamp" if message.full_name == _TIMESTAMP else "message"
    if field.type == FieldDescriptor.TYPE_ENUM:
        return "enum"
    return "bytes" if field.type == FieldDescriptor.TYPE_BYTES else "scalar"


def _message(field: FieldDescriptor) -> Descriptor:
    assert field.message_type is not None, field.full_name
    return field.message_type


def _enum(field: FieldDescriptor) -> EnumDescriptor:
    assert field.enum_type is not None, field.full_name
    return field.enum_type


# -- parsing -----------------------------------------------------------------------------


def message_from_json(data: Any, message_type: type[M]) -> M:
    """A ``message_type`` from JSON in the public shape (``null``: unset).

    Field names are the snake_case ones; enum values the lower-case public names;
    timestamps RFC 3339. ``JsonShapeError`` (one line naming the field) for anything
    else: an unknown field, a wrong type, an enum value that does not exist.
    """
    descriptor: Descriptor = message_type.DESCRIPTOR  # type: ignore[assignment]
    proto_json = _to_proto_json(data, descriptor, "")
    message = message_type()
    try:
        json_format.ParseDict(proto_json, message)
    except json_format.ParseError as exc:
        raise JsonShapeError(_parse_error_text(str(exc))) from None
    return message


def _to_proto_json(data: Any, descriptor: Descriptor, where: str) -> dict[str, Any]:
    """The public shape rewritten for ``json_format``: enum names in full, nulls dropped,
    unknown and camelCase field names refused."""
    if not isinstance(data, Mapping):
        raise JsonShapeError(f"{where or 'the body'}: expected an object")
    converted: dict[str, Any] = {}
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key) if isinstance(key, str) else None
        path = f"{where}.{key}" if where else str(key)
        if field is None:
            raise JsonShapeError(f"{path}: no such field")
        if value is None:
            continue
        if _kind(field) == "map":
            if not isinstance(value, Mapping):
                raise JsonShapeError(f"{path}: expected an object")
            value_field = _message(field).fields_by_name["value"]
            converted[key] = {
                item_key: _to_proto_value(item, value_field, f"{path}.{item_key}")
                for item_key, item in value.items()
            }
        elif field.is_repeated:
            if not isinstance(value, list):
                raise JsonShapeError(f"{path}: expected a list")
            converted[key] = [
                _to_proto_value(item, field, f"{path}[{index}]") for index, item in enumerate(value)
            ]
        else:
            converted[key] = _to_proto_value(value, field, path)
    return converted


def _to_proto_value(value: Any, field: FieldDescriptor, path: str) -> Any:
    kind = _kind(field)
    if kind == "enum":
        numbers = _enum_numbers(_enum(field))
        if not isinstance(value, str) or value not in numbers:
            raise JsonShapeError(f"{path}: {value!r} is not one of {', '.join(numbers)}")
        return numbers[value]
    if kind == "message":
        return _to_proto_json(value, _message(field), path)
    return value


def _parse_error_text(text: str) -> str:
    """json_format's "Failed to parse limit field: Couldn't parse integer: 'x'." ->
    "limit: couldn't parse integer: 'x'"."""
    text = re.sub(r"\.? at [\w.]+$", "", text.splitlines()[0]).rstrip(".")
    match = re.match(r"Failed to parse (\S+) field: (.*)", text)
    if match is None:
        return text
    field, problem = match.groups()
    problem = re.sub(r"^Failed to parse \S+ field: ", "", problem)
    return f"{field}: {problem[:1].lower()}{problem[1:]}"

"""Checks: operator-named probe specs, typed, frozen and validated once, at load.

A checks file is YAML::

    checks:
      - name: web                  # unique; letters, digits, '.', '_', '-'
        type: http                 # http | tcp
        target: http://example.org/
        interval: 30s              # default 30s
        timeout: 10s               # default 10s, always below interval
        labels: {team: web}
        method: GET                # http only
        expected_status: [200, "300-399"]   # http only; default 200-399

Every problem is reported as one ``ConfigError`` line naming the file, the line and the
field, e.g. ``checks.yaml:7: check 'web': timeout 5s must be below interval 2s``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from .configfile import (
    ConfigError,
    line_of,
    parse_yaml,
    split_host_port,
    validation_message,
)
from .durations import format_duration, parse_duration

__all__ = [
    "PROBE_TYPES",
    "Check",
    "ConfigError",
    "HttpCheck",
    "TcpCheck",
    "load_checks",
    "parse_check",
    "parse_checks",
    "split_host_port",
]

PROBE_TYPES = ("http", "tcp")
MIN_INTERVAL = 1.0
MAX_INTERVAL = 86_400.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _duration(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, bool):
        raise ValueError("a duration is written like 2s or 500ms")
    return value  # a bare number means seconds


Seconds = Annotated[float, BeforeValidator(_duration), Field(gt=0)]


def _status_range(value: Any) -> tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a status code")
    if isinstance(value, int):
        low = high = value
    elif isinstance(value, str) and re.fullmatch(r"\d{3}(-\d{3})?", value.strip()):
        low_text, _, high_text = value.strip().partition("-")
        low, high = int(low_text), int(high_text or low_text)
    else:
        raise ValueError(f"{value!r} is not a status code or range like 200-299")
    if not 100 <= low <= high <= 599:
        raise ValueError(f"{value!r} is not a status range within 100-599")
    return (low, high)


StatusRange = Annotated[tuple[int, int], BeforeValidator(_status_range)]


class _CheckBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    name: str
    target: str
    interval: Seconds = 30.0
    timeout: Seconds = 10.0
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(
                f"{name!r} is not a valid check name "
                "(letters, digits, '.', '_', '-'; at most 128 characters)"
            )
        return name

    @field_validator("labels")
    @classmethod
    def _labels_are_names(cls, labels: dict[str, str]) -> dict[str, str]:
        for key in labels:
            if not _LABEL.match(key):
                raise ValueError(f"label name {key!r} is not a valid Prometheus label name")
        return labels

    @model_validator(mode="after")
    def _timing_fits(self) -> _CheckBase:
        if not MIN_INTERVAL <= self.interval <= MAX_INTERVAL:
            raise ValueError(
                f"interval {format_duration(self.interval)} is outside "
                f"{format_duration(MIN_INTERVAL)}..{format_duration(MAX_INTERVAL)}"
            )
        if self.timeout >= self.interval:
            raise ValueError(
                f"timeout {format_duration(self.timeout)} must be below "
                f"interval {format_duration(self.interval)}"
            )
        return self

    @property
    def revision(self) -> int:
        """Changes whenever the spec changes; equal specs give equal revisions, so
        coordinator replicas and restarts agree without shared state."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        digest = hashlib.sha256(canonical.encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1  # fits every signed 64-bit field


class HttpCheck(_CheckBase):
    type: Literal["http"]
    method: Literal["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"] = "GET"
    expected_status: tuple[StatusRange, ...] = ((200, 399),)

    @field_validator("target")
    @classmethod
    def _target_is_url(cls, target: str) -> str:
        parts = urlsplit(target)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"target {target!r} is not an http:// or https:// URL")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"target {target!r} has an invalid port") from exc
        return target

    @field_validator("expected_status")
    @classmethod
    def _some_status(cls, ranges: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
        if not ranges:
            raise ValueError("expected_status must list at least one code or range")
        return ranges


class TcpCheck(_CheckBase):
    type: Literal["tcp"]

    @field_validator("target")
    @classmethod
    def _target_is_host_port(cls, target: str) -> str:
        split_host_port(target)
        return target


Check = Annotated[HttpCheck | TcpCheck, Field(discriminator="type")]
_CHECK: TypeAdapter[HttpCheck | TcpCheck] = TypeAdapter(Check)


def parse_check(data: Any) -> HttpCheck | TcpCheck:
    """Validate one check from plain data (a YAML mapping or an API request)."""
    return _CHECK.validate_python(data)


def load_checks(path: Path) -> tuple[HttpCheck | TcpCheck, ...]:
    """Read and validate a checks file; ConfigError (one line) on any problem."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read checks file: {exc.strerror}") from exc
    return parse_checks(text, str(path))


def parse_checks(text: str, source: str) -> tuple[HttpCheck | TcpCheck, ...]:
    root, data = parse_yaml(text, source)
    if not isinstance(data, dict) or not isinstance(data.get("checks", []), list):
        raise ConfigError(f"{source}:1: expected a mapping with a 'checks' list")
    unknown = sorted(set(data) - {"checks"})
    if unknown:
        raise ConfigError(f"{source}:{line_of(root, (unknown[0],))}: unknown key {unknown[0]!r}")
    checks: list[HttpCheck | TcpCheck] = []
    first_line: dict[str, int] = {}
    for index, item in enumerate(data.get("checks") or []):
        line = line_of(root, ("checks", index))
        label = _describe(item, index)
        if isinstance(item, dict) and "type" in item and item["type"] not in PROBE_TYPES:
            raise ConfigError(
                f"{source}:{line_of(root, ('checks', index, 'type'))}: {label}: "
                f"unknown probe type {item['type']!r} (known: {', '.join(PROBE_TYPES)})"
            )
        try:
            check = parse_check(item)
        except ValidationError as exc:
            message = validation_message(
                exc, root, source, ("checks", index), label, skip=PROBE_TYPES
            )
            raise ConfigError(message) from exc
        if check.name in first_line:
            raise ConfigError(
                f"{source}:{line}: {label}: duplicate check name "
                f"(first defined on line {first_line[check.name]})"
            )
        first_line[check.name] = line
        checks.append(check)
    return tuple(checks)


def _describe(item: Any, index: int) -> str:
    if isinstance(item, dict) and isinstance(item.get("name"), str):
        return f"check {item['name']!r}"
    return f"checks[{index}]"

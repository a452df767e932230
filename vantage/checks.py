"""Checks: operator-named probe specs, typed, frozen and validated once, at load.

A checks file is YAML; deploy/examples/checks.yaml documents every field::

    checks:
      - name: web                  # unique; letters, digits, '.', '_', '-'
        type: http                 # http | tcp | dns | icmp
        target: https://example.org/
        interval: 30s              # default 30s
        timeout: 10s               # default 10s, always below interval
        labels: {team: web}
        verdict: {fail_after: 3}   # this check's own verdict thresholds (engine: names)
        expected_status: [200, "300-399"]
        tls: {ca_file: ca.pem, cert_expiry_warning_days: 14}

File references (``ca_file``, ``client_cert_file``, ``client_key_file``) are read at load,
relative to the checks file, and travel to agents as PEM text. Every problem is reported
as one ``ConfigError`` line naming the file, the line and the field, e.g.
``checks.yaml:7: check 'web': timeout 5s must be below interval 2s``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import names
from .configfile import (
    ConfigError,
    items_under,
    line_of,
    parse_yaml,
    read_yaml,
    split_host_port,
    validation_message,
)
from .durations import duration_within, format_duration, parse_duration

__all__ = [
    "PROBE_TYPES",
    "Check",
    "ConfigError",
    "DnsCheck",
    "HttpCheck",
    "IcmpCheck",
    "IpVersion",
    "TcpCheck",
    "TlsOptions",
    "load_checks",
    "parse_check",
    "parse_checks",
    "split_host_port",
]

PROBE_TYPES = ("http", "tcp", "dns", "icmp")
MIN_INTERVAL = 1.0
MAX_INTERVAL = 86_400.0
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


IpVersion = Literal["any", "ipv4", "ipv6", "prefer_ipv4", "prefer_ipv6"]
_PEM_FILES = {
    "ca_file": "ca_pem",
    "client_cert_file": "client_cert_pem",
    "client_key_file": "client_key_pem",
}


def _regex(pattern: str | None) -> str | None:
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
    return pattern


Regex = Annotated[str | None, AfterValidator(_regex)]


class TlsOptions(BaseModel):
    """TLS settings for https and TLS-over-TCP checks.

    ``*_file`` keys name PEM files relative to the checks file; they are read at load
    (validation context ``base_dir``) into the ``*_pem`` fields, which is what agents get.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    verify: bool = True
    ca_pem: str | None = None
    server_name: str | None = None
    client_cert_pem: str | None = None
    client_key_pem: str | None = None
    cert_expiry_warning_days: int = Field(default=14, ge=0, le=3650)

    @model_validator(mode="before")
    @classmethod
    def _read_files(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        base = (info.context or {}).get("base_dir")
        for file_key, pem_key in _PEM_FILES.items():
            if file_key not in data:
                continue
            if base is None:
                raise ValueError(f"{file_key}: file references are only read from a checks file")
            if pem_key in data:
                raise ValueError(f"give {file_key} or {pem_key}, not both")
            path = Path(base) / str(data.pop(file_key))
            try:
                data[pem_key] = path.read_text()
            except OSError as exc:
                raise ValueError(f"{file_key}: cannot read {path}: {exc.strerror}") from None
        return data

    @model_validator(mode="after")
    def _pems_are_pem(self) -> TlsOptions:
        for key in ("ca_pem", "client_cert_pem", "client_key_pem"):
            text = getattr(self, key)
            if text is not None and "-----BEGIN " not in text:
                raise ValueError(f"{key.removesuffix('_pem')}: not a PEM file")
        if (self.client_cert_pem is None) != (self.client_key_pem is None):
            raise ValueError("client_cert_file and client_key_file go together")
        return self


def _tls_flag(value: Any) -> Any:
    # `tls: true` on a tcp check means TLS with the defaults; `tls: false` means none.
    if value is True:
        return {}
    if value is False:
        return None
    return value


class VerdictOptions(BaseModel):
    """One check's own verdict thresholds, overriding the coordinator's ``engine:``
    settings of the same names (see coordinator.engine); unset ones keep those."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_agents: int | None = Field(default=None, ge=1)
    min_regions: int | None = Field(default=None, ge=1)
    min_region_agents: int | None = Field(default=None, ge=1)
    fail_after: int | None = Field(default=None, ge=1)
    recover_after: int | None = Field(default=None, ge=1)

    def overrides(self) -> dict[str, int]:
        """The thresholds this check sets, by name."""
        return {name: value for name, value in self.model_dump().items() if value is not None}


class _CheckBase(BaseModel):
    # Text is taken as written: `send: "QUIT\r\n"` and `expect: "^220 "` need their
    # whitespace; names and targets that carry stray spaces fail their own validation.
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    target: str
    interval: Seconds = 30.0
    timeout: Seconds = 10.0
    labels: dict[str, str] = Field(default_factory=dict)
    verdict: VerdictOptions = Field(default_factory=VerdictOptions)
    # A connectivity canary: an agent that sees every canary it runs down has lost its
    # own connectivity and is impaired, whatever its peers see (coordinator.engine).
    canary: bool = False

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, name: str) -> str:
        return names.check_name(name)

    @field_validator("labels")
    @classmethod
    def _labels_are_names(cls, labels: dict[str, str]) -> dict[str, str]:
        for key in labels:
            if not _LABEL.fullmatch(key):
                raise ValueError(f"label name {key!r} is not a valid Prometheus label name")
        return labels

    @model_validator(mode="after")
    def _timing_fits(self) -> _CheckBase:
        duration_within(self.interval, MIN_INTERVAL, MAX_INTERVAL, "interval")
        if self.timeout >= self.interval:
            raise ValueError(
                f"timeout {format_duration(self.timeout)} must be below "
                f"interval {format_duration(self.interval)}"
            )
        return self

    @property
    def revision(self) -> int:
        """Changes whenever what the probe does changes; equal specs give equal revisions,
        so coordinator replicas and restarts agree without shared state. ``verdict`` is
        the coordinator's alone: it is not sent to agents and changing it does not
        restart the check there; nor does ``canary``."""
        canonical = json.dumps(
            self.model_dump(mode="json", exclude={"verdict", "canary"}), sort_keys=True
        )
        digest = hashlib.sha256(canonical.encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1  # fits every signed 64-bit field


class HttpCheck(_CheckBase):
    """An HTTP(S) request. Up when the final status is expected and the body matches."""

    type: Literal["http"]
    method: Literal["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = None
    expected_status: tuple[StatusRange, ...] = ((200, 399),)
    body_match: Regex = None
    body_not_match: Regex = None
    follow_redirects: bool = True
    max_redirects: int = Field(default=10, ge=0, le=30)
    ip_version: IpVersion = "any"
    tls: TlsOptions = Field(default_factory=TlsOptions)

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

    @field_validator("headers")
    @classmethod
    def _headers_are_tokens(cls, headers: dict[str, str]) -> dict[str, str]:
        for key, value in headers.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", key):
                raise ValueError(f"header name {key!r} is not a valid HTTP header name")
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {key!r} has a line break in its value")
        return headers


class TcpCheck(_CheckBase):
    """A TCP connection, optionally TLS, optionally sending and expecting text."""

    type: Literal["tcp"]
    tls: Annotated[TlsOptions | None, BeforeValidator(_tls_flag)] = None
    send: str | None = None
    expect: Regex = None
    ip_version: IpVersion = "any"

    @field_validator("target")
    @classmethod
    def _target_is_host_port(cls, target: str) -> str:
        split_host_port(target)
        return target


DNS_RECORD_TYPES = ("A", "AAAA", "CNAME", "MX", "TXT", "NS", "SOA")
DNS_RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")


class DnsCheck(_CheckBase):
    """A DNS query for ``target`` (a name). Up when the rcode and the answers are as
    expected; with no expectation on answers, NOERROR must bring at least one answer of
    the asked type."""

    type: Literal["dns"]
    record_type: Literal["A", "AAAA", "CNAME", "MX", "TXT", "NS", "SOA"] = "A"
    server: str | None = None
    tcp: bool = False
    expected_rcode: Literal["NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED"] = (
        "NOERROR"
    )
    expected_answers: tuple[str, ...] | None = None
    answer_match: Regex = None

    @field_validator("target")
    @classmethod
    def _target_is_name(cls, target: str) -> str:
        name = target.rstrip(".")
        labels = name.split(".")
        if not name or len(name) > 253 or not all(0 < len(label) <= 63 for label in labels):
            raise ValueError(f"target {target!r} is not a DNS name")
        return target

    @field_validator("server")
    @classmethod
    def _server_is_address(cls, server: str | None) -> str | None:
        if server is not None:
            dns_server_address(server)
        return server


def dns_server_address(server: str) -> tuple[str, int]:
    """'192.0.2.53', '192.0.2.53:5353', '2001:db8::53' or '[2001:db8::53]:53' -> (ip, port)."""
    try:
        return str(ipaddress.ip_address(server)), 53
    except ValueError:
        pass
    host, port = split_host_port(server)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise ValueError(f"server {server!r} is not an IP address with an optional port") from None


class IcmpCheck(_CheckBase):
    """``count`` echo requests ``packet_interval`` apart; down (icmp_loss) when more than
    ``max_loss_percent`` are lost. All of it must fit in the timeout."""

    type: Literal["icmp"]
    count: int = Field(default=3, ge=1, le=100)
    packet_interval: Seconds = 0.2
    max_loss_percent: float = Field(default=0.0, ge=0, lt=100)
    ip_version: IpVersion = "any"
    payload_size: int = Field(default=56, ge=0, le=1452)

    @field_validator("target")
    @classmethod
    def _target_is_host(cls, target: str) -> str:
        if not target or (any(c in target for c in "/: ") and not _is_ip(target)):
            raise ValueError(f"target {target!r} is not a host name or IP address")
        return target

    @model_validator(mode="after")
    def _pings_fit(self) -> IcmpCheck:
        if (self.count - 1) * self.packet_interval >= self.timeout:
            raise ValueError(
                f"{self.count} pings {format_duration(self.packet_interval)} apart do not fit "
                f"in timeout {format_duration(self.timeout)}"
            )
        return self


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


AnyCheck = HttpCheck | TcpCheck | DnsCheck | IcmpCheck
Check = Annotated[AnyCheck, Field(discriminator="type")]
_CHECK: TypeAdapter[AnyCheck] = TypeAdapter(Check)


def parse_check(data: Any, base_dir: Path | None = None) -> AnyCheck:
    """Validate one check from plain data (a YAML mapping or an API request).

    ``base_dir`` is where relative file references (``tls.ca_file``...) are read from;
    without one, only inline PEM text is accepted.
    """
    context = {"base_dir": base_dir} if base_dir is not None else {"base_dir": None}
    return _CHECK.validate_python(data, context=context)


def load_checks(path: Path) -> tuple[AnyCheck, ...]:
    """Read and validate a checks file; ConfigError (one line) on any problem."""
    root, data = read_yaml(path, "checks")
    return _checks_from(root, data, str(path), path.parent)


def parse_checks(text: str, source: str, base_dir: Path = Path()) -> tuple[AnyCheck, ...]:
    """Validate a checks file's text; ``source`` names it in errors."""
    root, data = parse_yaml(text, source)
    return _checks_from(root, data, source, base_dir)


def _checks_from(
    root: yaml.Node | None, data: Any, source: str, base_dir: Path
) -> tuple[AnyCheck, ...]:
    checks: list[AnyCheck] = []
    first_line: dict[str, int] = {}
    for index, item in enumerate(items_under(root, data, source, "checks")):
        line = line_of(root, ("checks", index))
        label = _describe(item, index)
        if isinstance(item, dict) and "type" in item and item["type"] not in PROBE_TYPES:
            raise ConfigError(
                f"{source}:{line_of(root, ('checks', index, 'type'))}: {label}: "
                f"unknown probe type {item['type']!r} (known: {', '.join(PROBE_TYPES)})"
            )
        try:
            check = parse_check(item, base_dir)
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

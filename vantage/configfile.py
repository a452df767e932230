"""Reading operator files (YAML) and reporting their mistakes in one line.

Every configuration input — the checks file, the coordinator's settings, the tokens
file — is parsed here and validated with pydantic; a mistake becomes one ``ConfigError``
line naming the file, the line and the field: ``checks.yaml:7: check 'web': timeout 5s
must be below interval 2s``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigError(Exception):
    """A configuration input is invalid. ``str()`` is one line naming the problem."""


def read_yaml(path: Path, what: str) -> tuple[yaml.Node | None, Any]:
    """Read a YAML file into (node tree for line numbers, plain data; {} when empty).

    ``what`` names the file in errors ("checks", "config", "tokens").
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} file: {exc.strerror}") from exc
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    # One pass: compose the node tree (it keeps line numbers), then build the data from
    # it. libyaml's loader when PyYAML has it: some 20x faster on a file of many checks.
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from exc
    finally:
        loader.dispose()
    return root, ({} if data is None else data)


def items_under(root: yaml.Node | None, data: Any, source: str, key: str) -> list[Any]:
    """The list under ``key`` of a file that must be a mapping with that one key."""
    if not isinstance(data, dict) or not isinstance(data.get(key, []), list):
        raise ConfigError(f"{source}:1: expected a mapping with a {key!r} list")
    unknown = sorted(set(data) - {key})
    if unknown:
        raise ConfigError(f"{source}:{line_of(root, (unknown[0],))}: unknown key {unknown[0]!r}")
    items: list[Any] = data.get(key) or []
    return items


def validation_message(
    exc: ValidationError,
    root: yaml.Node | None,
    source: str,
    prefix: Sequence[Any] = (),
    label: str = "",
    skip: Collection[str] = (),
) -> str:
    """The first pydantic error as ``source:line: [label: ]field: message``.

    ``skip`` names location parts that are not fields (the tags of a tagged union).
    """
    error = exc.errors(include_url=False)[0]
    loc = tuple(part for part in error["loc"] if part not in skip)
    field = ".".join(str(part) for part in loc)
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        message = f"missing required field {field!r}"
    elif error["type"] == "extra_forbidden":
        message = f"unknown field {field!r}"
    elif error["type"] == "union_tag_not_found":
        message = f"missing required field {error['ctx']['discriminator'].strip(chr(39))!r}"
    elif error["type"].startswith("path_"):
        message = f"{field}: must be a file path"
    elif field and not message.startswith(field):
        message = f"{field}: {_plain(message)}"
    where = f"{source}:{line_of(root, (*prefix, *loc))}"
    return f"{where}: {label}: {message}" if label else f"{where}: {message}"


def _plain(message: str) -> str:
    # pydantic says "Input should be greater than or equal to 1"; operators read "must be".
    return (
        message.replace("Input should be greater than or equal to", "must be at least")
        .replace("Input should be greater than", "must be greater than")
        .replace("Input should be", "must be")
    )


def line_of(root: yaml.Node | None, path: Sequence[Any]) -> int:
    """1-based line of the deepest node of ``path`` that exists in the YAML tree."""
    node = root
    line = (node.start_mark.line + 1) if node is not None else 1
    for part in path:
        child = _child(node, part)
        if child is None:
            break
        node = child
        line = node.start_mark.line + 1
    return line


def _child(node: yaml.Node | None, part: Any) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == str(part):
                found: yaml.Node = value
                return found
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        item: yaml.Node = node.value[part]
        return item
    return None


def resolve_path(base: Path, path: Path | None) -> Path | None:
    """A path from a settings file, absolute: relative ones (and ``~``) resolve against
    ``base``, the file's directory."""
    if path is None:
        return None
    return (base / path.expanduser()).absolute()


def is_loopback_host(host: str) -> bool:
    """True for 'localhost' and loopback addresses (127.0.0.0/8, ::1, ::ffff:127.x)."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def split_host_port(address: str, *, port_zero: bool = False) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host without brackets, port).

    The port is 1-65535, or also 0 (pick a free one) with ``port_zero``, for listeners.
    ValueError naming the address otherwise.
    """
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{address!r} has an invalid IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{address!r}: write an IPv6 address in brackets, like [::1]:7400")
    low = 0 if port_zero else 1
    if not sep or not host or not port_text.isdigit() or not low <= int(port_text) <= 65535:
        raise ValueError(f"{address!r} is not host:port with a port in {low}-65535")
    return host, int(port_text)

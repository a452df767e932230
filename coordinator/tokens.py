"""Agent tokens: who may connect, validated once at load.

A tokens file is YAML::

    tokens:
      - token: "a-long-random-secret-0001"   # at least 16 characters, unique
        agent: eu-1                           # optional: admits only this agent name
      - token: "another-long-random-secret"   # no agent: admits any agent name

Every problem is one ``ConfigError`` line naming the file, the line and the field.
Tokens never appear in logs or errors: a duplicate is named by its line, not its value.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from vantage import names
from vantage.configfile import (
    ConfigError,
    items_under,
    line_of,
    read_yaml,
    validation_message,
)

MIN_TOKEN_LENGTH = 16


class TokenEntry(BaseModel):
    """One admitted token; ``agent`` None admits any agent name."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token: str
    agent: str | None = None

    @field_validator("token")
    @classmethod
    def _long_enough(cls, token: str) -> str:
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"a token has at least {MIN_TOKEN_LENGTH} characters")
        if token != token.strip() or any(char.isspace() for char in token):
            raise ValueError("a token has no whitespace")
        return token

    @field_validator("agent")
    @classmethod
    def _valid_agent(cls, agent: str | None) -> str | None:
        return None if agent is None else names.agent_name(agent)


class TokenRegistry:
    """The tokens agents may present, and which agent names each one admits.

    Immutable once built. Comparisons use ``hmac.compare_digest`` against every entry, so
    the time taken does not tell which token (or how much of one) matched.
    """

    def __init__(self, entries: Iterable[TokenEntry] = ()) -> None:
        self._entries = tuple((entry.token.encode(), entry.agent) for entry in entries)

    @classmethod
    def load(cls, path: Path) -> TokenRegistry:
        """Read and validate a tokens file; ConfigError (one line) on any problem."""
        return cls(load_tokens(path))

    def __len__(self) -> int:
        return len(self._entries)

    def known(self, token: str) -> bool:
        """True when ``token`` admits at least one agent name."""
        presented = token.encode()
        found = False
        for secret, _ in self._entries:
            found |= hmac.compare_digest(secret, presented)
        return found

    def admits(self, token: str, agent_name: str) -> bool:
        """True when ``token`` is listed and not bound to another agent name."""
        presented = token.encode()
        admitted = False
        for secret, agent in self._entries:
            matches = hmac.compare_digest(secret, presented)
            admitted |= matches and (agent is None or agent == agent_name)
        return admitted


def load_tokens(path: Path) -> tuple[TokenEntry, ...]:
    source = str(path)
    root, data = read_yaml(path, "tokens")
    entries: list[TokenEntry] = []
    first_line: dict[str, int] = {}
    for index, item in enumerate(items_under(root, data, source, "tokens")):
        line = line_of(root, ("tokens", index))
        label = f"tokens[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{source}:{line}: {label}: expected a mapping with a 'token'")
        try:
            entry = TokenEntry.model_validate(item)
        except ValidationError as exc:
            raise ConfigError(
                validation_message(exc, root, source, ("tokens", index), label)
            ) from exc
        if entry.token in first_line:
            raise ConfigError(
                f"{source}:{line}: {label}: duplicate token "
                f"(first listed on line {first_line[entry.token]})"
            )
        first_line[entry.token] = line
        entries.append(entry)
    return tuple(entries)

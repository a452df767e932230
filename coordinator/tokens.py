"""Tokens: who may connect, and to do what. Validated once at load; only hashes stored.

A tokens file is YAML, written by ``vantage token create|revoke`` (``TokenFile``, which
keeps the file's comments and order) or by hand::

    tokens:
      - name: fra-1                # unique; an agent token's name is the agent's name
        scope: agent               # agent | query | checknow
        region: eu                 # agent tokens only: the region the agent must claim
        sha256: 9f86d08...         # SHA-256 of the token (hex); the token is never stored
        created: "2026-12-05T21:00:00Z"
      - name: grafana
        scope: query               # read verdicts, agents, history, /metrics
        sha256: 60303ae...
      - name: oncall
        scope: checknow            # query, and run on-demand checks (vantage check)
        sha256: fd61a03...
      # Before hashed tokens (plaintext; still admitted, with a warning at every load):
      - token: a-long-random-secret-0001
        agent: eu-1                # optional: admits only this agent name, in any region

A token is ``vt1_`` and 32 characters of ``secrets.token_urlsafe``: 192 random bits, so a
plain SHA-256 of it is as safe to keep as a slow password hash would be (nobody can
guess 2^192 inputs); ``hmac.compare_digest`` compares the digests. A plaintext entry is
hashed when the file is read and its text is not kept.

Every problem is one ``ConfigError`` line naming the file, the line and the field.
Tokens never appear in logs or errors: a duplicate is named by its line, not its value.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import io
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from vantage import names
from vantage.configfile import (
    ConfigError,
    items_under,
    line_of,
    parse_yaml,
    validation_message,
)

TOKEN_PREFIX = "vt1_"
TOKEN_BYTES = 24  # 192 bits
MIN_TOKEN_LENGTH = 16  # plaintext entries
_HEX = frozenset("0123456789abcdef")
_HEADER = """\
# Vantage tokens: `vantage token create|list|revoke` edit this file (comments are kept).
# Only SHA-256 hashes of the tokens are stored; a token is shown once, when created.
"""


class Scope(StrEnum):
    """What a token may do. ``checknow`` includes ``query``; ``agent`` is only that."""

    AGENT = "agent"
    QUERY = "query"
    CHECKNOW = "checknow"

    def allows(self, needed: Scope) -> bool:
        return self is needed or (self is Scope.CHECKNOW and needed is Scope.QUERY)


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One admitted token, by its hash.

    ``agent`` is the agent name an agent token admits (its ``name``; for a plaintext
    entry its ``agent:``, or None for any name); ``region`` the region it admits (None:
    any, only plaintext entries). ``line`` is where the file lists it.
    """

    name: str
    scope: Scope
    digest: bytes
    agent: str | None = None
    region: str | None = None
    created: str | None = None
    plaintext: bool = False
    line: int = field(default=0, compare=False)

    def refusal(self, agent: str, region: str) -> str | None:
        """Why this token may not connect agent ``agent`` of ``region``; None when it may."""
        if self.scope is not Scope.AGENT:
            return f"token {self.name!r} is a {self.scope.value} token, not an agent token"
        if self.agent is not None and self.agent != agent:
            return f"token {self.name!r} is bound to agent {self.agent}, not {agent}"
        if self.region is not None and self.region != region:
            return f"token {self.name!r} is bound to region {self.region}, not {region}"
        return None


def new_token() -> str:
    """A fresh random token (192 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenRegistry:
    """The tokens of one reading of the tokens file. Immutable.

    ``authenticate`` finds a presented token's entry by its SHA-256 (a lookup on the
    hash of a secret reveals nothing about the secret) and confirms it with
    ``hmac.compare_digest``. ``warnings`` are the lines to log at each load (plaintext
    entries).
    """

    def __init__(self, entries: Iterable[TokenEntry] = (), *, source: str = "") -> None:
        self.entries = tuple(entries)
        self._by_digest = {entry.digest: entry for entry in self.entries}
        self._by_name = {entry.name: entry for entry in self.entries if not entry.plaintext}
        self.warnings = tuple(
            f"{source}:{entry.line}: a plaintext token"
            + (f" (agent {entry.agent})" if entry.agent else "")
            + ": replace it with `vantage token create` (README: Running on the internet)"
            for entry in self.entries
            if entry.plaintext
        )

    @classmethod
    def load(cls, path: Path) -> TokenRegistry:
        """Read and validate a tokens file; ConfigError (one line) on any problem."""
        return cls(load_tokens(path), source=str(path))

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, entry: object) -> bool:
        """True when this reading still lists ``entry`` unchanged (not revoked)."""
        return isinstance(entry, TokenEntry) and self._by_digest.get(entry.digest) == entry

    def authenticate(self, token: str) -> TokenEntry | None:
        """The entry of ``token``; None when no entry lists it."""
        presented = digest(token)
        entry = self._by_digest.get(presented)
        if entry is None or not hmac.compare_digest(entry.digest, presented):
            return None
        return entry

    def named(self, name: str) -> TokenEntry | None:
        """The hashed entry called ``name`` (what a client certificate's name stands in
        for); None when there is none."""
        return self._by_name.get(name)

    def has_scope(self, *scopes: Scope) -> bool:
        return any(entry.scope in scopes for entry in self.entries)


class _Hashed(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    scope: Scope
    sha256: str
    region: str | None = None
    created: str | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return names.agent_name(name, "token name")

    @field_validator("region")
    @classmethod
    def _valid_region(cls, region: str | None) -> str | None:
        return None if region is None else names.agent_name(region, "region")

    @field_validator("sha256")
    @classmethod
    def _is_digest(cls, value: str) -> str:
        value = value.lower()
        if len(value) != 64 or not set(value) <= _HEX:
            raise ValueError("sha256: expected 64 hexadecimal digits (a SHA-256 digest)")
        return value

    @field_validator("created", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        # An unquoted timestamp is a datetime to YAML.
        if isinstance(value, datetime):
            return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if isinstance(value, date):
            return value.isoformat()
        return value

    @model_validator(mode="after")
    def _region_matches_scope(self) -> _Hashed:
        if self.scope is Scope.AGENT and self.region is None:
            raise ValueError("region: an agent token is bound to a region")
        if self.scope is not Scope.AGENT and self.region is not None:
            raise ValueError(f"region: a {self.scope.value} token has no region")
        return self


class _Plaintext(BaseModel):
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


def load_tokens(path: Path) -> tuple[TokenEntry, ...]:
    """The entries of a tokens file; ConfigError (one line) on any problem."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read tokens file: {exc.strerror}") from exc
    return parse_tokens(text, str(path))


def parse_tokens(text: str, source: str) -> tuple[TokenEntry, ...]:
    root, data = parse_yaml(text, source)
    entries: list[TokenEntry] = []
    first_line: dict[bytes, int] = {}
    named: dict[str, int] = {}
    for index, item in enumerate(items_under(root, data, source, "tokens")):
        line = line_of(root, ("tokens", index))
        label = f"tokens[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{source}:{line}: {label}: expected a mapping with a 'sha256'")
        model: type[BaseModel] = _Plaintext if "token" in item else _Hashed
        try:
            parsed = model.model_validate(item)
        except ValidationError as exc:
            raise ConfigError(
                validation_message(exc, root, source, ("tokens", index), label)
            ) from exc
        entry = _entry(parsed, line)
        if entry.digest in first_line:
            raise ConfigError(
                f"{source}:{line}: {label}: duplicate token "
                f"(first listed on line {first_line[entry.digest]})"
            )
        if not entry.plaintext and entry.name in named:
            raise ConfigError(
                f"{source}:{line}: {label}: duplicate name {entry.name!r} "
                f"(first listed on line {named[entry.name]})"
            )
        first_line[entry.digest] = line
        if not entry.plaintext:
            named[entry.name] = line
        entries.append(entry)
    return tuple(entries)


def _entry(parsed: BaseModel, line: int) -> TokenEntry:
    if isinstance(parsed, _Plaintext):
        return TokenEntry(
            name=parsed.agent or f"plaintext-line-{line}",
            scope=Scope.AGENT,
            digest=digest(parsed.token),
            agent=parsed.agent,
            plaintext=True,
            line=line,
        )
    assert isinstance(parsed, _Hashed)
    return TokenEntry(
        name=parsed.name,
        scope=parsed.scope,
        digest=bytes.fromhex(parsed.sha256),
        agent=parsed.name if parsed.scope is Scope.AGENT else None,
        region=parsed.region,
        created=parsed.created,
        line=line,
    )


class TokenFile:
    """Edits a tokens file for ``vantage token``: one writer at a time (a lock file
    beside it), every change validated as the coordinator will read it, then swapped in
    atomically (a coordinator never reads half a file). Comments and order are kept.
    The file is created (mode 0600) by the first ``create``."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock

    def entries(self) -> tuple[TokenEntry, ...]:
        if not self.path.exists():
            return ()
        return load_tokens(self.path)

    def create(self, name: str, scope: Scope, region: str | None) -> tuple[str, TokenEntry]:
        """Add a new token; returns it (to show once) and its entry. ConfigError when the
        name is taken or the arguments do not make a valid entry."""
        token = new_token()
        created = datetime.fromtimestamp(self._clock(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        item: dict[str, Any] = {"name": name, "scope": scope.value}
        if region is not None:
            item["region"] = region
        item["sha256"] = digest(token).hex()
        item["created"] = created
        try:
            _Hashed.model_validate(item)
        except ValidationError as exc:
            raise ConfigError(validation_message(exc, None, "token").split(": ", 1)[-1]) from None
        with self._editing() as document:
            for entry in parse_tokens(self._dump(document), str(self.path)):
                if entry.name == name and not entry.plaintext:
                    raise ConfigError(
                        f"{self.path}:{entry.line}: a token named {name!r} exists; "
                        "revoke it first (vantage token revoke)"
                    )
            document["tokens"].append(item)
        added = self.entries()[-1]
        return token, added

    def revoke(self, name: str) -> list[TokenEntry]:
        """Remove the token called ``name`` (and any plaintext entry bound to agent
        ``name``); returns what was removed. ConfigError when nothing is called so."""
        with self._editing() as document:
            listed = parse_tokens(self._dump(document), str(self.path))
            doomed = [index for index, entry in enumerate(listed) if entry.name == name]
            if not doomed:
                raise ConfigError(f"{self.path}: no token named {name!r}")
            for index in reversed(doomed):
                del document["tokens"][index]
            if not document["tokens"]:
                # An emptied block list keeps its comments and would dump as invalid YAML.
                document["tokens"] = []
        return [listed[index] for index in doomed]

    @contextlib.contextmanager
    def _editing(self) -> Iterator[Any]:
        """The file as a round-trip YAML document, under the lock; written back (after
        validation) when the block ends without an error."""
        from ruamel.yaml import YAML

        yaml = YAML()
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        try:
            lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"{lock_path}: cannot lock the tokens file: {exc.strerror}") from exc
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                text = self.path.read_text() if self.path.exists() else _HEADER + "tokens: []\n"
            except OSError as exc:
                raise ConfigError(f"{self.path}: cannot read tokens file: {exc.strerror}") from exc
            parse_tokens(text, str(self.path))  # a broken file is not edited
            document = yaml.load(text)
            if document is None or document.get("tokens") is None:
                document = yaml.load(_HEADER + "tokens: []\n")
            if not document["tokens"]:
                # A flow-style empty list would stay flow-style: start a block one.
                document["tokens"] = yaml.load("tokens:\n  - x\n")["tokens"]
                del document["tokens"][0]
            yield document
            new_text = self._dump(document)
            parse_tokens(new_text, str(self.path))
            self._replace(new_text)
        finally:
            os.close(lock)

    @staticmethod
    def _dump(document: Any) -> str:
        from ruamel.yaml import YAML

        yaml = YAML()
        yaml.indent(mapping=2, sequence=4, offset=2)
        out = io.StringIO()
        yaml.dump(document, out)
        return out.getvalue()

    def _replace(self, text: str) -> None:
        """Write ``text`` to a new file beside the old one, with its mode and owner, and
        rename it over the old one."""
        try:
            old = os.stat(self.path)
        except FileNotFoundError:
            old = None
        directory = self.path.parent
        try:
            descriptor, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        except OSError as exc:
            raise ConfigError(f"{directory}: cannot write the tokens file: {exc.strerror}") from exc
        try:
            with os.fdopen(descriptor, "w") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, old.st_mode & 0o7777 if old else 0o600)
            if old is not None:
                with contextlib.suppress(PermissionError):
                    os.chown(temporary, old.st_uid, old.st_gid)
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

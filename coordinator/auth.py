"""Who is calling, and may they: the decisions behind every agent stream and query.

The rules (``Authenticator``):

- **Agents** present an ``agent`` token (``authorization: Bearer``), or, over mutual TLS
  without a token, a client certificate whose common name or a subject alternative name
  is the name of an ``agent`` token entry: it stands in for that token. Unknown, revoked
  or malformed: UNAUTHENTICATED. Then the Hello must claim the token's agent name and
  region: PERMISSION_DENIED otherwise (``admit_agent``). Both before any state exists.
- **Queries** (the query service, the JSON API, ``/metrics``) take a ``query`` or
  ``checknow`` token the same way; CheckNow needs ``checknow``. An agent token cannot
  query. With ``query_auth: none`` nothing is asked of anyone. While the tokens file has
  no query token at all, queries are answered for loopback clients only.
- **Streams** a caller holds open (agent streams, verdict watches) are ``Sessions``: at
  most ``max_streams`` per caller for watches, and each ends when its token is revoked
  (``replace`` with a reading of the tokens file that no longer lists it), within the
  poll of the tokens file.

Refusals are ``AuthError``: the gRPC status, the reason counted in
``vantage_requests_refused_total``, and one line for the client. Tokens never appear in
them; token names do.

``CALLER`` is the context variable through which a call's ``Principal`` reaches the code
that serves it (rate limits key on ``Principal.key``).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import unquote

import grpc

from vantage.configfile import is_loopback_host
from vantage.logs import get_logger
from vantage.names import token_ok

from .tokens import Scope, TokenEntry, TokenRegistry

log = get_logger("coordinator.auth")

UNAUTHENTICATED = "unauthenticated"
PERMISSION_DENIED = "permission_denied"
TOO_MANY_STREAMS = "too_many_streams"


class QueryAuth(StrEnum):
    """``query_auth:``: ``tokens`` (the default) or ``none`` (anyone may query)."""

    TOKENS = "tokens"
    NONE = "none"


class AuthError(Exception):
    """A refused caller: ``code`` for gRPC (and its HTTP mapping), ``reason`` for the
    counter, ``str()`` one line for the client."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a call comes from. ``entry`` is the token entry it was admitted by (None when
    queries are open); ``via`` says how: ``token``, ``certificate`` or ``open``. ``key``
    is what limits count against: the token's name, or the client's address when open."""

    name: str
    via: str
    key: str
    entry: TokenEntry | None = None

    @property
    def scope(self) -> Scope | None:
        return None if self.entry is None else self.entry.scope


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the ``authorization: Bearer <token>`` entry; None when there is
    none. AuthError (UNAUTHENTICATED) when the entry is there but malformed."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if not isinstance(value, str):
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED, "malformed authorization"
            )
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token_ok(token):
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                UNAUTHENTICATED,
                "malformed authorization: expected 'Bearer TOKEN'",
            )
        return token
    return None


def certificate_names(auth_context: Mapping[str, Iterable[bytes]]) -> tuple[str, ...]:
    """The names a verified client certificate carries (gRPC's auth context): its common
    name, then its subject alternative names; none without a client certificate."""
    found: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth_context.get(key, ()):
            name = value.decode(errors="replace")
            if name not in found:
                found.append(name)
    return tuple(found)


def peer_host(peer: str) -> str:
    """The address in a gRPC peer string, without the port: 'ipv4:192.0.2.7:51234' ->
    '192.0.2.7', 'ipv6:%5B::1%5D:5123' -> '::1'; 'unix' for Unix sockets; anything else
    whole (at most 128 characters)."""
    kind, _, rest = unquote(peer).partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            rest = host
        return rest.strip("[]") or peer[:128]
    if kind == "unix":
        return "unix"
    return peer[:128]


@dataclass(eq=False)
class Session:
    """One stream a caller holds open; ``end(why)`` ends it (revoked)."""

    principal: Principal
    end: Callable[[str], None]
    capped: bool
    ended: bool = field(default=False)


class Authenticator:
    """The rules of the module docstring over the current ``TokenRegistry``.

    Runs on the event loop. ``replace`` installs a new reading of the tokens file and
    ends every session it no longer admits.
    """

    def __init__(
        self,
        tokens: TokenRegistry,
        *,
        query_auth: QueryAuth = QueryAuth.TOKENS,
        max_streams: int = 8,
    ) -> None:
        self._tokens = tokens
        self.query_auth = query_auth
        self.max_streams = max_streams
        self._sessions: dict[str, list[Session]] = {}

    @property
    def tokens(self) -> TokenRegistry:
        return self._tokens

    @property
    def queries_open(self) -> bool:
        """True when queries need no token (``query_auth: none``, or no query token
        exists yet: then for loopback clients only)."""
        return self.query_auth is QueryAuth.NONE or not self._tokens.has_scope(
            Scope.QUERY, Scope.CHECKNOW
        )

    # -- agents -------------------------------------------------------------------------

    def agent(self, bearer: str | None, certificate: Iterable[str] = ()) -> Principal:
        """The agent token a new stream presents (or its certificate stands in for);
        AuthError UNAUTHENTICATED when there is none or it is unknown."""
        principal = self._identify(bearer, certificate)
        return principal

    def admit_agent(self, principal: Principal, name: str, region: str) -> None:
        """AuthError PERMISSION_DENIED unless ``principal``'s token may connect agent
        ``name`` of ``region``."""
        assert principal.entry is not None
        why = principal.entry.refusal(name, region)
        if why is not None:
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED, why)

    # -- queries ------------------------------------------------------------------------

    def query(
        self,
        bearer: str | None,
        certificate: Iterable[str],
        client: str,
        needed: Scope,
        what: str,
    ) -> Principal:
        """The caller of a query that needs ``needed`` (``what`` names it in refusals),
        from ``client`` (its address); AuthError when refused."""
        if self.queries_open:
            if self.query_auth is QueryAuth.TOKENS and not is_loopback_host(client):
                raise AuthError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    UNAUTHENTICATED,
                    "this coordinator has no query tokens, so it answers loopback clients "
                    "only (vantage token create --scope query)",
                )
            return Principal(name=client, via="open", key=f"client:{client}")
        principal = self._identify(bearer, certificate)
        scope = principal.scope
        assert scope is not None
        if not scope.allows(needed):
            if scope is Scope.AGENT:
                why = f"token {principal.name!r} is an agent token: it cannot call {what}"
            else:
                why = (
                    f"token {principal.name!r} has scope {scope.value}; {what} needs {needed.value}"
                )
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED, why)
        return principal

    def _identify(self, bearer: str | None, certificate: Iterable[str]) -> Principal:
        if bearer is not None:
            entry = self._tokens.authenticate(bearer)
            if entry is None:
                raise AuthError(
                    grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED, "unknown or revoked token"
                )
            return Principal(entry.name, "token", f"token:{entry.name}", entry)
        names = tuple(certificate)
        for name in names:
            entry = self._tokens.named(name)
            if entry is not None:
                return Principal(entry.name, "certificate", f"token:{entry.name}", entry)
        if names:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                UNAUTHENTICATED,
                f"the client certificate names {', '.join(names)[:200]}, which no token "
                "entry is called, and no bearer token was sent",
            )
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED,
            UNAUTHENTICATED,
            "missing bearer token (authorization: Bearer TOKEN)",
        )

    # -- sessions -----------------------------------------------------------------------

    def open_session(
        self, principal: Principal, end: Callable[[str], None], *, capped: bool = True
    ) -> Session:
        """Register a stream of ``principal``'s; ``end(why)`` is called when its token is
        revoked. AuthError RESOURCE_EXHAUSTED when ``capped`` and the caller already holds
        ``max_streams`` capped streams. Close it with ``close_session``."""
        held = self._sessions.setdefault(principal.key, [])
        if capped and sum(1 for session in held if session.capped) >= self.max_streams:
            raise AuthError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                TOO_MANY_STREAMS,
                f"{principal.name} already holds {self.max_streams} streams, the most one "
                "caller may (limits.max_streams_per_token)",
            )
        session = Session(principal, end, capped)
        held.append(session)
        return session

    def close_session(self, session: Session) -> None:
        held = self._sessions.get(session.principal.key)
        if held is not None and session in held:
            held.remove(session)
            if not held:
                del self._sessions[session.principal.key]

    def streams_of(self, key: str) -> int:
        return len(self._sessions.get(key, ()))

    def replace(self, tokens: TokenRegistry) -> list[Session]:
        """Use ``tokens`` from now on; end (and return) the sessions it no longer
        admits: their token was revoked or changed, or queries were open and now need
        a token."""
        self._tokens = tokens
        ended: list[Session] = []
        for held in list(self._sessions.values()):
            for session in list(held):
                why = self._revoked(session.principal)
                if why is not None and not session.ended:
                    session.ended = True
                    ended.append(session)
                    log.warning(
                        "ending a stream: its caller is no longer admitted",
                        caller=session.principal.name,
                        via=session.principal.via,
                        why=why,
                    )
                    session.end(why)
        return ended

    def _revoked(self, principal: Principal) -> str | None:
        entry = principal.entry
        if entry is None:
            return None if self.queries_open else "query tokens are required now"
        if principal.via == "certificate":
            if self._tokens.named(entry.name) != entry:
                return f"token {entry.name!r} was revoked or changed"
            return None
        if entry not in self._tokens:
            return f"token {entry.name!r} was revoked or changed"
        return None


CALLER: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "vantage_caller", default=None
)

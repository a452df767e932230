"""The one rule for names that travel: agents, regions, tokens and checks.

A name is letters, digits, ``.``, ``_`` and ``-``, starting with a letter or a digit (so
never ``-flag``-like, ``.``-hidden, empty or ``..``), and short. Such a name is safe as a
Prometheus label value, a single MQTT topic level, a log field and a file name. The agent's
flags, its ``AgentSettings``, the coordinator's Hello check and the tokens file all use
``agent_name``; the checks file uses ``check_name`` (the same rule, twice as long).
"""

from __future__ import annotations

import re

AGENT_NAME_LENGTH = 64
CHECK_NAME_LENGTH = 128
_FIRST = "A-Za-z0-9"
_REST = "A-Za-z0-9_.-"
AGENT_NAME = re.compile(rf"^[{_FIRST}][{_REST}]{{0,{AGENT_NAME_LENGTH - 1}}}$")
CHECK_NAME = re.compile(rf"^[{_FIRST}][{_REST}]{{0,{CHECK_NAME_LENGTH - 1}}}$")
# How long a refused name may be when it is quoted back in an error.
_QUOTED = 128


def rule(length: int) -> str:
    """The rule in words, for error messages."""
    return (
        "letters, digits, '.', '_', '-', starting with a letter or digit; "
        f"at most {length} characters"
    )


def agent_name(value: str, what: str = "agent name") -> str:
    """``value`` when it is a valid agent, region or token name; ValueError (one line
    naming ``what``) otherwise."""
    if not AGENT_NAME.fullmatch(value):
        raise ValueError(f"{what} {value[:_QUOTED]!r} is invalid ({rule(AGENT_NAME_LENGTH)})")
    return value


def check_name(value: str) -> str:
    """``value`` when it is a valid check name; ValueError (one line) otherwise."""
    if not CHECK_NAME.fullmatch(value):
        raise ValueError(
            f"{value[:_QUOTED]!r} is not a valid check name ({rule(CHECK_NAME_LENGTH)})"
        )
    return value


def shown(text: str, limit: int = 200) -> str:
    """Text from outside (a request path, a header), safe to echo in a one-line message:
    unprintable characters (newlines, controls) escaped, anything past ``limit`` cut."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


# -- tokens ---------------------------------------------------------------------------

MAX_TOKEN_LENGTH = 512
TOKEN_RULE = f"printable ASCII without spaces, at most {MAX_TOKEN_LENGTH} characters"


def token_ok(token: str) -> bool:
    """Whether ``token`` can be a bearer token at all (the coordinator's tokens are
    ``vt1_`` and 32 URL-safe characters; older plaintext ones anything of this shape)."""
    return (
        0 < len(token) <= MAX_TOKEN_LENGTH
        and token.isascii()
        and token.isprintable()
        and " " not in token
    )

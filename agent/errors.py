"""The agent's error vocabulary: what a failure means for the agent's behaviour.

::

    AgentError
     ├── TransientError   the coordinator is unreachable or the stream broke:
     │                    back off (jittered, exponential) and reconnect
     └── FatalError       retrying cannot help (the coordinator refused the token or
                          this agent's hello): stop and say why; the process exits 1

``str()`` of each is one line a person can act on, e.g. "coordinator unreachable:
connection refused" or "coordinator refused the token (UNAUTHENTICATED)".
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of the agent's own errors."""


class TransientError(AgentError):
    """The coordinator is unreachable or the stream broke; reconnecting may help."""


class FatalError(AgentError):
    """Retrying cannot help; the agent stops and the process exits non-zero."""


def most_severe(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error a task group's failure stands for: its first FatalError, else its first
    TransientError, else the group itself (a bug, to surface whole)."""
    for kind in (FatalError, TransientError):
        match = group.subgroup(kind)
        if match is not None:
            return _first_leaf(match)
    return group


def _first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error

"""Bounds on what one caller may ask of the coordinator, and the tools that keep them.

The ``limits:`` settings (``LimitsConfig``), with their defaults::

    limits:
      max_message_bytes: 4MiB          # one gRPC message, on every service
      max_body_bytes: 64KiB            # one HTTP request body
      agent_message_rate: 100/s        # messages one agent stream may send...
      agent_message_burst: 1000        #   ...with this many at once
      agent_result_rate: auto          # results one agent may send: auto is 4x what its
      agent_result_burst: auto         #   checks produce on schedule (at least 100/s),
                                       #   bursts of 16 per check or a minute's worth
      max_checks_per_agent: 20000      # a checks file with more is refused
      max_streams_per_token: 8         # verdict watches one caller may hold open
      max_concurrent_rpcs: 4096        # gRPC calls in progress, all callers together
      handshake_timeout: 10s           # TLS handshake (and gRPC's HTTP/2 preface)
      http_idle_timeout: 30s           # a request's head (and body) must arrive within
                                       #   this of connecting or of the last answer
      max_http_connections: 1024       # open HTTP connections, all clients together...
      max_http_connections_per_client: 64   # ...and from one address

What happens over a limit, always with a clear status and a count in
``vantage_requests_refused_total{endpoint, reason}``:

- an oversized gRPC message: RESOURCE_EXHAUSTED (``too_large``); the message is read up
  to ``max_message_bytes`` plus ``GRPC_SLACK`` (gRPC's own limit, past which gRPC refuses
  it by itself, uncounted) and never parsed; one that does not parse: INVALID_ARGUMENT
  (``malformed``);
- an oversized HTTP body: 413 (``too_large``); a slow one: 408 (``timeout``);
- an agent above its message or result rate is *paced*, not cut off: the coordinator
  reads its next message only when the bucket allows (HTTP/2 flow control holds the
  agent back; ``throttled``), and keeps the stream alive meanwhile. Nothing is lost and
  no other agent waits;
- one caller's extra watch: RESOURCE_EXHAUSTED / 429 (``too_many_streams``);
- an HTTP connection over the caps is closed at once (``too_many_connections``); one
  whose request does not arrive in time is closed (``timeout``).
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any, Literal

import grpc
from google.protobuf.message import DecodeError
from pydantic import BaseModel, BeforeValidator, ByteSize, ConfigDict, Field, field_validator

from vantage.checks import Seconds
from vantage.durations import duration_within

# gRPC's own receive limit is this much above ours, so that an oversized message reaches
# our check (and is counted) instead of being refused silently by gRPC's core.
GRPC_SLACK = 1 << 20
MIN_RESULT_RATE = 100.0
RESULT_RATE_FACTOR = 4.0
RESULT_BURST_PER_CHECK = 16
RESULT_BURST_SECONDS = 60.0
# Clients whose buckets a RateLimiter keeps; the least recently seen go first beyond this.
MAX_CLIENTS = 10_000

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}


def parse_rate(value: Any) -> Any:
    """'10/min', '1/s', '100/hour' -> per second."""
    if not isinstance(value, str):
        raise ValueError("a rate is written like 10/min, 1/s or 100/hour")
    match = _RATE.match(value)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a rate (write e.g. 10/min, 1/s or 100/hour)")
    return float(match.group(1)) / _RATE_UNITS[match.group(2)]


def _rate_or_auto(value: Any) -> Any:
    return value if value == "auto" else parse_rate(value)


def format_rate(per_second: float) -> str:
    """The friendliest exact spelling: 1/6 -> '10/min'."""
    for unit, seconds in (("s", 1.0), ("min", 60.0), ("hour", 3600.0)):
        count = per_second * seconds
        if count >= 1 and abs(count - round(count)) < 1e-9:
            return f"{round(count)}/{unit}"
    return f"{per_second * 3600:g}/hour"


Rate = Annotated[float, BeforeValidator(parse_rate)]


class LimitsConfig(BaseModel):
    """The coordinator's ``limits:`` settings (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_message_bytes: ByteSize = Field(default=ByteSize(4 << 20), ge=1024, le=256 << 20)
    max_body_bytes: ByteSize = Field(default=ByteSize(64 << 10), ge=1024, le=64 << 20)
    agent_message_rate: Rate = 100.0
    agent_message_burst: int = Field(default=1000, ge=1)
    agent_result_rate: Annotated[float | Literal["auto"], BeforeValidator(_rate_or_auto)] = "auto"
    agent_result_burst: int | Literal["auto"] = "auto"
    max_checks_per_agent: int = Field(default=20_000, ge=1)
    max_streams_per_token: int = Field(default=8, ge=1)
    max_concurrent_rpcs: int = Field(default=4096, ge=16)
    handshake_timeout: Seconds = 10.0
    http_idle_timeout: Seconds = 30.0
    max_http_connections: int = Field(default=1024, ge=1)
    max_http_connections_per_client: int = Field(default=64, ge=1)

    @field_validator("agent_result_burst")
    @classmethod
    def _burst_positive(cls, burst: int | str) -> int | str:
        if isinstance(burst, int) and burst < 1:
            raise ValueError("must be at least 1, or auto")
        return burst

    @field_validator("handshake_timeout", "http_idle_timeout")
    @classmethod
    def _timeout_in_range(cls, seconds: float) -> float:
        return duration_within(seconds, 0.1, 3600.0)

    def result_rate(self, scheduled: float, checks: int) -> tuple[float, float]:
        """(results a second, burst) one agent may send, when its checks produce
        ``scheduled`` results a second on schedule from ``checks`` checks."""
        if self.agent_result_rate == "auto":
            rate = max(MIN_RESULT_RATE, RESULT_RATE_FACTOR * scheduled)
        else:
            rate = float(self.agent_result_rate)
        if self.agent_result_burst == "auto":
            burst = max(RESULT_BURST_PER_CHECK * checks, rate * RESULT_BURST_SECONDS)
        else:
            burst = float(self.agent_result_burst)
        return rate, burst


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up.

    ``try_take`` takes only what is there (refusing callers); ``debit`` always takes,
    going into debt, and says how long until the debt is paid (pacing a stream: wait
    that long before reading more)."""

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._then = clock()

    def set_rate(self, rate: float, burst: float) -> None:
        self._refill()
        self._rate = rate
        self._burst = burst
        self._tokens = min(self._tokens, burst)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._then) * self._rate)
        self._then = now

    def try_take(self, count: float = 1.0) -> float:
        """Take ``count`` tokens: 0 when there were enough, else the seconds until there
        will be (nothing taken)."""
        self._refill()
        if self._tokens >= count:
            self._tokens -= count
            return 0.0
        return (count - self._tokens) / self._rate

    def debit(self, count: float) -> float:
        """Take ``count`` tokens even if that leaves a debt; the seconds until it is paid."""
        self._refill()
        self._tokens -= count
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate


class RateLimiter:
    """A token bucket per client: ``rate`` tokens a second, at most ``burst`` saved up,
    one per call. The table keeps the ``max_clients`` most recently seen clients; one
    forgotten starts again with a full bucket (it had not called for a while)."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str) -> float:
        """Take a token for ``client``: 0 when it had one, else the seconds until it will
        (nothing taken)."""
        bucket = self._buckets.pop(client, None)
        if bucket is None:
            bucket = TokenBucket(self._rate, self._burst, clock=self._clock)
        self._buckets[client] = bucket
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return bucket.try_take()


class Unreadable:
    """What a request deserializer yields instead of a message it will not hand on: over
    the size limit (``too_large``, never parsed) or not a valid message of its type
    (``malformed``). The caller is refused with ``code`` and ``message``."""

    __slots__ = ("message", "reason")

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message

    @property
    def code(self) -> grpc.StatusCode:
        if self.reason == "too_large":
            return grpc.StatusCode.RESOURCE_EXHAUSTED
        return grpc.StatusCode.INVALID_ARGUMENT


def sized(parse: Callable[[bytes], Any], limit: int, kind: str) -> Callable[[bytes], Any]:
    """A gRPC request deserializer: ``parse(data)``, or ``Unreadable`` past ``limit`` or
    when ``data`` is not a ``kind`` message."""

    def deserialize(data: bytes) -> Any:
        if len(data) > limit:
            return Unreadable("too_large", too_large(len(data), limit))
        try:
            return parse(data)
        except DecodeError:
            return Unreadable("malformed", f"malformed message: not a valid {kind}")

    return deserialize


def too_large(size: int, limit: int) -> str:
    return f"message of {size:,} bytes is over the limit of {limit:,} (limits.max_message_bytes)"


def retry_after(seconds: float) -> str:
    return f"retry in {math.ceil(seconds)}s"

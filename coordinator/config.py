"""The coordinator's configuration: typed, frozen and validated once, at load.

A configuration file is YAML; every key is optional::

    listen: 127.0.0.1:7400          # gRPC, for agents and queries; port 0 picks a free port
    http_listen: 127.0.0.1:9470     # /metrics, /healthz and the JSON API (/api/v1/)
    tls:                            # TLS on both ports (vantage.tls); reloaded on change
      cert_file: fullchain.pem      #   beyond loopback either this or `tls: off` (plaintext,
      key_file: privkey.pem         #   warned at start) is required
      client_ca_file: agents-ca.pem #   mutual TLS: gRPC clients present a cert it signed
    query_auth: tokens              # tokens: queries need a query/checknow token (loopback
                                    # only while none exists); none: anyone may query
    checks_file: checks.yaml        # relative paths resolve against this file's directory
    tokens_file: tokens.yaml        # without one, no agent is admitted (coordinator.tokens)
    store_file: vantage.db          # verdict history (SQLite); without one the newest 100,000
                                    # are kept in memory, afresh (ids from 1) at each start
    history_retention: 30d          # transitions older than this are pruned (at least 1s)
    heartbeat_interval: 10s         # how often an idle agent says it is alive
    per_agent_metrics: false        # per-agent series on /metrics (bounded fleets only)
    on_demand:                      # CheckNow / `vantage check` (coordinator.ondemand)
      guard: true                   # refuse private, loopback, metadata... addresses
      allow: [198.51.100.0/24]      # CIDRs the guard lets through
      rate: 10/min                  # per caller (its token; its address when open), burst
      burst: 5
      max_in_flight: 16             # on-demand checks at once, whoever asks
      max_timeout: 30s              # the longest probe timeout a client may ask for
    limits:                         # what one caller may ask (coordinator.limits)
      max_message_bytes: 4MiB
      agent_result_rate: auto
      max_streams_per_token: 8
    mqtt:                           # publishing to a broker (coordinator.mqtt); off without url
      url: mqtt://broker:1883       # or mqtts://broker:8883 (TLS, verifying the broker)
      topic_prefix: vantage/        # topics: vantage/status, verdict/<check>, agent/<name>, events
      client_id: vantage-eu         # default: vantage-<hostname>-<pid>-<random>
      username: vantage             # with password_file: a file holding the password
      password_file: mqtt.password
      ca_file: broker-ca.pem        # mqtts only; default: the system's CAs
      queue_size: 10000             # transitions kept while the broker is away (oldest dropped)
      keepalive: 60s
    engine:                         # verdict thresholds (coordinator.judgement.EngineSettings)
      min_agents: 3
      min_regions: 2
      min_region_agents: 1
      fail_after: 2
      recover_after: 2
      stable_after: 5
      stale_intervals: 2.0

Every problem is one ``ConfigError`` line naming the file, the line and the field, e.g.
``coordinator.yaml:3: engine.fail_after: must be at least 1`` (see ``vantage.configfile``).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from vantage.checks import Seconds
from vantage.configfile import (
    ConfigError,
    is_loopback_host,
    read_yaml,
    resolve_path,
    split_host_port,
    validation_message,
)
from vantage.durations import duration_within, format_duration
from vantage.tls import ServerTlsConfig

from .auth import QueryAuth
from .judgement import EngineSettings
from .limits import LimitsConfig
from .mqtt import MqttConfig
from .ondemand import OnDemandConfig
from .store import RETENTION

DEFAULT_LISTEN = "127.0.0.1:7400"
DEFAULT_HTTP_LISTEN = "127.0.0.1:9470"
_ENGINE_DEFAULTS = EngineSettings()
# An agent that misses this many heartbeats in a row is considered gone (see AgentService).
MIN_HEARTBEAT_INTERVAL = 0.1
MAX_HEARTBEAT_INTERVAL = 3600.0
MIN_HISTORY_RETENTION = 1.0


class EngineConfig(BaseModel):
    """The ``engine:`` mapping; defaults come from ``EngineSettings`` itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_agents: int = Field(default=_ENGINE_DEFAULTS.min_agents, ge=1)
    min_regions: int = Field(default=_ENGINE_DEFAULTS.min_regions, ge=1)
    min_region_agents: int = Field(default=_ENGINE_DEFAULTS.min_region_agents, ge=1)
    fail_after: int = Field(default=_ENGINE_DEFAULTS.fail_after, ge=1)
    recover_after: int = Field(default=_ENGINE_DEFAULTS.recover_after, ge=1)
    stale_intervals: float = Field(default=_ENGINE_DEFAULTS.stale_intervals, gt=0)
    impaired_share: float = Field(default=_ENGINE_DEFAULTS.impaired_share, gt=0, lt=1)
    impaired_min_checks: int = Field(default=_ENGINE_DEFAULTS.impaired_min_checks, ge=1)
    second_opinion: bool = _ENGINE_DEFAULTS.second_opinion
    second_opinion_slack: float = Field(default=_ENGINE_DEFAULTS.second_opinion_slack, ge=0)
    adaptive_confirmation: bool = _ENGINE_DEFAULTS.adaptive_confirmation
    max_false_down: float = Field(default=_ENGINE_DEFAULTS.max_false_down, gt=0, lt=1)
    loss_memory: int = Field(default=_ENGINE_DEFAULTS.loss_memory, ge=1)
    stable_after: int = Field(default=_ENGINE_DEFAULTS.stable_after, ge=1)

    def settings(self) -> EngineSettings:
        return EngineSettings(**self.model_dump())


def _tls_off(value: Any) -> Any:
    """``tls: off`` (YAML reads it as false) and ``tls: "off"`` both mean plaintext."""
    return "off" if value is False or value == "off" else value


class CoordinatorConfig(BaseModel):
    """Everything the coordinator needs to start. Paths are absolute after ``load_config``."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    listen: str = DEFAULT_LISTEN
    http_listen: str = DEFAULT_HTTP_LISTEN
    # None: not configured (loopback only); "off": plaintext wherever, as asked.
    tls: Annotated[ServerTlsConfig | Literal["off"] | None, BeforeValidator(_tls_off)] = None
    query_auth: QueryAuth = QueryAuth.TOKENS
    checks_file: Path | None = None
    tokens_file: Path | None = None
    store_file: Path | None = None
    history_retention: Seconds = RETENTION
    heartbeat_interval: Seconds = 10.0
    per_agent_metrics: bool = False
    engine: EngineConfig = Field(default_factory=EngineConfig)
    on_demand: OnDemandConfig = Field(default_factory=OnDemandConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)

    @field_validator("listen", "http_listen")
    @classmethod
    def _is_host_port(cls, address: str) -> str:
        split_host_port(address, port_zero=True)
        return address

    @property
    def server_tls(self) -> ServerTlsConfig | None:
        """The TLS settings to serve with; None for plaintext."""
        return self.tls if isinstance(self.tls, ServerTlsConfig) else None

    def exposed(self) -> list[str]:
        """The listener settings (``listen``, ``http_listen``) beyond loopback."""
        return [
            name
            for name in ("listen", "http_listen")
            if not is_loopback_host(split_host_port(getattr(self, name), port_zero=True)[0])
        ]

    @field_validator("heartbeat_interval")
    @classmethod
    def _heartbeat_in_range(cls, seconds: float) -> float:
        return duration_within(seconds, MIN_HEARTBEAT_INTERVAL, MAX_HEARTBEAT_INTERVAL)

    @field_validator("history_retention")
    @classmethod
    def _retention_in_range(cls, seconds: float) -> float:
        if seconds < MIN_HISTORY_RETENTION:
            raise ValueError(
                f"{format_duration(seconds)} is below {format_duration(MIN_HISTORY_RETENTION)}"
            )
        return seconds


def load_config(path: Path | None) -> CoordinatorConfig:
    """Read and validate a configuration file; None gives the built-in defaults.

    Relative ``checks_file``, ``tokens_file``, ``store_file`` and the ``tls:`` and
    ``mqtt:`` files resolve against the file's directory.
    Raises ``ConfigError`` (one line: file, line, field) on any problem.
    """
    if path is None:
        return CoordinatorConfig()
    source = str(path)
    root, data = read_yaml(path, "config")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: expected a mapping of settings")
    try:
        config = CoordinatorConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, root, source)) from exc
    base = path.parent
    return config.model_copy(
        update={
            "checks_file": resolve_path(base, config.checks_file),
            "tokens_file": resolve_path(base, config.tokens_file),
            "store_file": resolve_path(base, config.store_file),
            "tls": tls.resolved(base) if (tls := config.server_tls) is not None else config.tls,
            "mqtt": config.mqtt.resolved(base),
        }
    )


def exposure_problem(config: CoordinatorConfig, has_query_tokens: bool) -> str | None:
    """Why ``config`` must not start as it is (one line), or None: a listener beyond
    loopback needs TLS or an explicit ``tls: off``, and query tokens or an explicit
    ``query_auth: none``."""
    exposed = config.exposed()
    if not exposed:
        return None
    where = " and ".join(f"{name} {getattr(config, name)}" for name in exposed)
    if config.tls is None:
        return (
            f"{where} is beyond loopback without TLS: set tls.cert_file and tls.key_file "
            "(or `tls: off` to serve plaintext there on purpose)"
        )
    if config.query_auth is QueryAuth.TOKENS and not has_query_tokens:
        return (
            f"{where} is beyond loopback and the tokens file has no query token: create one "
            "(vantage token create --name NAME --scope query), or set `query_auth: none` to "
            "let anyone who reaches the port query"
        )
    return None


def engine_fields() -> tuple[str, ...]:
    """EngineSettings' field names: the ``engine:`` mapping must cover exactly these."""
    return tuple(field.name for field in fields(EngineSettings))

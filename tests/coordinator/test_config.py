"""The coordinator's configuration file: defaults, paths, and one-line errors."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig, EngineConfig, load_config
from coordinator.judgement import EngineSettings
from vantage.checks import ConfigError
from vantage.configfile import split_host_port


def test_no_file_gives_the_defaults() -> None:
    config = load_config(None)
    assert config.listen == "127.0.0.1:7400"
    assert config.http_listen == "127.0.0.1:9470"
    assert config.checks_file is None
    assert config.tokens_file is None
    assert config.heartbeat_interval == 10.0
    assert config.per_agent_metrics is False
    assert config.engine.settings() == EngineSettings()


def test_a_full_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "coordinator.yaml"
    path.parent.mkdir()
    path.write_text(
        "listen: '[::1]:0'\n"
        "http_listen: 0.0.0.0:9000\n"
        "checks_file: checks.yaml\n"
        "tokens_file: /etc/vantage/tokens.yaml\n"
        "heartbeat_interval: 500ms\n"
        "per_agent_metrics: true\n"
        "engine:\n"
        "  min_agents: 5\n"
        "  stale_intervals: 3\n"
    )
    config = load_config(path)
    assert config.checks_file == tmp_path / "conf" / "checks.yaml"
    assert config.tokens_file == Path("/etc/vantage/tokens.yaml")
    assert config.heartbeat_interval == 0.5
    assert config.engine.settings() == EngineSettings(min_agents=5, stale_intervals=3.0)
    assert split_host_port(config.listen, port_zero=True) == ("::1", 0)


def test_engine_section_covers_every_engine_setting() -> None:
    assert set(EngineConfig.model_fields) == {f.name for f in fields(EngineSettings)}


def test_config_is_frozen() -> None:
    with pytest.raises(ValueError, match="frozen"):
        CoordinatorConfig().listen = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listen: nowhere\n", "c.yaml:1: listen: 'nowhere' is not host:port"),
        ("listen: 127.0.0.1:7400\nhttp_listen: h:99999\n", "c.yaml:2: http_listen: 'h:99999'"),
        ("listen: '::1:7400'\n", "c.yaml:1: listen: '::1:7400': write an IPv6 address in"),
        ("heartbeat_interval: soon\n", "c.yaml:1: heartbeat_interval: 'soon' is not a duration"),
        ("heartbeat_interval: 2h\n", "c.yaml:1: heartbeat_interval: 2h is outside"),
        ("engine:\n  min_agents: 1\n  fail_after: 0\n", "c.yaml:3: engine.fail_after: must be at"),
        ("engine:\n  fail_afterr: 2\n", "c.yaml:2: unknown field 'engine.fail_afterr'"),
        ("per_agent_metrics: maybe\n", "c.yaml:1: per_agent_metrics: must be a valid boolean"),
        ("colour: red\n", "c.yaml:1: unknown field 'colour'"),
        ("- listen\n", "c.yaml:1: expected a mapping of settings"),
        ("listen: [\n", "c.yaml:2: invalid YAML"),
    ],
)
def test_mistakes_are_one_line_with_file_line_and_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(path.parent)), message
    assert expected in message


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config file"):
        load_config(tmp_path / "nope.yaml")

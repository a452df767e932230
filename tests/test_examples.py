"""The example files in deploy/examples are valid, commented-out examples included."""

from __future__ import annotations

import re
from pathlib import Path

from coordinator.config import load_config
from coordinator.tokens import TokenRegistry, load_tokens
from vantage.checks import load_checks, parse_checks

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"


def test_the_example_checks_load() -> None:
    names = [check.name for check in load_checks(EXAMPLES / "checks.yaml")]
    assert names == ["coordinator-http", "coordinator-grpc", "nothing-listens"]


def test_the_commented_real_world_examples_are_valid() -> None:
    text = (EXAMPLES / "checks.yaml").read_text()
    block = text[text.index("# Real-world checks look like this:") :]
    lines = [re.sub(r"^#  ?", "", line) for line in block.splitlines()[1:] if line.startswith("#")]
    checks = parse_checks("checks:\n" + "\n".join(lines) + "\n", "example")
    assert {check.type for check in checks} == {"http", "tcp", "dns", "icmp"}


def test_the_example_coordinator_config_loads() -> None:
    config = load_config(EXAMPLES / "coordinator.yaml")
    assert config.checks_file == EXAMPLES / "checks.yaml"
    entries = load_tokens(EXAMPLES / "tokens.yaml")
    assert [(entry.agent, entry.region) for entry in entries] == [
        ("eu-1", "eu"),
        ("us-1", "us"),
        ("ap-1", "ap"),
    ]


def test_each_make_run_agent_has_its_own_token() -> None:
    registry = TokenRegistry.load(EXAMPLES / "tokens.yaml")
    assert not registry.warnings  # hashed entries, no plaintext one
    for name in ("eu-1", "us-1", "ap-1"):
        entry = registry.authenticate((EXAMPLES / "tokens" / f"{name}.token").read_text().strip())
        assert entry is not None
        assert entry.agent == name


def test_the_commented_internet_settings_are_valid(tmp_path: Path) -> None:
    """Uncommented, the tls:, query_auth: and limits: blocks of the example load."""
    text = (EXAMPLES / "coordinator.yaml").read_text()
    blocks: list[str] = []
    inside = False
    for line in text.splitlines():
        if re.match(r"^# (tls|query_auth|limits):", line):
            inside = True
        elif not line.startswith("#   "):
            inside = False
        if inside:
            blocks.append(line[2:])
    settings = [line for line in text.splitlines() if not line.startswith("#")]
    path = tmp_path / "coordinator.yaml"
    path.write_text("\n".join(settings + blocks) + "\n")
    config = load_config(path)
    assert config.server_tls is not None
    assert config.server_tls.client_ca_file is not None
    assert config.limits.max_body_bytes == 64 << 10

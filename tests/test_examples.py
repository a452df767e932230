"""The example files in deploy/examples are valid, commented-out examples included."""

from __future__ import annotations

import re
from pathlib import Path

from coordinator.config import load_config
from coordinator.tokens import load_tokens
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
    assert len(load_tokens(EXAMPLES / "tokens.yaml")) == 1

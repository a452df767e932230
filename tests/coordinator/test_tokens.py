"""Agent tokens: the file's rules, and who a token admits."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.tokens import TokenEntry, TokenRegistry
from vantage.checks import ConfigError

ANY = "shared-token-0123456789"
EU1 = "eu1-token-0123456789ab"


def test_tokens_admit_any_name_or_only_their_own() -> None:
    tokens = TokenRegistry([TokenEntry(token=ANY), TokenEntry(token=EU1, agent="eu-1")])
    assert tokens.admits(ANY, "anyone")
    assert tokens.admits(EU1, "eu-1")
    assert not tokens.admits(EU1, "eu-2")
    assert not tokens.admits("unknown-token-0123456789", "eu-1")
    assert not tokens.admits("", "eu-1")
    assert not tokens.admits("ünïcode-tökén-0123456789", "eu-1")
    assert tokens.known(EU1)
    assert not tokens.known(ANY[:-1])


def test_no_tokens_admit_nobody() -> None:
    assert not TokenRegistry().admits(ANY, "eu-1")


def test_load(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(f"tokens:\n  - token: {ANY}\n  - {{token: {EU1}, agent: eu-1}}\n")
    tokens = TokenRegistry.load(path)
    assert len(tokens) == 2
    assert tokens.admits(EU1, "eu-1")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tokens:\n  - token: short\n", "t.yaml:2: tokens[0]: token: a token has at least 16"),
        (
            f"tokens:\n  - token: {ANY}\n  - token: {EU1}\n  - token: {ANY}\n",
            "t.yaml:4: tokens[2]: duplicate token (first listed on line 2)",
        ),
        (
            f"tokens:\n  - token: {ANY}\n    agent: 'bad name'\n",
            "t.yaml:3: tokens[0]: agent name 'bad name' is invalid",
        ),
        (f"tokens:\n  - token: {ANY}\n    role: x\n", "t.yaml:3: tokens[0]: unknown field 'role'"),
        ("tokens:\n  - agent: eu-1\n", "t.yaml:2: tokens[0]: missing required field 'token'"),
        ("tokens:\n  - just-a-string\n", "t.yaml:2: tokens[0]: expected a mapping"),
        ("tokens:\n  - token: 'with space 0123456789'\n", "t.yaml:2: tokens[0]: token: a token"),
        ("secrets: []\n", "t.yaml:1: unknown key 'secrets'"),
        ("tokens: yes\n", "t.yaml:1: expected a mapping with a 'tokens' list"),
    ],
)
def test_mistakes_are_one_line_with_the_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        TokenRegistry.load(path)
    message = str(caught.value)
    assert "\n" not in message
    assert expected in message
    assert ANY not in message

"""Tokens: the file's rules, what a token admits, and `vantage token`'s edits of the file."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest

from coordinator.tokens import (
    Scope,
    TokenFile,
    TokenRegistry,
    digest,
    load_tokens,
    new_token,
    parse_tokens,
)
from vantage.checks import ConfigError

PLAIN = "shared-token-0123456789"
EU1 = "eu1-token-0123456789ab"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def registry(text: str) -> TokenRegistry:
    return TokenRegistry(parse_tokens(text, "t.yaml"), source="t.yaml")


def test_a_new_token_is_192_random_bits_and_only_its_hash_is_stored(tmp_path: Path) -> None:
    token = new_token()
    assert token.startswith("vt1_")
    assert len(token) == 4 + 32
    assert new_token() != token
    file = TokenFile(tmp_path / "tokens.yaml")
    token, entry = file.create("fra-1", Scope.AGENT, "eu")
    text = (tmp_path / "tokens.yaml").read_text()
    assert token not in text
    assert sha(token) in text
    assert entry.digest == digest(token)
    assert TokenRegistry.load(tmp_path / "tokens.yaml").authenticate(token) == entry


def test_an_agent_token_binds_name_and_region() -> None:
    tokens = registry(
        f"tokens:\n  - {{name: fra-1, scope: agent, region: eu, sha256: {sha(EU1)}}}\n"
    )
    entry = tokens.authenticate(EU1)
    assert entry is not None
    assert entry.refusal("fra-1", "eu") is None
    assert entry.refusal("fra-2", "eu") == "token 'fra-1' is bound to agent fra-1, not fra-2"
    assert entry.refusal("fra-1", "us") == "token 'fra-1' is bound to region eu, not us"
    assert tokens.authenticate(EU1[:-1]) is None
    assert tokens.authenticate("") is None
    assert tokens.authenticate("ünïcode-tökén-0123456789") is None


def test_query_tokens_do_not_connect_agents_and_scopes_nest() -> None:
    tokens = registry(
        "tokens:\n"
        f"  - {{name: grafana, scope: query, sha256: {sha('q' * 20)}}}\n"
        f"  - {{name: oncall, scope: checknow, sha256: {sha('c' * 20)}}}\n"
    )
    query = tokens.authenticate("q" * 20)
    assert query is not None
    assert query.refusal("grafana", "eu") == "token 'grafana' is a query token, not an agent token"
    assert Scope.CHECKNOW.allows(Scope.QUERY)
    assert not Scope.QUERY.allows(Scope.CHECKNOW)
    assert not Scope.AGENT.allows(Scope.QUERY)
    assert tokens.has_scope(Scope.QUERY)
    assert not tokens.has_scope(Scope.AGENT)
    assert tokens.named("oncall") is not None
    assert tokens.named("nobody") is None


def test_plaintext_entries_still_admit_with_a_warning() -> None:
    tokens = registry(f"tokens:\n  - token: {PLAIN}\n  - {{token: {EU1}, agent: eu-1}}\n")
    shared, bound = tokens.authenticate(PLAIN), tokens.authenticate(EU1)
    assert shared is not None
    assert bound is not None
    assert shared.refusal("anyone", "anywhere") is None
    assert bound.refusal("eu-1", "anywhere") is None
    assert bound.refusal("eu-2", "eu") == "token 'eu-1' is bound to agent eu-1, not eu-2"
    assert [w.split(": ", 1)[0] for w in tokens.warnings] == ["t.yaml:2", "t.yaml:3"]
    assert all("vantage token create" in warning for warning in tokens.warnings)
    assert PLAIN not in " ".join(tokens.warnings)
    # A plaintext entry stands for no named identity (a certificate cannot claim it).
    assert tokens.named("eu-1") is None


def test_an_entry_survives_edits_around_it_but_not_a_change_of_its_own() -> None:
    line = f"  - {{name: fra-1, scope: agent, region: eu, sha256: {sha(EU1)}}}\n"
    before = registry("tokens:\n" + line)
    entry = before.authenticate(EU1)
    moved = registry(
        f"tokens:\n  - {{name: other, scope: query, sha256: {sha('o' * 20)}}}\n" + line
    )
    assert entry in moved
    assert entry not in registry("tokens:\n" + line.replace("region: eu", "region: us"))
    assert entry not in registry("tokens: []\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tokens:\n  - token: short\n", "t.yaml:2: tokens[0]: token: a token has at least 16"),
        (
            f"tokens:\n  - token: {PLAIN}\n  - token: {EU1}\n  - token: {PLAIN}\n",
            "t.yaml:4: tokens[2]: duplicate token (first listed on line 2)",
        ),
        (
            f"tokens:\n  - token: {PLAIN}\n    agent: 'bad name'\n",
            "t.yaml:3: tokens[0]: agent name 'bad name' is invalid",
        ),
        (
            f"tokens:\n  - token: {PLAIN}\n    role: x\n",
            "t.yaml:3: tokens[0]: unknown field 'role'",
        ),
        ("tokens:\n  - just-a-string\n", "t.yaml:2: tokens[0]: expected a mapping"),
        ("tokens:\n  - token: 'with space 0123456789'\n", "t.yaml:2: tokens[0]: token: a token"),
        ("secrets: []\n", "t.yaml:1: unknown key 'secrets'"),
        ("tokens: yes\n", "t.yaml:1: expected a mapping with a 'tokens' list"),
        (
            "tokens:\n  - {name: a, scope: agent, region: eu, sha256: abc}\n",
            "t.yaml:2: tokens[0]: sha256: expected 64 hexadecimal digits",
        ),
        (
            f"tokens:\n  - {{name: a, scope: agent, sha256: {sha('x')}}}\n",
            "t.yaml:2: tokens[0]: region: an agent token is bound to a region",
        ),
        (
            f"tokens:\n  - {{name: a, scope: query, region: eu, sha256: {sha('x')}}}\n",
            "t.yaml:2: tokens[0]: region: a query token has no region",
        ),
        (
            f"tokens:\n  - {{name: a, scope: admin, sha256: {sha('x')}}}\n",
            "t.yaml:2: tokens[0]: scope:",
        ),
        (
            f"tokens:\n  - {{name: -a, scope: query, sha256: {sha('x')}}}\n",
            "t.yaml:2: tokens[0]: name: token name '-a' is invalid",
        ),
        (
            f"tokens:\n  - {{name: a, scope: query, sha256: {sha('x')}}}\n"
            f"  - {{name: a, scope: query, sha256: {sha('y')}}}\n",
            "t.yaml:3: tokens[1]: duplicate name 'a' (first listed on line 2)",
        ),
        (
            f"tokens:\n  - {{name: a, scope: query, sha256: {sha('x')}}}\n"
            f"  - {{name: b, scope: query, sha256: {sha('x')}}}\n",
            "t.yaml:3: tokens[1]: duplicate token (first listed on line 2)",
        ),
        ("tokens:\n  - {scope: query}\n", "t.yaml:2: tokens[0]: missing required field 'name'"),
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
    assert PLAIN not in message


def test_create_and_revoke_keep_comments_order_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(
        "# ours: keep this\ntokens:\n  # the old way\n"
        f"  - token: {PLAIN}   # shared\n    agent: eu-1\n"
    )
    path.chmod(0o640)
    file = TokenFile(path)
    token, entry = file.create("us-1", Scope.AGENT, "us")
    file.create("grafana", Scope.QUERY, None)
    text = path.read_text()
    assert text.startswith("# ours: keep this\ntokens:\n  # the old way\n")
    assert "# shared" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [e.name for e in load_tokens(path)] == ["eu-1", "us-1", "grafana"]
    assert [e.name for e in file.revoke("eu-1")] == ["eu-1"]
    assert [e.name for e in load_tokens(path)] == ["us-1", "grafana"]
    assert TokenRegistry.load(path).authenticate(token) == entry
    file.revoke("us-1")
    file.revoke("grafana")
    assert load_tokens(path) == ()
    assert "# ours: keep this" in path.read_text()


def test_a_new_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    TokenFile(path).create("grafana", Scope.QUERY, None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_refusals_change_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    file = TokenFile(path)
    file.create("fra-1", Scope.AGENT, "eu")
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="a token named 'fra-1' exists"):
        file.create("fra-1", Scope.AGENT, "us")
    with pytest.raises(ConfigError, match="no token named 'nobody'"):
        file.revoke("nobody")
    with pytest.raises(ConfigError, match="region: an agent token is bound to a region"):
        file.create("fra-2", Scope.AGENT, None)
    assert path.read_bytes() == before
    # A file with a mistake is not edited: the mistake is what the command says.
    path.write_text(before.decode() + "  - nonsense\n")
    broken = path.read_bytes()
    with pytest.raises(ConfigError, match="expected a mapping"):
        file.create("fra-3", Scope.AGENT, "eu")
    assert path.read_bytes() == broken
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tokens.yaml.")
                and not name.endswith(".lock")]  # fmt: skip


def test_concurrent_creates_all_land(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    errors: list[BaseException] = []

    def create(index: int) -> None:
        try:
            TokenFile(path).create(f"agent-{index}", Scope.AGENT, "eu")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(e.name for e in load_tokens(path)) == sorted(f"agent-{i}" for i in range(8))

"""Checks files: every mistake is one line naming file, line and field."""

from __future__ import annotations

import pytest

from vantage.checks import ConfigError, HttpCheck, TcpCheck, parse_check, parse_checks


def test_a_valid_file_gives_typed_checks_with_defaults() -> None:
    checks = parse_checks(
        "checks:\n"
        "  - {name: web, type: http, target: 'https://example.org/',"
        " expected_status: [200, '300-302']}\n"
        "  - {name: db, type: tcp, target: '[::1]:5432', interval: 1m, timeout: 500ms}\n",
        "checks.yaml",
    )
    web, db = checks
    assert isinstance(web, HttpCheck)
    assert web.interval == 30.0
    assert web.timeout == 10.0
    assert web.method == "GET"
    assert web.expected_status == ((200, 200), (300, 302))
    assert isinstance(db, TcpCheck)
    assert (db.interval, db.timeout) == (60.0, 0.5)


def test_revision_follows_the_spec() -> None:
    one = parse_checks("checks:\n  - {name: a, type: tcp, target: 'h:1'}\n", "f")[0]
    same = parse_checks("checks:\n  - {name: a, type: tcp, target: 'h:1'}\n", "f")[0]
    other = parse_checks("checks:\n  - {name: a, type: tcp, target: 'h:2'}\n", "f")[0]
    assert one.revision == same.revision != other.revision
    assert 0 < one.revision < 2**63


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("checks:\n  - {name: w, type: icmpx, target: h}\n", "f:2: check 'w': unknown probe type"),
        (
            "checks:\n  - name: w\n    type: tcp\n",
            "f:2: check 'w': missing required field 'target'",
        ),
        (
            "checks:\n  - name: w\n    type: tcp\n    target: h:1\n    colour: red\n",
            "f:5: check 'w': unknown field 'colour'",
        ),
        (
            "checks:\n  - {name: 'a b', type: tcp, target: 'h:1'}\n",
            "f:2: check 'a b': name: 'a b' is not a valid check name",
        ),
        ("checks:\n  - {name: w, type: tcp, target: 'h:0'}\n", "port in 1-65535"),
        (
            "checks:\n  - {name: w, type: http, target: 'ftp://h/'}\n",
            "is not an http:// or https:// URL",
        ),
        (
            "checks:\n  - {name: w, type: http, target: 'http://h/', expected_status: []}\n",
            "at least one",
        ),
        (
            "checks:\n  - {name: w, type: tcp, target: 'h:1', labels: {'a-b': x}}\n",
            "label name 'a-b'",
        ),
        (
            "checks:\n  - {name: w, type: tcp, target: 'h:1', interval: 2w}\n",
            "'2w' is not a duration",
        ),
        (
            "checks:\n  - {name: w, type: tcp, target: 'h:1', interval: 2d}\n",
            "interval 48h is outside 1s..24h",
        ),
        (
            "checks:\n  - {name: w, type: tcp, target: 'h:1', verdict: {fail_after: 0}}\n",
            "verdict.fail_after: must be at least 1",
        ),
        (
            "checks:\n  - {name: w, type: tcp, target: 'h:1', verdict: {quorum: 3}}\n",
            "unknown field 'verdict.quorum'",
        ),
        (
            # A trailing newline must not slip through the name pattern's ``$``.
            'checks:\n  - {name: "web\\n", type: tcp, target: "h:1"}\n',
            "'web\\n' is not a valid check name",
        ),
        ("checks: [\n", "f:2: invalid YAML"),
        ("nothing: here\n", "f:1: unknown key 'nothing'"),
    ],
)
def test_mistakes_are_one_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_checks(text, "f")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_text_is_taken_as_written() -> None:
    (check,) = parse_checks(
        "checks:\n"
        '  - {name: smtp, type: tcp, target: "h:25", send: "QUIT\\r\\n", expect: "^220 "}\n',
        "f",
    )
    assert isinstance(check, TcpCheck)
    assert check.send == "QUIT\r\n"
    assert check.expect == "^220 "


def test_verdict_options_override_thresholds_without_changing_the_revision() -> None:
    plain = parse_check({"name": "w", "type": "tcp", "target": "h:1"})
    strict = parse_check(
        {"name": "w", "type": "tcp", "target": "h:1", "verdict": {"fail_after": 4}}
    )
    assert strict.verdict.overrides() == {"fail_after": 4}
    assert plain.verdict.overrides() == {}
    assert strict.revision == plain.revision  # the agents' probe is the same


def test_canary_is_the_coordinators_and_does_not_change_the_revision() -> None:
    plain = parse_check({"name": "c", "type": "icmp", "target": "198.18.0.1"})
    canary = parse_check({"name": "c", "type": "icmp", "target": "198.18.0.1", "canary": True})
    assert canary.canary
    assert not plain.canary
    assert canary.revision == plain.revision

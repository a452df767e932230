"""Fuzzing the coordinator where the internet reaches it: agent streams (Hello, result
batches and their acks, heartbeats, on-demand answers), every query RPC, and the JSON
API's paths, query strings and bodies. Hypothesis writes the inputs, as well-formed
messages with hostile values and as raw bytes; one real coordinator process takes them
all over real sockets.

What must hold for every input: the coordinator answers with a status or HTTP code that
says what was wrong with the input (never UNKNOWN, INTERNAL or a 5xx, which mean an
exception escaped a handler), it stays up, it logs no traceback, and it goes on serving
a well-behaved client.

``make test`` runs a bounded search (``FUZZ_EXAMPLES`` inputs per target, the same ones on
every CI run); ``make fuzz`` a long random one whose failures Hypothesis keeps in
``.hypothesis/`` to replay. Every input that ever broke something is an ``@example``
below, so it is tried on every run.

The coordinator runs in a mount namespace of its own whose resolv.conf names 127.0.0.1:
a fuzzed CheckNow target that is a host name is looked up there, so no lookup leaves
loopback.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from running_system import Coordinator, System, free_port

from coordinator.tokens import Scope, TokenFile
from vantage_proto.v1 import agent_pb2, query_pb2

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Codes that mean the coordinator did not understand what happened: an escaped exception.
CRASH_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}
LEGACY_TOKEN = "fuzz-legacy-token-0123456789abcdef"
CHECKS = ("web", "port")
QUERY = "/vantage.v1.QueryService/"
HTTP_LINE_LIMIT = 8190


class Fuzzed:
    """The coordinator under fuzz and the tokens it admits."""

    def __init__(self, coordinator: Coordinator, tokens: dict[str, str]) -> None:
        self.coordinator = coordinator
        self.tokens = tokens
        self.channel = grpc.insecure_channel(coordinator.address)

    def healthy(self) -> None:
        """Up, no traceback, and a well-behaved query is answered."""
        proc = self.coordinator.proc
        assert proc.popen.poll() is None, f"the coordinator exited: {proc.stderr()[-3000:]}"
        assert "Traceback" not in proc.stderr(), proc.stderr()[-5000:]
        listed = self.channel.unary_unary(
            QUERY + "ListVerdicts",
            request_serializer=query_pb2.ListVerdictsRequest.SerializeToString,
            response_deserializer=query_pb2.ListVerdictsResponse.FromString,
        )(query_pb2.ListVerdictsRequest(), timeout=10, metadata=self.bearer("query"))
        assert sorted(v.check for v in listed.verdicts) == sorted(CHECKS)

    def bearer(self, which: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.tokens[which]}")]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    directory = tmp_path_factory.mktemp("fuzz")
    system = System(directory)
    (directory / "checks.yaml").write_text(
        "checks:\n"
        f"  - {{name: web, type: http, target: 'http://127.0.0.1:{free_port()}/', "
        "interval: 1s, timeout: 500ms}\n"
        f"  - {{name: port, type: tcp, target: '127.0.0.1:{free_port()}', "
        "interval: 1s, timeout: 500ms}\n"
    )
    tokens_file = TokenFile(directory / "tokens.yaml")
    tokens = {
        "agent": tokens_file.create("fz-1", Scope.AGENT, "fz")[0],
        "query": tokens_file.create("reader", Scope.QUERY, None)[0],
        "checknow": tokens_file.create("runner", Scope.CHECKNOW, None)[0],
        "legacy": LEGACY_TOKEN,
    }
    with (directory / "tokens.yaml").open("a") as legacy:
        legacy.write(f"  - token: {LEGACY_TOKEN}\n")  # any name, any region
    (directory / "coordinator.yaml").write_text(
        "listen: 127.0.0.1:0\n"
        "http_listen: 127.0.0.1:0\n"
        "checks_file: checks.yaml\n"
        "tokens_file: tokens.yaml\n"
        "heartbeat_interval: 1s\n"
        "on_demand: {allow: [127.0.0.0/8], rate: 10000/min, burst: 10000}\n"
        "limits: {max_message_bytes: 64KiB, max_body_bytes: 16KiB}\n"
    )
    resolv = directory / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    own_resolver = (
        "unshare", "--mount", "--propagation", "private", "sh", "-c",
        'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv),
    )  # fmt: skip
    try:
        coordinator = system.coordinator(directory / "coordinator.yaml", prefix=own_resolver)
        fuzz = Fuzzed(coordinator, tokens)
        yield fuzz
        fuzz.healthy()
        fuzz.channel.close()
    finally:
        system.stop_all()


# -- strategies -------------------------------------------------------------------------

UINT64 = st.integers(0, 2**64 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT32 = st.integers(0, 2**32 - 1)
ENUM = st.integers(-(2**31), 2**31 - 1)
NAMES = st.one_of(
    st.sampled_from(["fz-1", "fz-2", "eu-1", "", "-x", "..", "a" * 65, "fz 1", "é"]),
    st.text(max_size=80),
)
TEXT = st.one_of(st.text(max_size=200), st.sampled_from(["", "\x00", "x" * 9000]))
CHECK_NAMES = st.one_of(st.sampled_from([*CHECKS, "", "nope", "web\x00"]), st.text(max_size=40))


def _tls() -> st.SearchStrategy[agent_pb2.TlsDetails]:
    return st.builds(
        agent_pb2.TlsDetails,
        version=TEXT,
        cipher=TEXT,
        earliest_expiry_unix=INT64,
        subject=TEXT,
        issuer=TEXT,
    )


DETAILS = st.one_of(
    st.just({}),
    st.builds(
        lambda **kw: {"http": agent_pb2.HttpDetails(**kw)},
        status_code=UINT32,
        http_version=TEXT,
        final_url=TEXT,
        body_bytes=UINT64,
        redirects=UINT32,
        peer=TEXT,
        tls=_tls(),
    ),
    st.builds(
        lambda **kw: {"tcp": agent_pb2.TcpDetails(**kw)}, peer=TEXT, tls=_tls(), received=TEXT
    ),
    st.builds(
        lambda **kw: {"dns": agent_pb2.DnsDetails(**kw)},
        rcode=TEXT,
        answers=st.lists(TEXT, max_size=5),
        server=TEXT,
        tcp_fallback=st.booleans(),
    ),
    st.builds(
        lambda **kw: {"icmp": agent_pb2.IcmpDetails(**kw)},
        sent=UINT32,
        received=UINT32,
        loss_percent=st.floats(allow_nan=True, allow_infinity=True),
        rtt_min_us=UINT64,
        rtt_avg_us=UINT64,
        rtt_max_us=UINT64,
        address=TEXT,
    ),
)


@st.composite
def results(draw: st.DrawFn) -> agent_pb2.ProbeResult:
    return agent_pb2.ProbeResult(
        check=draw(CHECK_NAMES),
        check_revision=draw(UINT64),
        seq=draw(st.one_of(st.integers(0, 20), UINT64)),
        started_unix_us=draw(st.one_of(st.just(0), INT64)),
        duration_us=draw(UINT64),
        success=draw(st.booleans()),
        failure=draw(st.one_of(st.integers(0, 20), ENUM)),
        message=draw(TEXT),
        phases=agent_pb2.Phases(
            resolve_us=draw(UINT64), connect_us=draw(UINT64), tls_us=draw(UINT64)
        ),
        warnings=draw(st.lists(TEXT, max_size=3)),
        **draw(DETAILS),
    )


HELLO = st.builds(
    agent_pb2.Hello,
    name=NAMES,
    region=st.one_of(st.just("fz"), NAMES),
    version=TEXT,
    capabilities=st.lists(st.one_of(st.sampled_from(["http", "tcp", "dns", "icmp"]), TEXT)),
    instance_id=TEXT,
)
GOOD_HELLO = st.builds(
    agent_pb2.Hello,
    name=st.just("fz-1"),
    region=st.just("fz"),
    version=st.just("fuzz"),
    capabilities=st.just(["http", "tcp", "dns", "icmp"]),
    instance_id=st.text(max_size=8),
)
MESSAGE = st.one_of(
    st.builds(lambda h: agent_pb2.AgentMessage(hello=h), HELLO),
    st.builds(
        lambda r: agent_pb2.AgentMessage(results=agent_pb2.ResultBatch(results=r)),
        st.lists(results(), max_size=20),
    ),
    st.builds(
        lambda t: agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(sent_unix_us=t)), INT64
    ),
    st.builds(
        lambda rid, result, refused: agent_pb2.AgentMessage(
            probe_response=agent_pb2.ProbeResponse(request_id=rid, result=result, refused=refused)
        ),
        TEXT,
        results(),
        TEXT,
    ),
    st.just(agent_pb2.AgentMessage()),
)
FRAME = st.one_of(MESSAGE.map(lambda m: m.SerializeToString()), st.binary(max_size=2000))
AUTH = st.one_of(
    st.sampled_from(["agent", "legacy", "query", "none"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80),
)


def _metadata(fuzzed: Fuzzed, auth: str) -> list[tuple[str, str]]:
    if auth == "none":
        return []
    if auth in fuzzed.tokens:
        return fuzzed.bearer(auth)
    return [("authorization", f"Bearer {auth}")]


def _stream_status(call: Any) -> grpc.StatusCode:
    try:
        for _ in call:
            pass
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


# -- agent streams ----------------------------------------------------------------------


@FUZZ
@given(
    auth=AUTH,
    hello=st.one_of(
        GOOD_HELLO.map(lambda h: agent_pb2.AgentMessage(hello=h).SerializeToString()), FRAME
    ),
    frames=st.lists(FRAME, max_size=8),
)
@example(auth="agent", hello=b"\xff", frames=[]).via("a Hello that is not protobuf")
@example(
    auth="agent",
    hello=agent_pb2.AgentMessage(
        hello=agent_pb2.Hello(name="fz-1", region="fz")
    ).SerializeToString(),
    frames=[
        agent_pb2.AgentMessage(
            results=agent_pb2.ResultBatch(
                results=[agent_pb2.ProbeResult(check="web", seq=2**64 - 1)]
            )
        ).SerializeToString()
    ],
).via("the largest sequence number")
def test_agent_streams(fuzzed: Fuzzed, auth: str, hello: bytes, frames: list[bytes]) -> None:
    connect = fuzzed.channel.stream_stream("/vantage.v1.AgentService/Connect")
    call = connect(iter([hello, *frames]), timeout=10, metadata=_metadata(fuzzed, auth))
    code = _stream_status(call)
    assert code not in CRASH_CODES, (code, call.details())
    fuzzed.healthy()


# -- query RPCs ---------------------------------------------------------------------------

TIMESTAMP = st.builds(
    lambda s, n: {"seconds": s, "nanos": n}, INT64, st.integers(-(2**31), 2**31 - 1)
)
IP = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.sampled_from(["127.0.0.1", "localhost", "[::1]", "169.254.169.254", "10.0.0.1"]),
)
TARGET = st.one_of(
    st.builds(
        lambda scheme, host, port, path: f"{scheme}{host}{port}{path}",
        st.sampled_from(["http://", "https://", "", "ftp://", "http:/", "//"]),
        IP,
        st.one_of(st.just(""), st.integers(-1, 70_000).map(lambda p: f":{p}")),
        st.one_of(st.just("/"), st.text(max_size=40).map(urllib.parse.quote)),
    ),
    # Text with no dot and no colon: never a name a resolver is asked about but here.
    st.text(st.characters(blacklist_characters=".:"), max_size=60),
)
REQUESTS: dict[str, st.SearchStrategy[Any]] = {
    "GetVerdict": st.builds(query_pb2.GetVerdictRequest, check=CHECK_NAMES),
    "ListVerdicts": st.builds(
        query_pb2.ListVerdictsRequest,
        states=st.lists(st.one_of(st.integers(0, 7), ENUM), max_size=8),
        labels=st.dictionaries(TEXT, TEXT, max_size=4),
    ),
    "ListAgents": st.just(query_pb2.ListAgentsRequest()),
    "GetHistory": st.builds(
        lambda check, since, until, limit: query_pb2.GetHistoryRequest(
            check=check, since=since, until=until, limit=limit
        ),
        CHECK_NAMES,
        TIMESTAMP,
        TIMESTAMP,
        UINT32,
    ),
    "WatchVerdicts": st.builds(
        lambda after, checks: (
            query_pb2.WatchVerdictsRequest(after_id=after, checks=checks)
            if after is not None
            else query_pb2.WatchVerdictsRequest(checks=checks)
        ),
        st.one_of(st.none(), UINT64),
        st.lists(CHECK_NAMES, max_size=4),
    ),
    "CheckNow": st.builds(
        query_pb2.CheckNowRequest,
        target=TARGET,
        type=st.one_of(st.sampled_from(["", "http", "tcp", "dns", "icmp"]), TEXT),
        timeout_ms=st.one_of(st.integers(0, 3000), UINT32),
    ),
}


@FUZZ
@given(
    rpc=st.sampled_from(sorted(REQUESTS)),
    data=st.data(),
    raw=st.one_of(st.none(), st.binary(max_size=500)),
    auth=st.sampled_from(["query", "checknow", "agent", "none", "bogus-token-xxxxxxxx"]),
)
def test_query_calls(
    fuzzed: Fuzzed, rpc: str, data: st.DataObject, raw: bytes | None, auth: str
) -> None:
    request = raw if raw is not None else data.draw(REQUESTS[rpc]).SerializeToString()
    metadata = _metadata(fuzzed, auth)
    if rpc == "WatchVerdicts":
        call = fuzzed.channel.unary_stream(QUERY + rpc)(request, timeout=0.5, metadata=metadata)
        code = _stream_status(call)
        details = call.details()
    else:
        try:
            fuzzed.channel.unary_unary(QUERY + rpc)(request, timeout=10, metadata=metadata)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
    assert code not in CRASH_CODES, (rpc, code, details)
    fuzzed.healthy()


# -- the JSON API -------------------------------------------------------------------------

PATHS = st.one_of(
    st.sampled_from(
        [
            "/api/v1/verdicts",
            "/api/v1/verdicts/web",
            "/api/v1/verdicts/web/history",
            "/api/v1/agents",
            "/api/v1/checknow",
            "/api/v1/openapi.yaml",
            "/metrics",
            "/healthz",
            "/",
        ]
    ),
    st.builds(lambda name: f"/api/v1/verdicts/{urllib.parse.quote(name, safe='')}", TEXT),
    st.builds(
        lambda name: f"/api/v1/verdicts/{urllib.parse.quote(name, safe='')}/history",
        CHECK_NAMES,
    ),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60).map(
        lambda p: "/" + p
    ),
)
QUERY_KEYS = st.sampled_from(
    ["state", "label", "since", "until", "limit", "after_id", "check", "x", ""]
)
QUERY_VALUES = st.one_of(
    st.sampled_from(["up", "global", "nope", "env=prod", "=", "-1", "0", "1e99", "2026-13-01"]),
    st.integers().map(str),
    st.text(max_size=40),
)
BODIES = st.one_of(
    st.none(),
    st.binary(max_size=300),
    st.builds(
        lambda target, type_, timeout: json.dumps(
            {"target": target, "type": type_, "timeout_ms": timeout}
        ).encode(),
        TARGET,
        st.one_of(st.sampled_from(["http", "tcp", ""]), st.integers(), st.none()),
        st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=5), st.none()),
    ),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner),
        max_leaves=10,
    ).map(lambda value: json.dumps(value).encode()),
)


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]),
    path=PATHS,
    query=st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES), max_size=4),
    body=BODIES,
    auth=st.sampled_from(["query", "checknow", "agent", "none", "Basic x", "Bearer"]),
)
@example(method="GET", path="/api/v1/verdicts", query=[("state", "\x00")], body=None, auth="query")
@example(method="GET", path="/api/v1/verdicts/%0A%7B", query=[], body=None, auth="query").via(
    "a newline in a path echoed into the not-found message"
)
@example(method="GET", path="/api/v1/verdicts/%0A", query=[], body=None, auth="agent").via(
    "a newline in a path echoed into a scope refusal"
)
def test_json_api(
    fuzzed: Fuzzed,
    method: str,
    path: str,
    query: list[tuple[str, str]],
    body: bytes | None,
    auth: str,
) -> None:
    headers = {"Content-Type": "application/json"}
    if auth in fuzzed.tokens:
        headers["Authorization"] = f"Bearer {fuzzed.tokens[auth]}"
    elif auth != "none":
        headers["Authorization"] = auth
    url = path + ("?" + urllib.parse.urlencode(query) if query else "")
    connection = http.client.HTTPConnection("127.0.0.1", fuzzed.coordinator.http_port, timeout=15)
    try:
        connection.request(method, url, body=body, headers=headers)
        response = connection.getresponse()
        answer = response.read()
    finally:
        connection.close()
    assert response.status < 500, (method, url, response.status, answer[:500])
    # A request line over aiohttp's 8190 bytes is refused (400) by the HTTP parser before
    # any of Vantage sees it; every request that reaches the API gets a JSON error.
    parsed = len(method) + len(url) + 10 <= HTTP_LINE_LIMIT
    if response.status >= 400 and path.startswith("/api/") and method != "HEAD" and parsed:
        error = json.loads(answer)["error"]
        assert error["message"], error
        assert "\n" not in error["message"], error
    fuzzed.healthy()

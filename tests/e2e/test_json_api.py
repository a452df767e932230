"""The JSON API (``/api/v1/``) of a running system, checked against its OpenAPI file.

One coordinator with three agents (eu, us, ap), an HTTP target and a closed port serves the
module. Every exchange with a route described in ``coordinator/openapi.yaml`` -- successes
and errors -- is validated with openapi-core (the request and the response) against a
strict copy of the file, in which no object may carry a field the file does not name, so
the file describes exactly what is served. The outage fixture stops the HTTP target and
starts it again, so the history and the event stream hold real transitions.
"""

from __future__ import annotations

import copy
import http.client
import json
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_spec_validator import validate as validate_spec
from running_system import Coordinator, System, free_port

from coordinator.api import ROUTES
from vantage.public_json import message_json
from vantage_proto.v1 import query_pb2

pytestmark = pytest.mark.e2e

SPEC_FILE = Path(__file__).parents[2] / "coordinator" / "openapi.yaml"
WAIT = 30.0  # bounds waits for the system; never asserted on


def _strict(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with ``additionalProperties: false`` on every object that lists its
    properties and says nothing else: a served field the file does not name fails."""
    strict = copy.deepcopy(spec)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(strict)
    return strict


SPEC = yaml.safe_load(SPEC_FILE.read_text())
STRICT = _strict(SPEC)
OPENAPI = OpenAPI.from_dict(STRICT)


def _schema_validator(name: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": STRICT["components"]}
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


@dataclass
class Exchange:
    status: int
    content_type: str
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> tuple[str, str]:
        error = self.json["error"]
        return error["code"], error["message"]


class Api:
    """Calls the API of one coordinator; validates each exchange against the spec."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.port = coordinator.http_port

    def call(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]] | None = None,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        valid_request: bool = True,
        described: bool = True,
    ) -> Exchange:
        url = path + ("?" + urllib.parse.urlencode(query) if query else "")
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        try:
            connection.request(method, url, body=body, headers=headers or {})
            response = connection.getresponse()
            exchange = Exchange(
                response.status, response.getheader("Content-Type", ""), response.read()
            )
        finally:
            connection.close()
        if described:
            request = self._request(method, path, query, body, headers)
            if valid_request:
                OPENAPI.validate_request(request)
            OPENAPI.validate_response(request, self._response(exchange))
        return exchange

    def get(self, path: str, *query: tuple[str, str], **options: Any) -> Exchange:
        return self.call("GET", path, list(query), **options)

    def _request(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]] | None,
        body: bytes | None,
        headers: dict[str, str] | None,
    ) -> MockRequest:
        return MockRequest(
            f"http://127.0.0.1:{self.port}",
            method,
            path,
            args=query or [],
            headers=headers,
            data=body,
            content_type="application/json",
        )

    @staticmethod
    def _response(exchange: Exchange) -> MockResponse:
        mimetype = exchange.content_type.split(";")[0].strip()
        data: Any = exchange.body
        if not mimetype.endswith("json"):
            data = exchange.body.decode()
        return MockResponse(data, status_code=exchange.status, content_type=mimetype)

    def events(
        self,
        *query: tuple[str, str],
        headers: dict[str, str] | None = None,
    ) -> EventStream:
        """Open the watch; the caller reads events from it and closes it."""
        url = "/api/v1/watch" + ("?" + urllib.parse.urlencode(query) if query else "")
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        connection.request("GET", url, headers=headers or {})
        response = connection.getresponse()
        request = self._request("GET", "/api/v1/watch", list(query), None, headers)
        OPENAPI.validate_request(request)
        return EventStream(connection, response, request)


class EventStream:
    """A Server-Sent Events response, read event by event."""

    TRANSITION = _schema_validator("VerdictTransition")

    def __init__(
        self,
        connection: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        request: MockRequest,
    ) -> None:
        self.connection = connection
        self.response = response
        self.request = request
        self.raw = ""

    def next(self) -> dict[str, Any]:
        """The next event (comments skipped) as {"id", "event", "data"}; its data is
        validated against the spec's VerdictTransition or Error."""
        event: dict[str, Any] = {}
        while True:
            line = self.response.readline().decode()
            assert line, "the event stream ended"
            self.raw += line
            line = line.rstrip("\n")
            if not line:
                if event:
                    break
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(": ")
            event[field] = value
        event["data"] = json.loads(event["data"])
        if event.get("event") == "transition":
            self.TRANSITION.validate(event["data"])
            assert int(event["id"]) == event["data"]["id"]
        return event

    def validate(self) -> None:
        """The response as read so far against the spec (status, content type)."""
        mimetype = self.response.getheader("Content-Type", "").split(";")[0]
        OPENAPI.validate_response(
            self.request,
            MockResponse(self.raw, status_code=self.response.status, content_type=mimetype),
        )

    def close(self) -> None:
        self.connection.close()


@pytest.fixture(scope="module")
def web_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def coordinator(module_system: System, web_port: int) -> Coordinator:
    return module_system.web_and_closed_port(
        web_port, web_labels="{team: web, tier: front}", closed_labels="{team: db}", within=WAIT
    )


@pytest.fixture(scope="module")
def api(coordinator: Coordinator) -> Api:
    return Api(coordinator)


@dataclass
class Outage:
    """The web target stopped, then started again, seen through the event stream."""

    events: list[dict[str, Any]]  # web's transitions: to global, then back up
    stream_text: str


@pytest.fixture(scope="module")
def outage(module_system: System, api: Api, web_port: int) -> Outage:
    stream = api.events(("check", "web"))
    assert stream.response.status == 200
    target = next(p for p in module_system.procs if p.log.name == f"http-{web_port}.log")
    target.stop()
    down = stream.next()
    assert down["data"]["verdict"]["state"] == "global", down
    module_system.http_server(web_port)
    up = stream.next()
    assert up["data"]["verdict"]["state"] == "up", up
    stream.validate()
    stream.close()
    return Outage([down, up], stream.raw)


def _cli_status(coordinator: Coordinator) -> list[dict[str, Any]]:
    verdicts: list[dict[str, Any]] = json.loads(coordinator.cli("status", "--json").stdout)[
        "verdicts"
    ]
    return verdicts


# -- the file ------------------------------------------------------------------------------


def test_the_openapi_file_is_valid_and_served(api: Api) -> None:
    validate_spec(SPEC)
    validate_spec(STRICT)
    served = api.get("/api/v1/openapi.yaml")
    assert served.status == 200
    assert served.content_type.startswith("application/yaml")
    assert served.body.decode() == SPEC_FILE.read_text()


def test_every_rpc_is_mirrored_and_every_route_described() -> None:
    service = query_pb2.DESCRIPTOR.services_by_name["QueryService"]
    assert sorted(route.rpc for route in ROUTES) == sorted(
        method.name for method in service.methods
    )
    for route in ROUTES:
        operation = SPEC["paths"][route.path][route.method.lower()]
        assert operation["operationId"] == route.rpc
        parameters = [
            SPEC["components"]["parameters"][p["$ref"].rpartition("/")[2]] if "$ref" in p else p
            for p in operation.get("parameters", [])
        ]
        described = {p["name"] for p in parameters if p["in"] == "query"}
        assert described == set(route.query), route.rpc


def _populated(descriptor: Descriptor, choice: int) -> Message:
    """A message with every field set (for each oneof, its member number ``choice``)."""
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        oneof = field.containing_oneof
        # A proto3 `optional` field sits in a oneof of its own, named "_<field>".
        real_oneof = oneof is not None and not oneof.name.startswith("_")
        if real_oneof and oneof.fields[choice % len(oneof.fields)] is not field:
            continue
        value_field = field
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            target = getattr(message, field.name)
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                target["k"].CopyFrom(_populated(value_field.message_type, choice))
            else:
                target["k"] = _scalar(value_field)
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.full_name == "google.protobuf.Timestamp":
                value: Any = message_factory.GetMessageClass(field.message_type)(
                    seconds=1_800_000_000
                )
            else:
                value = _populated(field.message_type, choice)
            if field.is_repeated:
                getattr(message, field.name).append(value)
            else:
                getattr(message, field.name).CopyFrom(value)
        elif field.is_repeated:
            getattr(message, field.name).append(_scalar(field))
        else:
            setattr(message, field.name, _scalar(field))
    return message


def _scalar(field: FieldDescriptor) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number
    if field.type == FieldDescriptor.TYPE_STRING:
        return "text"
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return 1.5
    return 7


@pytest.mark.parametrize(
    "name",
    [
        "Verdict",
        "VerdictTransition",
        "Agent",
        "ListVerdictsResponse",
        "ListAgentsResponse",
        "GetHistoryResponse",
        "CheckNowResponse",
    ],
)
def test_the_file_describes_every_field_of_every_answer(name: str) -> None:
    """Every field the .proto has, in every oneof alternative, is in the file: a message
    with all fields set, in the public shape, validates against the strict schema."""
    descriptor = query_pb2.DESCRIPTOR.message_types_by_name[name]
    validator = _schema_validator(name)
    for choice in range(4):
        validator.validate(message_json(_populated(descriptor, choice)))


def test_checknow_requests_are_described_per_the_proto() -> None:
    validator = _schema_validator("CheckNowRequest")
    fields = query_pb2.CheckNowRequest.DESCRIPTOR.fields_by_name
    assert set(SPEC["components"]["schemas"]["CheckNowRequest"]["properties"]) == set(fields)
    validator.validate({"target": "https://example.org/", "type": "http", "timeout_ms": 3000})


# -- verdicts and agents -------------------------------------------------------------------


def test_verdicts_are_what_the_cli_prints(api: Api, coordinator: Coordinator) -> None:
    listed = api.get("/api/v1/verdicts")
    assert listed.status == 200
    assert listed.json == {"verdicts": _cli_status(coordinator)}
    down = {v["check"]: v for v in listed.json["verdicts"]}["closed-port"]
    assert down["state"] == "global"
    assert down["failure"] == "connect_refused"
    assert down["regions_down"] == ["ap", "eu", "us"]
    assert down["labels"] == {"team": "db"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", down["since"])


@pytest.mark.parametrize(
    ("query", "checks"),
    [
        ([("state", "global")], ["closed-port"]),
        ([("state", "up"), ("state", "global")], ["closed-port", "web"]),
        ([("state", "regional")], []),
        ([("label", "team=web")], ["web"]),
        ([("label", "team=web"), ("label", "tier=front")], ["web"]),
        ([("label", "team=web"), ("state", "global")], []),
        ([("label", "team=")], []),
    ],
)
def test_verdicts_filter_by_state_and_label(
    api: Api, coordinator: Coordinator, query: list[tuple[str, str]], checks: list[str]
) -> None:
    listed = api.get("/api/v1/verdicts", *query)
    assert listed.status == 200
    assert [v["check"] for v in listed.json["verdicts"]] == checks


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (
            [("state", "sideways")],
            "state: 'sideways' is not one of up, degraded, local, regional, global, unknown",
        ),
        ([("label", "team")], "label: 'team' is not NAME=VALUE"),
        ([("label", "=web")], "labels: an empty label name"),
        ([("colour", "red")], "unknown query parameter 'colour' (known: state, label)"),
    ],
    ids=["unknown-state", "label-without-value", "empty-label-name", "unknown-parameter"],
)
def test_verdicts_refuse_bad_filters(
    api: Api, coordinator: Coordinator, query: list[tuple[str, str]], message: str
) -> None:
    refused = api.get("/api/v1/verdicts", *query, valid_request=False)
    assert refused.status == 400
    assert refused.error == ("invalid_argument", message)


def test_one_verdict(api: Api, coordinator: Coordinator) -> None:
    web = api.get("/api/v1/verdicts/web")
    assert web.status == 200
    assert web.json["check"] == "web"
    assert set(web.json["regions"]) == {"ap", "eu", "us"}
    missing = api.get("/api/v1/verdicts/no-such-check")
    assert missing.status == 404
    assert missing.error == ("not_found", "no check named 'no-such-check'")


def test_agents(api: Api, coordinator: Coordinator) -> None:
    listed = api.get("/api/v1/agents")
    assert listed.status == 200
    assert [(a["name"], a["region"], a["connected"]) for a in listed.json["agents"]] == [
        ("ap-1", "ap", True),
        ("eu-1", "eu", True),
        ("us-1", "us", True),
    ]
    cli = json.loads(coordinator.cli("agents", "--json").stdout)["agents"]
    assert [set(a) for a in listed.json["agents"]] == [set(a) for a in cli]


# -- history -------------------------------------------------------------------------------


def test_history_holds_the_outage_with_its_evidence(api: Api, outage: Outage) -> None:
    history = api.get("/api/v1/verdicts/web/history")
    assert history.status == 200
    transitions = history.json["transitions"]
    assert [(t["previous"], t["verdict"]["state"]) for t in transitions] == [
        ("unknown", "up"),
        ("up", "global"),
        ("global", "up"),
    ]
    assert not history.json["truncated"]
    down = transitions[1]
    assert down == outage.events[0]["data"]
    assert down["verdict"]["regions_down"] == ["ap", "eu", "us"]
    assert down["verdict"]["failure"] == "connect_refused"
    assert down["verdict"]["regions"]["eu"]["failing_agents"] == ["eu-1"]

    newest = api.get("/api/v1/verdicts/web/history", ("limit", "1"))
    assert [t["id"] for t in newest.json["transitions"]] == [transitions[-1]["id"]]
    assert newest.json["truncated"]
    since_down = api.get("/api/v1/verdicts/web/history", ("since", down["at"]))
    assert [t["id"] for t in since_down.json["transitions"]] == [t["id"] for t in transitions[1:]]
    # Times are to the second, and `until` takes in the whole of its second: the
    # recovery is in the range too when it came within the same second.
    until_down = api.get(
        "/api/v1/verdicts/web/history", ("since", down["at"]), ("until", down["at"])
    )
    same_second = [t["id"] for t in transitions[1:] if t["at"] == down["at"]]
    assert same_second[0] == down["id"]
    assert [t["id"] for t in until_down.json["transitions"]] == same_second


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (
            [("since", "2030-01-01T00:00:00Z"), ("until", "2020-01-01T00:00:00Z")],
            "since 2030-01-01T00:00:00Z is after until 2020-01-01T00:00:00",
        ),
        ([("since", "yesterday")], "since: failed to parse timestamp"),
        ([("limit", "lots")], "limit: 'lots' is not a whole number"),
        ([("limit", "20000")], "limit: 20000 is above the most, 10000"),
        ([("limit", "1"), ("limit", "2")], "limit: given 2 times, at most once"),
    ],
    ids=["since-after-until", "bad-time", "bad-limit", "limit-too-big", "limit-twice"],
)
def test_history_refuses_bad_requests(
    api: Api, coordinator: Coordinator, query: list[tuple[str, str]], message: str
) -> None:
    refused = api.get("/api/v1/verdicts/web/history", *query, valid_request=False)
    assert refused.status == 400
    code, text = refused.error
    assert code == "invalid_argument"
    assert text.startswith(message)


def test_history_of_a_check_never_seen_is_not_found(api: Api, coordinator: Coordinator) -> None:
    missing = api.get("/api/v1/verdicts/no-such-check/history")
    assert missing.status == 404
    assert missing.error == ("not_found", "no check named 'no-such-check', and none on record")


# -- the event stream ----------------------------------------------------------------------


def test_the_watch_streams_transitions_as_server_sent_events(outage: Outage) -> None:
    down, up = outage.events
    assert [down["event"], up["event"]] == ["transition", "transition"]
    assert int(up["id"]) > int(down["id"])
    assert down["data"]["check"] == "web"
    assert down["data"]["previous"] == "up"


def test_the_watch_resumes_from_last_event_id(api: Api, outage: Outage) -> None:
    first = int(outage.events[0]["id"])
    stream = api.events(("check", "web"), headers={"Last-Event-ID": str(first - 1)})
    try:
        assert stream.response.status == 200
        assert stream.response.getheader("Content-Type") == "text/event-stream"
        assert [stream.next()["data"] for _ in outage.events] == [e["data"] for e in outage.events]
        stream.validate()
    finally:
        stream.close()
    # after_id too; the header wins when both are given.
    stream = api.events(("after_id", "0"), ("check", "web"), headers={"Last-Event-ID": str(first)})
    try:
        assert stream.next()["data"] == outage.events[1]["data"]
    finally:
        stream.close()
    stream = api.events(("after_id", str(first - 1)), ("check", "web"))
    try:
        assert stream.next()["data"] == outage.events[0]["data"]
    finally:
        stream.close()


def test_the_watch_tells_the_client_its_address(
    api: Api, coordinator: Coordinator, outage: Outage
) -> None:
    peers = [
        event["peer"]
        for event in coordinator.proc.log_events()
        if event.get("event") == "verdict watcher connected over HTTP"
    ]
    assert peers
    assert all(re.fullmatch(r"ipv4:127\.0\.0\.1:\d+", peer) for peer in peers), peers


@pytest.mark.parametrize(
    ("query", "headers", "code", "message"),
    [
        ([("after_id", "999999")], {}, "out_of_range", "after_id 999999 is past the last"),
        ([], {"Last-Event-ID": "999999"}, "out_of_range", "after_id 999999 is past the last"),
        ([], {"Last-Event-ID": "soon"}, "invalid_argument", "Last-Event-ID: 'soon' is not"),
        ([], {"Last-Event-ID": "-1"}, "invalid_argument", "after_id"),
        ([("after_id", "-1")], {}, "invalid_argument", "after_id: "),
        ([("check", "")], {}, "invalid_argument", "checks: an empty check name"),
    ],
    ids=[
        "after-id-ahead",
        "last-event-id-ahead",
        "bad-last-event-id",
        "negative-last-event-id",
        "negative",
        "empty-check",
    ],
)
def test_the_watch_refuses_bad_resume_points_before_streaming(
    api: Api,
    coordinator: Coordinator,
    query: list[tuple[str, str]],
    headers: dict[str, str],
    code: str,
    message: str,
) -> None:
    refused = api.get("/api/v1/watch", *query, headers=headers, valid_request=False)
    assert refused.status == 400
    assert refused.error[0] == code
    assert refused.error[1].startswith(message)


# -- CheckNow and the rest -----------------------------------------------------------------


def test_checknow_is_mirrored(api: Api, coordinator: Coordinator, web_port: int) -> None:
    body = json.dumps({"target": f"http://127.0.0.1:{web_port}/", "timeout_ms": 2000}).encode()
    answer = api.call("POST", "/api/v1/checknow", body=body)
    # The guard refuses loopback by default: 403, in the error shape the file describes.
    assert answer.status == 403, answer.body
    assert answer.error == (
        "permission_denied",
        "127.0.0.1 (loopback) is not allowed for on-demand checks",
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "the body is not JSON"),
        (b"[1, 2]", "the body: expected a JSON object"),
        (b'{"target": "x", "colour": "red"}', "colour: no such field"),
        (b'{"target": 5}', "target: expected string"),
        (b'{"timeout_ms": -1}', "timeout_ms: value out of range"),
    ],
    ids=["not-json", "not-an-object", "unknown-field", "wrong-type", "negative-timeout"],
)
def test_checknow_refuses_malformed_bodies(
    api: Api, coordinator: Coordinator, body: bytes, message: str
) -> None:
    refused = api.call("POST", "/api/v1/checknow", body=body, valid_request=False)
    assert refused.status == 400
    assert refused.error[0] == "invalid_argument"
    assert refused.error[1].startswith(message)


def test_unknown_routes_and_methods_answer_in_the_error_shape(
    api: Api, coordinator: Coordinator
) -> None:
    error = _schema_validator("Error")
    missing = api.get("/api/v1/nothing-here", described=False)
    assert missing.status == 404
    error.validate(missing.json)
    wrong = api.call("DELETE", "/api/v1/verdicts", described=False)
    assert wrong.status == 405
    error.validate(wrong.json)
    assert wrong.json["error"]["message"] == "Method Not Allowed: DELETE /api/v1/verdicts"

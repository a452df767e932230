"""The transition store across a coordinator killed outright (SIGKILL): every transition a
watcher was sent is still on record, the restored verdicts record nothing new until a
check really changes, and ids go on without reusing one."""

from __future__ import annotations

import re
import signal

import grpc
import pytest
from running_system import Coordinator, System, Watch, free_port, wait_until

from vantage_proto.v1 import query_pb2, query_pb2_grpc

pytestmark = pytest.mark.e2e

ENGINE = (
    "engine: {min_agents: 1, min_regions: 1, fail_after: 1, recover_after: 1}\n"
    "store_file: state/vantage.db\n"
)


def _history(coordinator: Coordinator) -> list[query_pb2.VerdictTransition]:
    with grpc.insecure_channel(coordinator.address) as channel:
        stub = query_pb2_grpc.QueryServiceStub(channel)
        kept = []
        for check in ("web", "closed-port"):
            answer = stub.GetHistory(query_pb2.GetHistoryRequest(check=check), timeout=10)
            kept.extend(answer.transitions)
    return sorted(kept, key=lambda transition: transition.id)


def test_a_killed_coordinator_keeps_every_transition_it_published(system: System) -> None:
    port = free_port()
    web = system.http_server(port)
    config = system.write_config(
        "checks:\n"
        f"  - {{name: web, type: http, target: 'http://127.0.0.1:{port}/', "
        "interval: 1s, timeout: 500ms}\n"
        f"  - {{name: closed-port, type: tcp, target: '127.0.0.1:{free_port()}', "
        "interval: 1s, timeout: 500ms}\n",
        engine=ENGINE,
    )
    (config.parent / "state").mkdir()
    # A fixed gRPC port: the agent reconnects to the restarted coordinator by itself.
    config.write_text(
        re.sub(r"^listen: .*$", f"listen: 127.0.0.1:{free_port()}", config.read_text(), flags=re.M)
    )
    first = system.coordinator(config)

    # A watcher subscribed before the agent connects hears every transition of this life.
    with Watch(first) as watch:
        agent = system.agent(first, "eu-1", "eu")
        wait_until(lambda: len(watch.heard) >= 2, 30, "both checks to get a verdict")
        first.proc.stop(signal.SIGKILL)
        watch.join()
    heard = watch.heard

    second = system.coordinator(config)
    kept = _history(second)
    assert {transition.id for transition in kept} >= set(heard)
    # The agent reconnects; the verdicts carry on from where they were, so nothing new
    # is recorded until something changes: the web server stops, under a new id.
    connected = 'vantage_agents_connected{region="eu"} 1.0'
    wait_until(lambda: second.metrics().count(connected), 30, "the agent to reconnect")
    assert [t.id for t in _history(second)] == [t.id for t in kept]
    web.stop()
    wait_until(lambda: len(_history(second)) > len(kept), 30, "the web check's transition")
    newer = [t for t in _history(second) if t.id not in {k.id for k in kept}]
    assert [(t.check, t.verdict.state) for t in newer] == [("web", query_pb2.VERDICT_STATE_GLOBAL)]
    assert newer[0].id > max(heard)
    assert agent.popen.poll() is None

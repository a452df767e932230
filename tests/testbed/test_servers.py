"""The test bed's two small servers, on real sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import dns.message
import dns.query
import dns.rcode
import pytest

from testbed.services import SERVERS


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[int]:
    kind = request.param
    port = free_port(socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    process = subprocess.Popen([sys.executable, str(SERVERS), kind, "127.0.0.1", str(port)])
    try:
        time.sleep(0.3)  # binds in milliseconds; the clients below retry anyway
        yield port
    finally:
        process.terminate()
        process.wait(timeout=5)
    assert process.returncode == 0


@pytest.mark.parametrize("server", ["tcp"], indirect=True)
def test_the_tcp_target_greets_like_an_smtp_server(server: int) -> None:
    for _ in range(50):
        try:
            with socket.create_connection(("127.0.0.1", server), timeout=2) as sock:
                assert sock.recv(100).startswith(b"220 ")
                return
        except ConnectionRefusedError:
            time.sleep(0.1)
    pytest.fail("the tcp target never listened")


@pytest.mark.parametrize("server", ["servfail"], indirect=True)
def test_the_broken_upstream_answers_servfail_to_the_question_asked(server: int) -> None:
    query = dns.message.make_query("web.vantage.test", "A", use_edns=0)
    answer = dns.query.udp(query, "127.0.0.1", port=server, timeout=2)
    assert answer.rcode() == dns.rcode.SERVFAIL
    assert answer.question == query.question

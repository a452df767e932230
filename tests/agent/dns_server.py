"""A small scripted authoritative DNS server for the DNS probe's tests.

It serves UDP and TCP on the same port of 127.0.0.1 (port 0, so any free port) inside
the test's event loop. Records are added with ``add``; a name can be given a behaviour
instead of an answer (``script``), which covers what real servers do wrong: NXDOMAIN,
SERVFAIL, REFUSED, silence, truncation over UDP, garbage bytes. Every query is recorded
in ``queries`` as (transport, name, type) so tests can see what the probe asked.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import socket
import struct
from collections import defaultdict
from typing import cast

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

GARBAGE = b"\x13\x37 this is not a DNS message"


class Behaviour(enum.Enum):
    ANSWER = "answer"  # the records added for the name (NODATA if none of the type)
    NXDOMAIN = "nxdomain"
    SERVFAIL = "servfail"
    REFUSED = "refused"
    SILENT = "silent"  # never replies, over either transport
    TRUNCATE = "truncate"  # UDP: TC set and no answers; TCP: the records
    GARBAGE = "garbage"  # replies with bytes that are not a DNS message
    HANG_UP = "hang_up"  # TCP: closes the connection without replying; UDP: silent


class DnsServer:
    """Scripted authoritative server; ``await start()``, then ``await close()``."""

    def __init__(self) -> None:
        self.records: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], list[str]] = defaultdict(
            list
        )
        self.behaviours: dict[dns.name.Name, Behaviour] = {}
        self.queries: list[tuple[str, str, str]] = []
        self.host = "127.0.0.1"
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    def add(self, name: str, record_type: str, *rdatas: str) -> None:
        """Serve ``rdatas`` (presentation format) for ``name`` and ``record_type``."""
        key = (dns.name.from_text(name), dns.rdatatype.from_text(record_type))
        self.records[key].extend(rdatas)

    def script(self, name: str, behaviour: Behaviour) -> None:
        self.behaviours[dns.name.from_text(name)] = behaviour

    @property
    def address(self) -> str:
        """The server as a check's ``server`` field: "127.0.0.1:port" or "[::1]:port"."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self, host: str = "127.0.0.1") -> int:
        """Listen on one free port of ``host`` for UDP and TCP; returns the port."""
        loop = asyncio.get_running_loop()
        self.host = host
        for _ in range(20):
            udp, _protocol = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(host, 0)
            )
            port = int(udp.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, port)
            except OSError as exc:
                udp.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            self._udp, self.port = udp, port
            return port
        raise RuntimeError("no port free for both UDP and TCP")

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        if self._tcp is not None:
            await self._tcp.wait_closed()
        for _ in range(3):  # let closed transports run their connection_lost callbacks
            await asyncio.sleep(0)

    def reply(self, wire: bytes, transport: str) -> bytes | None:
        """The reply to one query received over ``transport`` ("udp"/"tcp"), or None
        to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # a test server ignores what it cannot parse
            return None
        if not query.question:
            return None
        question = query.question[0]
        self.queries.append(
            (transport, question.name.to_text(), dns.rdatatype.to_text(question.rdtype))
        )
        behaviour = self.behaviours.get(question.name, Behaviour.ANSWER)
        if behaviour in (Behaviour.SILENT, Behaviour.HANG_UP):
            return None
        if behaviour is Behaviour.GARBAGE:
            return GARBAGE
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if behaviour is Behaviour.NXDOMAIN:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif behaviour is Behaviour.SERVFAIL:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif behaviour is Behaviour.REFUSED:
            response.set_rcode(dns.rcode.REFUSED)
        elif behaviour is Behaviour.TRUNCATE and transport == "udp":
            response.flags |= dns.flags.TC
        else:
            self._answer(response, question.name, question.rdtype)
        return response.to_wire()

    def _answer(
        self, response: dns.message.Message, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> None:
        if not any(owner == name for owner, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
            return
        cname = self.records.get((name, dns.rdatatype.CNAME))
        if cname and rdtype != dns.rdatatype.CNAME:
            # Follow one CNAME, as an authoritative server does within its zone.
            response.answer.append(self._rrset(name, dns.rdatatype.CNAME, cname))
            name = dns.name.from_text(cname[0])
        rdatas = self.records.get((name, rdtype))
        if rdatas:
            response.answer.append(self._rrset(name, rdtype, rdatas))

    @staticmethod
    def _rrset(
        name: dns.name.Name, rdtype: dns.rdatatype.RdataType, rdatas: list[str]
    ) -> dns.rrset.RRset:
        return dns.rrset.from_text_list(name, 300, dns.rdataclass.IN, rdtype, rdatas)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.append(writer)
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                wire = await reader.readexactly(length)
                reply = self.reply(wire, "tcp")
                if reply is None and self._hangs_up(wire):
                    return
                if reply is None:
                    await reader.read()  # silent: hold the connection until the client goes
                    return
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client hung up, as probes do
        finally:
            writer.close()

    def _hangs_up(self, wire: bytes) -> bool:
        try:
            question = dns.message.from_wire(wire).question[0]
        except Exception:  # not a query: nothing scripted for it
            return False
        return self.behaviours.get(question.name) is Behaviour.HANG_UP


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self.server.reply(data, "udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def free_udp_port() -> int:
    """A loopback UDP port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

"""Two tiny servers the test bed runs where no standard daemon fits (standard library only,
so they start in milliseconds):

- ``tcp ADDRESS PORT``: the ``tcp`` target. Accepts connections, greets with an SMTP-like
  banner (``220 ...``), and closes once the peer does (or after 10 s).
- ``servfail ADDRESS PORT``: a broken upstream for a region resolver (UDP). dnsmasq has
  no setting that answers SERVFAIL, but passes an upstream's SERVFAIL on, as a real
  resolver does when the authority fails: the ``dns: {answer: servfail}`` fault forwards
  the name here.

Run as ``python servers.py KIND ADDRESS PORT``; SIGTERM ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import Any

BANNER = b"220 vantage test bed ready\r\n"
SERVFAIL = 2


async def _greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(BANNER)
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(), timeout=10)
    except OSError:
        pass
    finally:
        writer.close()


class _ServfailProtocol(asyncio.DatagramProtocol):
    transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12 or data[4:6] != b"\x00\x01":
            return
        end = 12  # the one question: a name (labels up to a zero byte), type and class
        while end < len(data) and data[end] != 0:
            end += 1 + data[end]
        end += 5
        if end > len(data):
            return
        # Same id and question; QR set, RD copied, RA set, rcode SERVFAIL, no records.
        flags = 0x8000 | (int.from_bytes(data[2:4], "big") & 0x0100) | 0x0080 | SERVFAIL
        reply = data[0:2] + flags.to_bytes(2, "big") + b"\x00\x01" + bytes(6) + data[12:end]
        self.transport.sendto(reply, addr)


async def main(kind: str, address: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if kind == "tcp":
        server = await asyncio.start_server(_greet, address, port, reuse_address=True)
        async with server:
            await stop.wait()
    elif kind == "servfail":
        transport, _ = await loop.create_datagram_endpoint(
            _ServfailProtocol, local_addr=(address, port)
        )
        try:
            await stop.wait()
        finally:
            transport.close()
    else:
        raise SystemExit(f"unknown server kind {kind!r} (tcp, servfail)")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))

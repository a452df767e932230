"""The targets and resolvers of the simulated internet, as real daemons.

- ``http`` / ``https`` / ``https-expired``: nginx in the target's namespace on port 80 or
  443, answering ``200`` with a line of text. HTTPS certificates come from a test CA made
  for the run (``Certificates``); the expired one ended yesterday. Checks trust the CA
  through their own ``tls.ca_file`` option, as an operator probing a private CA would.
- ``tcp``: ``servers.py tcp`` on port 7000.
- ``dns``: dnsmasq in the target's namespace, answering for ``<name>.vantage.test``
  (its own address); the region resolvers forward that name to it.
- One ``Resolver`` (dnsmasq) per region on the region router's LAN address: it answers
  for the targets' names from a hosts file and forwards ``dns`` targets' names, both
  re-read on SIGHUP, so a DNS fault changes one region's answers in place without a
  restart (and without a cache: ``cache-size=0``).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from pki import DAY, TestCA

from .processes import Process
from .scenario import DOMAIN, PORTS, Target
from .topology import Host, Router

SERVERS = Path(__file__).with_name("servers.py")
SERVFAIL_PORT = 5353


def nginx_binary() -> str:
    for candidate in ("/usr/sbin/nginx", "/usr/bin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return "nginx"


def dnsmasq_binary() -> str:
    for candidate in ("/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"):
        if os.access(candidate, os.X_OK):
            return candidate
    return "dnsmasq"


def dnsmasq_argv(address: object, *options: str) -> list[str]:
    """A foreground dnsmasq answering for DOMAIN on ``address`` alone (no config file,
    no /etc/hosts, no upstream unless ``options`` name one), logging to stderr."""
    return [
        dnsmasq_binary(),
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--user=root",
        "--group=root",
        "--pid-file=",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        f"--listen-address={address}",
        f"--local=/{DOMAIN}/",
        *options,
        "--local-ttl=0",
        "--log-facility=-",
    ]


class Certificates:
    """A test CA (``tests/pki.py``) and server certificates signed by it, as PEM files in
    ``directory``; the CA is made by ``create_ca``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._ca: TestCA | None = None

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    def create_ca(self) -> None:
        self._ca = TestCA(self.directory, "vantage test bed CA", lifetime=(-DAY, 30 * DAY))

    def issue(self, host: str, *, expired: bool) -> tuple[Path, Path]:
        """(certificate, key) for ``host``: valid for 30 days, or expired yesterday."""
        assert self._ca is not None, "create_ca() first"
        lifetime = (-30 * DAY, -DAY) if expired else (-DAY, 30 * DAY)
        stem = f"{host}{'-expired' if expired else ''}"
        issued = self._ca.issue(host, hosts=(host,), lifetime=lifetime, stem=stem)
        return issued.chain, issued.key

    def coordinator(self, hosts: tuple[str, ...]) -> tuple[Path, Path]:
        """(certificate, key) the coordinator serves TLS with, naming ``hosts``."""
        assert self._ca is not None, "create_ca() first"
        issued = self._ca.issue("coordinator", hosts=hosts, stem="coordinator")
        return issued.chain, issued.key


def target_process(
    target: Target, host: Host, directory: Path, certificates: Certificates
) -> Process:
    """The server process for ``target`` (not started)."""
    directory.mkdir(parents=True, exist_ok=True)
    address = host.address.ip
    log = directory / "server.log"
    label = f"target {target.name}"
    if target.serve == "tcp":
        argv = [sys.executable, str(SERVERS), "tcp", str(address), str(PORTS["tcp"])]
        return Process(label, host.ns, argv, log)
    if target.serve == "dns":
        argv = dnsmasq_argv(address, f"--host-record={target.host},{address}")
        return Process(label, host.ns, argv, log)
    port = PORTS[target.serve]
    tls = ""
    if target.serve != "http":
        cert, key = certificates.issue(target.host, expired=target.serve == "https-expired")
        tls = f"ssl_certificate {cert};\n      ssl_certificate_key {key};"
    temp = directory / "temp"
    temp.mkdir(exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(
        f"""worker_processes 1;
daemon off;
master_process on;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  default_type text/plain;
  client_body_temp_path {temp}/body;
  proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi;
  scgi_temp_path {temp}/scgi;
  server {{
      listen {address}:{port}{" ssl" if tls else ""};
      server_name {target.host};
      {tls}
      location / {{ return 200 "vantage test bed: {target.name}\\n"; }}
  }}
}}
"""
    )
    argv = [
        nginx_binary(),
        "-e",
        str(directory / "error.log"),
        "-p",
        str(directory),
        "-c",
        str(conf),
    ]
    return Process(label, host.ns, argv, log)


def listening_port(target: Target) -> tuple[str, int]:
    """(protocol, port) that shows the target's server is ready."""
    return ("udp" if target.serve == "dns" else "tcp", PORTS[target.serve])


class Resolver:
    """One region's dnsmasq. ``answers`` maps host names to what it answers: an address
    (from its hosts file), ``forward:ADDR`` (to a ``dns`` target), ``nxdomain`` (not
    known: dnsmasq is local for the whole domain) or ``servfail`` (forwarded to
    ``servers.py servfail``)."""

    def __init__(
        self,
        router: Router,
        base: dict[str, str],
        directory: Path,
        with_servfail: bool,
    ) -> None:
        self.router = router
        self.base = base
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.hosts = directory / "hosts"
        self.servers = directory / "servers"
        self.answers = dict(base)
        self._write()
        self.process = Process(
            f"resolver {router.region}",
            router.ns,
            dnsmasq_argv(
                router.lan.ip,
                f"--addn-hosts={self.hosts}",
                f"--servers-file={self.servers}",
                "--cache-size=0",
            ),
            directory / "dnsmasq.log",
        )
        self.servfail = (
            Process(
                f"servfail upstream {router.region}",
                router.ns,
                [sys.executable, str(SERVERS), "servfail", "127.0.0.1", str(SERVFAIL_PORT)],
                directory / "servfail.log",
            )
            if with_servfail
            else None
        )

    def _write(self) -> None:
        hosts: list[str] = []
        servers: list[str] = []
        for host, answer in sorted(self.answers.items()):
            if answer == "nxdomain":
                continue
            if answer == "servfail":
                servers.append(f"server=/{host}/127.0.0.1#{SERVFAIL_PORT}")
            elif answer.startswith("forward:"):
                servers.append(f"server=/{host}/{answer.removeprefix('forward:')}")
            else:
                hosts.append(f"{answer} {host}")
        for path, lines in ((self.hosts, hosts), (self.servers, servers)):
            staging = path.with_suffix(".new")
            staging.write_text("".join(f"{line}\n" for line in lines))
            staging.replace(path)

    def set_answers(self, overrides: dict[str, str]) -> None:
        """Answer ``overrides`` on top of the normal answers, at once (SIGHUP)."""
        answers = {**self.base, **overrides}
        if answers == self.answers:
            return
        self.answers = answers
        self._write()
        if self.process.pid is not None and self.process.running:
            os.kill(self.process.pid, signal.SIGHUP)


def normal_answers(targets: dict[str, Target], hosts: dict[str, Host]) -> dict[str, str]:
    """What every resolver answers when nothing is wrong."""
    answers: dict[str, str] = {}
    for name, target in targets.items():
        address = str(hosts[name].address.ip)
        answers[target.host] = f"forward:{address}" if target.serve == "dns" else address
    return answers

"""Playing scenarios: build the network, start the real system, play the timeline, judge,
tear down -- for any number of scenario files, several at a time.

Lifecycle of one ``ScenarioRun.play()``:

1. Build the topology (``network.build``) in the run's slot, then start the targets,
   one resolver per region, the coordinator (with a checks file whose targets are the
   real addresses) and, once the ``Observer`` watches it, one agent per agent. The run's
   clock starts (t = 0) when the coordinator lists every agent as connected.
2. Play the timeline; meanwhile the observer records verdicts and agents and a monitor
   notes any process under test that exits by itself (a crash fails the run).
3. At ``end``: a last look through the real client (``vantage status --json``) and
   ``/metrics``, then judge (``judge.py``).
4. Always (exception, Ctrl-C, cancellation): stop every process, delete the namespaces
   (their veths and nftables tables go with them) and ``/etc/netns`` entries, and list
   whatever of the run is still on the host -- anything left fails the run. An ``atexit``
   hook does the same without an event loop if the process is leaving without that.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import shutil
import signal
import ssl
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from coordinator.tokens import Scope, TokenFile

from . import hoststate, network
from .commands import CommandFailed, run
from .judge import (
    Finding,
    agent_result_lines,
    judge_expectation,
    judge_history,
    judge_never,
    moments,
    timeline_lines,
)
from .observer import Observer
from .processes import Process
from .scenario import (
    Clear,
    DnsFault,
    NetworkFault,
    ProcessFault,
    Scenario,
    ScenarioError,
    load_scenario,
    rendered_check,
)
from .services import Certificates, Resolver, listening_port, normal_answers, target_process
from .topology import Topology, plan

VANTAGE = str(Path(sys.executable).parent / "vantage")
TOOLS = ("ip", "nft", "nginx", "dnsmasq", "ss")
CONNECT_TIMEOUT = 60.0
LISTEN_TIMEOUT = 30.0

_active: dict[str, hoststate.Claim] = {}


def _remove_active() -> None:
    for claim in list(_active.values()):
        hoststate.remove_all(claim.prefix)
        hoststate.release(claim)
        _active.pop(claim.prefix, None)


atexit.register(_remove_active)


def unavailable() -> str | None:
    """Why the test bed cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "the test bed needs root (network namespaces, veth pairs, nftables); CI runs as root"
    missing = [tool for tool in TOOLS if not _which(tool)]
    if missing:
        return f"missing tools: {', '.join(missing)} (`make system-deps` installs them)"
    return None


def _which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin"):
        if os.access(f"{directory}/{tool}", os.X_OK):
            return f"{directory}/{tool}"
    return None


@dataclass
class Outcome:
    """What one scenario run concluded; ``lines()`` is its report."""

    path: Path
    name: str
    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    logs: Path | None = None
    header: str = ""

    @property
    def passed(self) -> bool:
        return not self.errors and all(finding.ok for finding in self.findings)

    def lines(self) -> list[str]:
        lines = [self.header or f"== {self.name} ({self.path})"]
        for finding in self.findings:
            lines.append(f"   {finding.line}")
            lines += [f"           {detail}" for detail in finding.details]
        lines += [f"   ERROR   {error}" for error in self.errors]
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"{verdict} {self.name} in {self.seconds:.1f}s")
        if not self.passed and self.logs is not None:
            lines.append(f"     logs: {self.logs}")
        return lines


class ScenarioRun:
    """One scenario on one slot. ``play()`` returns its Outcome and always cleans up."""

    def __init__(self, scenario: Scenario, claim: hoststate.Claim, directory: Path) -> None:
        self.scenario = scenario
        self.claim = claim
        self.dir = directory
        self.topology: Topology = plan(scenario, claim.prefix, claim.slot)
        self.outcome = Outcome(scenario.path, scenario.name, logs=directory)
        self.certificates = Certificates(directory / "tls")
        self.targets: dict[str, Process] = {}
        self.resolvers: dict[str, Resolver] = {}
        self.agents: dict[str, Process] = {}
        self.coordinator: Process | None = None
        self.coordinator_starts = 0
        self.observer: Observer | None = None
        self._query_token = ""
        self.inodes: set[int] = set()
        self.network_faults: list[NetworkFault] = []
        self.dns_faults: dict[str, dict[str, str]] = {}
        self.applied: list[str] = []
        self.crashes: dict[str, str] = {}
        self.t0 = 0.0
        self.wall_t0 = 0.0

    # -- the run ----------------------------------------------------------------------

    async def play(self) -> Outcome:
        started = time.monotonic()
        scenario = self.scenario
        agents = _count(len(scenario.agents), "agent")
        regions = _count(len(scenario.regions), "region")
        targets = _count(len(scenario.targets), "target")
        self.outcome.header = (
            f"== {scenario.name} ({scenario.path.name}): {agents} in {regions}, {targets}, "
            f"{scenario.end:g}s [{self.claim.prefix}, {self.topology.block}]"
        )
        _active[self.claim.prefix] = self.claim
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._start_network()
            self._write_tokens()
            self.observer = Observer(
                self.topology.query_address, self.certificates.ca_file, self._query_token
            )
            tasks = [
                asyncio.create_task(self.observer.run()),
                asyncio.create_task(self._monitor()),
            ]
            await self._start_system()
            await self._wait_connected()
            await self._play_timeline()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._judge()
        except (CommandFailed, SetupFailed, OSError, grpc.RpcError) as exc:
            self.outcome.errors.append(f"{type(exc).__name__}: {exc}")
        except Exception:  # a bug in the runner: say where, and still clean up
            self.outcome.errors.append("runner error: " + traceback.format_exc().strip())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._teardown()
            self.outcome.seconds = time.monotonic() - started
        return self.outcome

    async def _start_network(self) -> None:
        """Namespaces and links, the targets' servers and the region resolvers."""
        topology = self.topology
        self.dir.mkdir(parents=True, exist_ok=True)
        await network.build(topology)
        self.inodes = {
            inode for ns in topology.namespaces if (inode := hoststate.netns_inode(ns)) is not None
        }
        # The coordinator serves TLS, as on the internet; https targets share its CA.
        self.certificates.create_ca()
        for name, target in self.scenario.targets.items():
            process = target_process(
                target, topology.targets[name], self.dir / f"target-{name}", self.certificates
            )
            self.targets[name] = process.start()
        servfail_regions = {
            event.fault.region
            for event in self.scenario.timeline
            if isinstance(event.fault, DnsFault) and event.fault.answer == "servfail"
        }
        answers = normal_answers(dict(self.scenario.targets), topology.targets)
        for region, router in topology.routers.items():
            resolver = Resolver(
                router, answers, self.dir / f"resolver-{region}", region in servfail_regions
            )
            if resolver.servfail is not None:
                resolver.servfail.start()
            resolver.process.start()
            self.resolvers[region] = resolver
        for name, target in self.scenario.targets.items():
            protocol, port = listening_port(target)
            await self._wait_listening(
                self.targets[name], topology.targets[name].ns, protocol, port
            )
        for region, resolver in self.resolvers.items():
            await self._wait_listening(resolver.process, topology.routers[region].ns, "udp", 53)

    async def _start_system(self) -> None:
        """The system under test: the coordinator, then every agent."""
        topology = self.topology
        config = self._write_config()
        self.coordinator = Process(
            "coordinator",
            topology.coordinator.ns,
            [VANTAGE, "coordinator", "--config", str(config), "--log-format", "json"],
            self.dir / "coordinator.log",
        )
        await self._start_coordinator()
        for name, region in self.scenario.agents:
            self.agents[name] = self._agent(name, region).start()

    def _write_config(self) -> Path:
        checks = []
        for spec in self.scenario.checks:
            check = rendered_check(spec, self.scenario.targets)
            target = self.scenario.targets[spec["target"]]
            wants_tls = check.get("type") == "http" or check.get("tls") not in (None, False)
            if target.serve.startswith("https") and wants_tls:
                tls = check.get("tls")
                tls = {} if tls in (None, True) else dict(tls)
                if not {"ca_file", "ca_pem"} & set(tls) and tls.get("verify", True):
                    tls["ca_file"] = str(self.certificates.ca_file)
                check["tls"] = tls
            checks.append(check)
        (self.dir / "checks.yaml").write_text(yaml.safe_dump({"checks": checks}, sort_keys=False))
        cert, key = self.certificates.coordinator(self.topology.coordinator_hosts)
        config = self.dir / "coordinator.yaml"
        config.write_text(
            "listen: 0.0.0.0:7400\n"
            "http_listen: 0.0.0.0:9470\n"
            "checks_file: checks.yaml\n"
            "tokens_file: tokens.yaml\n"
            "heartbeat_interval: 1s\n"
            f"tls: {{cert_file: {cert}, key_file: {key}}}\n"
        )
        return config

    def _write_tokens(self) -> None:
        """As on the internet: every agent its own token, bound to its name and region and
        stored hashed; the runner reads with a query token (TLS on both ports, see
        ``_write_config``)."""
        tokens = TokenFile(self.dir / "tokens.yaml")
        for name, region in self.scenario.agents:
            token, _ = tokens.create(name, Scope.AGENT, region)
            token_file = self.dir / f"agent-{name}.token"
            token_file.write_text(token + "\n")
            token_file.chmod(0o600)
        self._query_token, _ = tokens.create("testbed-runner", Scope.QUERY, None)
        self._query_token_file.write_text(self._query_token + "\n")
        self._query_token_file.chmod(0o600)

    def _agent(self, name: str, region: str) -> Process:
        return Process(
            f"agent {name}",
            self.topology.agents[name].ns,
            [
                VANTAGE,
                "agent",
                "--coordinator",
                self.topology.coordinator_address,
                "--name",
                name,
                "--region",
                region,
                "--token-file",
                str(self.dir / f"agent-{name}.token"),
                # Its own spool in the run's directory: test beds run side by side with
                # the same agent names; a restarted agent replays its own.
                "--spool-dir",
                str(self.dir / "spool" / name),
                "--ca-file",
                str(self.certificates.ca_file),
                "--log-level",
                "debug",
                "--log-format",
                "json",
            ],
            self.dir / f"agent-{name}.log",
        )

    async def _start_coordinator(self) -> None:
        """Start (or restart) the coordinator; return once it listens and the observer's
        watch stream is subscribed, so no transition goes unseen."""
        assert self.coordinator is not None
        assert self.observer is not None
        coordinator = self.coordinator.start()
        await self._until(
            lambda: any(e.get("event") == "coordinator listening" for e in coordinator.events()),
            "the coordinator to listen",
            coordinator,
        )
        await self._until(
            lambda: any(
                e.get("event") == "verdict watcher connected" for e in coordinator.events()
            ),
            "the runner's verdict watch to be subscribed",
            coordinator,
        )
        self.observer.subscribed()
        self.coordinator_starts += 1

    async def _until(
        self,
        predicate: Callable[[], bool],
        what: str,
        process: Process,
    ) -> None:
        timeout = LISTEN_TIMEOUT
        deadline = time.monotonic() + timeout
        while not predicate():
            if not process.running:
                raise SetupFailed(
                    f"{process.label} exited while waiting for {what}:\n{process.tail()}"
                )
            if time.monotonic() > deadline:
                raise SetupFailed(f"timed out after {timeout:g}s waiting for {what}")
            await asyncio.sleep(0.05)

    async def _wait_listening(self, process: Process, ns: str, protocol: str, port: int) -> None:
        flag = "-Hlnt" if protocol == "tcp" else "-Hlnu"
        deadline = time.monotonic() + LISTEN_TIMEOUT
        while not (await run("ss", "-N", ns, flag, f"sport = :{port}")).strip():
            if not process.running:
                raise SetupFailed(f"{process.label} exited before listening:\n{process.tail()}")
            if time.monotonic() > deadline:
                raise SetupFailed(f"{process.label}: nothing listens on {protocol}/{port}")
            await asyncio.sleep(0.05)

    async def _wait_connected(self) -> None:
        assert self.observer is not None
        assert self.coordinator is not None
        wanted = set(self.agents)
        deadline = time.monotonic() + CONNECT_TIMEOUT
        connected: set[str] = set()
        while connected != wanted:
            if time.monotonic() > deadline:
                raise SetupFailed(
                    f"agents not connected after {CONNECT_TIMEOUT:g}s: "
                    f"{', '.join(sorted(wanted - connected))}"
                )
            self._check_crashes()
            if self.crashes:
                raise SetupFailed(
                    "a process crashed before the start: " + "; ".join(self.crashes.values())
                )
            with contextlib.suppress(grpc.RpcError):
                agents = await self.observer.agents()
                connected = {a["name"] for a in agents if a["connected"]}
            await asyncio.sleep(0.1)
        self.t0 = time.monotonic()
        self.wall_t0 = time.time()

    async def _play_timeline(self) -> None:
        for event in self.scenario.timeline:
            await self._sleep_until(event.at)
            self.applied.append(f"{self._now():.1f}s {event.text}")
            await self._apply(event.fault)
        await self._sleep_until(self.scenario.end)

    def _now(self) -> float:
        return time.monotonic() - self.t0

    async def _sleep_until(self, at: float) -> None:
        delay = self.t0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _apply(self, fault: Any) -> None:
        if isinstance(fault, Clear):
            self.network_faults.clear()
            self.dns_faults.clear()
            await network.apply_faults(self.topology, self.network_faults)
            for resolver in self.resolvers.values():
                resolver.set_answers({})
        elif isinstance(fault, NetworkFault):
            self.network_faults.append(fault)
            await network.apply_faults(self.topology, self.network_faults)
        elif isinstance(fault, DnsFault):
            self.dns_faults.setdefault(fault.region, {})[fault.host] = fault.answer
            self.resolvers[fault.region].set_answers(self.dns_faults[fault.region])
        elif isinstance(fault, ProcessFault):
            await self._process_fault(fault)

    async def _process_fault(self, fault: ProcessFault) -> None:
        subject = fault.subject
        if subject.kind == "target":
            process = self.targets[subject.name]
            if fault.action == "stop":
                await process.stop()
            else:
                if not process.running:
                    process.start()
                protocol, port = listening_port(self.scenario.targets[subject.name])
                await self._wait_listening(
                    process, self.topology.targets[subject.name].ns, protocol, port
                )
        elif subject.kind == "agent":
            agent = self.agents[subject.name]
            await agent.kill()
            if fault.action == "restart":
                agent.start()
        else:  # restart: coordinator
            assert self.coordinator is not None
            assert self.observer is not None
            await self.coordinator.kill()
            self.observer.new_epoch()
            await self._start_coordinator()

    async def _monitor(self) -> None:
        while True:
            self._check_crashes()
            await asyncio.sleep(0.5)

    def _processes(self) -> list[Process]:
        processes = [*self.targets.values(), *self.agents.values()]
        for resolver in self.resolvers.values():
            processes.append(resolver.process)
            if resolver.servfail is not None:
                processes.append(resolver.servfail)
        if self.coordinator is not None:
            processes.append(self.coordinator)
        return processes

    def _check_crashes(self) -> None:
        for process in self._processes():
            code = process.crashed()
            if code is not None and process.label not in self.crashes:
                when = f"{self._now():.1f}s" if self.t0 else "before the start"
                self.crashes[process.label] = (
                    f"{process.label} exited {code} at {when}: {process.tail(5)}"
                )

    # -- judging ----------------------------------------------------------------------

    async def _judge(self) -> None:
        assert self.observer is not None
        self._check_crashes()
        final = json.loads(await run(VANTAGE, "status", "--json", *self._client_flags))
        (self.dir / "status.json").write_text(json.dumps(final, indent=2))
        agents = await run(VANTAGE, "agents", "--json", *self._client_flags)
        (self.dir / "agents.json").write_text(agents)
        metric = await asyncio.to_thread(self._transitions_metric)
        record = self.observer.record
        results = {name: agent.events(since_start=False) for name, agent in self.agents.items()}
        findings: list[Finding] = []
        for expectation in self.scenario.expect:
            finding = judge_expectation(expectation, moments(record, expectation.check, self.t0))
            if not finding.ok:
                self._explain(
                    finding, expectation.check, expectation.at + expectation.within, results
                )
            findings.append(finding)
        for expectation in self.scenario.never:
            finding = judge_never(
                expectation, moments(record, expectation.check, self.t0), self.scenario.end
            )
            if not finding.ok:
                self._explain(finding, expectation.check, self.scenario.end, results)
            findings.append(finding)
        final_states = {v["check"]: v["state"] for v in final["verdicts"]}
        findings.append(judge_history(record, final_states, metric))
        self.outcome.findings = findings
        self.outcome.errors += [f"CRASHED {text}" for text in self.crashes.values()]

    def _explain(
        self, finding: Finding, check: str, until: float, results: dict[str, list[dict[str, Any]]]
    ) -> None:
        assert self.observer is not None
        finding.details.append(f"verdict timeline of {check}:")
        finding.details += [
            f"  {line}" for line in timeline_lines(self.observer.record, check, self.t0)
        ]
        finding.details.append(f"each agent's last results for {check} up to {until:g}s:")
        finding.details += [
            f"  {line}" for line in agent_result_lines(results, check, self.wall_t0, until)
        ]
        finding.details.append("faults applied: " + ("; ".join(self.applied) or "none"))

    @property
    def _query_token_file(self) -> Path:
        return self.dir / "runner.token"

    @property
    def _client_flags(self) -> tuple[str, ...]:
        """How a `vantage` command of the runner's reaches the coordinator."""
        return (
            "--coordinator",
            self.topology.query_address,
            "--ca-file",
            str(self.certificates.ca_file),
            "--token-file",
            str(self._query_token_file),
        )

    def _transitions_metric(self) -> float | None:
        request = urllib.request.Request(
            self.topology.metrics_url, headers={"Authorization": f"Bearer {self._query_token}"}
        )
        context = ssl.create_default_context(cafile=self.certificates.ca_file)
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as response:
                text = response.read().decode()
        except OSError:
            return None
        total = 0.0
        for line in text.splitlines():
            if line.startswith("vantage_verdict_transitions_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    # -- teardown ---------------------------------------------------------------------

    async def _teardown(self) -> None:
        if self.observer is not None:
            with contextlib.suppress(Exception):
                await self.observer.close()
        processes = self._processes()
        await asyncio.gather(*(p.stop(grace=3) for p in processes), return_exceptions=True)
        pids = [p.pid for p in processes if p.pid is not None]
        for ns in await asyncio.to_thread(hoststate.namespaces, self.claim.prefix):
            inode = hoststate.netns_inode(ns)
            if inode is not None:
                self.inodes.add(inode)
        await asyncio.to_thread(hoststate.remove_all, self.claim.prefix)
        left = await asyncio.to_thread(hoststate.leftovers, self.claim.prefix, self.inodes, pids)
        if left:
            self.outcome.errors.append("left on the host: " + ", ".join(left))
        _active.pop(self.claim.prefix, None)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


class SetupFailed(Exception):
    """The system under test could not be brought up (the message says what and why)."""


async def run_suite(
    paths: Iterable[Path],
    workdir: Path,
    *,
    jobs: int = 4,
    report: Callable[[Outcome], None] | None = None,
    keep_logs: bool = False,
) -> list[Outcome]:
    """Play every scenario in ``paths``, ``jobs`` at a time (longest first, so the
    slowest does not start last); ``report`` is called as each one ends. Logs of a
    scenario that passed are removed unless ``keep_logs``."""
    outcomes: dict[Path, Outcome] = {}
    scenarios: list[Scenario] = []
    for path in paths:
        try:
            scenarios.append(load_scenario(path))
        except ScenarioError as exc:
            outcome = Outcome(path, path.stem, errors=[str(exc)])
            outcomes[path] = outcome
            if report is not None:
                report(outcome)
    names = [s.name for s in scenarios]
    limit = asyncio.Semaphore(max(1, jobs))

    async def one(scenario: Scenario) -> None:
        async with limit:
            directory = workdir / scenario.name
            if names.count(scenario.name) > 1:
                directory = workdir / f"{scenario.name}-{scenario.path.stem}"
            claim = await asyncio.to_thread(hoststate.claim_slot)
            try:
                outcome = await ScenarioRun(scenario, claim, directory).play()
            finally:
                hoststate.release(claim)
            if outcome.passed and not keep_logs:
                shutil.rmtree(directory, ignore_errors=True)
                outcome.logs = None
            outcomes[scenario.path] = outcome
            if report is not None:
                report(outcome)

    ordered = sorted(scenarios, key=lambda s: s.end, reverse=True)
    await asyncio.gather(*(one(scenario) for scenario in ordered))
    return [outcomes[path] for path in paths if path in outcomes]


def install_signal_handlers() -> None:
    """SIGTERM ends a run like Ctrl-C: the current task is cancelled, teardown runs."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)

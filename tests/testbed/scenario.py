"""Scenario files (the format of ../shared/scenarios/README.md), validated once, at load.

``load_scenario(path)`` returns a frozen ``Scenario`` or raises ``ScenarioError`` with one
line naming the file, the field and the problem. Everything the runner needs later is
checked here -- selectors name existing regions, agents and targets; states and failure
classes exist; every check is one the coordinator accepts once its target is an address
-- so a bad file fails before any namespace is made.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from coordinator.verdicts import VerdictState
from vantage.checks import parse_check
from vantage.durations import parse_duration
from vantage.results import FailureClass

DOMAIN = "vantage.test"
SERVE_KINDS = ("http", "https", "https-expired", "tcp", "dns")
# Where each kind of target listens (tests/test_scenarios.py's ADDRESS table: tcp on 7000).
PORTS = {"http": 80, "https": 443, "https-expired": 443, "tcp": 7000, "dns": 53}
SELECTOR_KINDS = ("region", "agent", "target", "coordinator", "all")
_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_LABEL = re.compile(r"^[a-z][a-z0-9]*$")
# Region LANs are numbered inside a run's address block (see topology.py).
MAX_REGIONS = 8
MAX_AGENTS_PER_REGION = 200


class ScenarioError(Exception):
    """A scenario file is not valid; ``str()`` is one line: file, field, problem."""


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    serve: str  # one of SERVE_KINDS

    @property
    def host(self) -> str:
        return f"{self.name}.{DOMAIN}"


@dataclass(frozen=True, slots=True)
class Selector:
    """``region:eu``, ``agent:eu-1``, ``target:web``, ``coordinator`` or ``all``."""

    kind: str
    name: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind


@dataclass(frozen=True, slots=True)
class NetworkFault:
    """drop / reject / loss between two selectors, applied in every region router."""

    action: Literal["drop", "reject", "loss"]
    source: Selector
    dest: Selector
    percent: int = 100


@dataclass(frozen=True, slots=True)
class DnsFault:
    """The region's resolver answers ``answer`` (nxdomain, servfail or an IPv4 address)
    for ``host``."""

    region: str
    host: str
    answer: str


@dataclass(frozen=True, slots=True)
class ProcessFault:
    action: Literal["stop", "start", "kill", "restart"]
    subject: Selector  # target:NAME (stop/start), agent:NAME or coordinator (kill/restart)


@dataclass(frozen=True, slots=True)
class Clear:
    """Remove every network and DNS fault."""


Fault = NetworkFault | DnsFault | ProcessFault | Clear


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    fault: Fault
    text: str  # as written, for the log


@dataclass(frozen=True, slots=True)
class Expectation:
    """``state`` (and the optional evidence) must hold at some moment in [at, at+within];
    for a ``never`` entry (``at`` and ``within`` unused) it must hold at no moment."""

    check: str
    state: str
    at: float = 0.0
    within: float = 0.0
    regions_down: frozenset[str] | None = None
    failure: str | None = None
    impaired: frozenset[str] | None = None

    def describe(self) -> str:
        parts = [self.check, self.state]
        if self.regions_down is not None:
            parts.append(f"regions_down=[{', '.join(sorted(self.regions_down))}]")
        if self.failure is not None:
            parts.append(f"failure={self.failure}")
        if self.impaired is not None:
            parts.append(f"impaired=[{', '.join(sorted(self.impaired))}]")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    about: str
    path: Path
    regions: Mapping[str, int]  # region -> agents, in file order
    targets: Mapping[str, Target]
    checks: tuple[Mapping[str, Any], ...]  # as written; ``target`` names a target
    timeline: tuple[Event, ...]
    expect: tuple[Expectation, ...]
    never: tuple[Expectation, ...]
    end: float

    @property
    def agents(self) -> list[tuple[str, str]]:
        """(agent, region) for every agent: eu-1, eu-2, us-1, ..."""
        return [
            (f"{region}-{index}", region)
            for region, count in self.regions.items()
            for index in range(1, count + 1)
        ]


def target_address(check_type: str, target: Target) -> str:
    """What a check of ``check_type`` probes on ``target``: a URL, host:port or a host,
    under the name the region resolvers serve (tests/test_scenarios.py's ADDRESS table,
    extended to every pair of check type and target kind)."""
    if check_type == "http":
        scheme = "http" if target.serve in ("http", "tcp", "dns") else "https"
        return f"{scheme}://{target.host}/"
    if check_type == "tcp":
        return f"{target.host}:{PORTS[target.serve]}"
    return target.host  # dns and icmp probe the name itself


def rendered_check(spec: Mapping[str, Any], targets: Mapping[str, Target]) -> dict[str, Any]:
    """The check as the coordinator's checks file gets it, TLS CA aside (the runner adds
    ``tls.ca_file`` for https targets, see ``run.py``)."""
    target = targets[spec["target"]]
    return {**spec, "target": target_address(str(spec.get("type", "")), target)}


def load_scenario(path: Path) -> Scenario:
    """Read and validate one scenario file; ScenarioError (one line) on any problem."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"{path}: cannot read: {exc}") from None
    return _Reader(path).scenario(data)


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> ScenarioError:
        return ScenarioError(f"{self.path}: {where}: {problem}")

    def scenario(self, data: Any) -> Scenario:
        if not isinstance(data, dict):
            raise self.fail("(top)", "expected a mapping")
        known = {"name", "about", "regions", "targets", "checks", "timeline", "expect"}
        known |= {"never", "end"}
        for key in data:
            if key not in known:
                raise self.fail(str(key), f"unknown key (known: {', '.join(sorted(known))})")
        name = data.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise self.fail("name", f"{name!r} is not a kebab-case name")
        regions = self.regions(data.get("regions"))
        targets = self.targets(data.get("targets"))
        agents = {f"{r}-{i}" for r, count in regions.items() for i in range(1, count + 1)}
        checks = self.checks(data.get("checks"), targets)
        names = {str(spec["name"]) for spec in checks}
        end = self.duration("end", data.get("end"))
        timeline = tuple(
            self.event(f"timeline[{i}]", item, regions, agents, targets, end)
            for i, item in enumerate(self.listing("timeline", data.get("timeline", [])))
        )
        expect = tuple(
            self.expectation(f"expect[{i}]", item, names, regions, agents, end, window=True)
            for i, item in enumerate(self.listing("expect", data.get("expect", [])))
        )
        never = tuple(
            self.expectation(f"never[{i}]", item, names, regions, agents, end, window=False)
            for i, item in enumerate(self.listing("never", data.get("never", [])))
        )
        return Scenario(
            name=name,
            about=str(data.get("about", "")).strip(),
            path=self.path,
            regions=regions,
            targets=targets,
            checks=checks,
            timeline=tuple(sorted(timeline, key=lambda event: event.at)),  # stable
            expect=expect,
            never=never,
            end=end,
        )

    def listing(self, where: str, value: Any) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(where, "expected a list")
        return value

    def duration(self, where: str, value: Any) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise self.fail(where, f"{value!r} has no unit (write e.g. 500ms, 1.5s, 2s, 1m)")
        try:
            seconds = parse_duration(str(value))
        except ValueError as exc:
            raise self.fail(where, str(exc)) from None
        return seconds

    def regions(self, value: Any) -> dict[str, int]:
        if not isinstance(value, dict) or not value:
            raise self.fail("regions", "expected a mapping region -> number of agents")
        if len(value) > MAX_REGIONS:
            raise self.fail("regions", f"at most {MAX_REGIONS} regions")
        regions: dict[str, int] = {}
        for region, count in value.items():
            if not isinstance(region, str) or not _LABEL.match(region):
                raise self.fail("regions", f"{region!r} is not a region name (e.g. eu)")
            if not isinstance(count, int) or not 0 < count <= MAX_AGENTS_PER_REGION:
                raise self.fail(f"regions.{region}", f"{count!r} agents: want 1..200")
            regions[region] = count
        return regions

    def targets(self, value: Any) -> dict[str, Target]:
        if not isinstance(value, dict) or not value:
            raise self.fail("targets", "expected a mapping name -> {serve: KIND}")
        targets: dict[str, Target] = {}
        for name, spec in value.items():
            if not isinstance(name, str) or not _LABEL.match(name):
                raise self.fail("targets", f"{name!r} is not a target name (e.g. web)")
            serve = spec.get("serve") if isinstance(spec, dict) else None
            if serve not in SERVE_KINDS:
                raise self.fail(f"targets.{name}.serve", f"{serve!r}: want {SERVE_KINDS}")
            if isinstance(spec, dict) and set(spec) != {"serve"}:
                raise self.fail(f"targets.{name}", "only `serve` is known")
            targets[name] = Target(name, serve)
        return targets

    def checks(self, value: Any, targets: Mapping[str, Target]) -> tuple[dict[str, Any], ...]:
        checks: list[dict[str, Any]] = []
        seen: set[str] = set()
        for index, spec in enumerate(self.listing("checks", value)):
            where = f"checks[{index}]"
            if not isinstance(spec, dict):
                raise self.fail(where, "expected a mapping")
            if spec.get("target") not in targets:
                raise self.fail(f"{where}.target", f"{spec.get('target')!r} names no target")
            try:
                check = parse_check(rendered_check(spec, targets))
            except ValidationError as exc:
                problem = "; ".join(
                    f"{'.'.join(str(p) for p in error['loc'][1:]) or '(check)'}: {error['msg']}"
                    for error in exc.errors()
                )
                raise self.fail(where, problem) from None
            if check.name in seen:
                raise self.fail(f"{where}.name", f"duplicate check name {check.name!r}")
            seen.add(check.name)
            checks.append(dict(spec))
        if not checks:
            raise self.fail("checks", "a scenario needs at least one check")
        return tuple(checks)

    def selector(
        self,
        where: str,
        text: Any,
        regions: Mapping[str, int],
        agents: set[str],
        targets: Mapping[str, Target],
    ) -> Selector:
        if text in ("coordinator", "all"):
            return Selector(str(text))
        kind, _, name = str(text).partition(":")
        known = {"region": set(regions), "agent": agents, "target": set(targets)}
        if kind not in known:
            raise self.fail(
                where, f"{text!r}: want region:NAME, agent:NAME, target:NAME, coordinator or all"
            )
        if name not in known[kind]:
            raise self.fail(where, f"{text!r}: no {kind} named {name!r}")
        return Selector(kind, name)

    def event(
        self,
        where: str,
        item: Any,
        regions: Mapping[str, int],
        agents: set[str],
        targets: Mapping[str, Target],
        end: float,
    ) -> Event:
        if not isinstance(item, dict) or set(item) != {"at", "fault"}:
            raise self.fail(where, "expected {at: DURATION, fault: ...}")
        at = self.duration(f"{where}.at", item["at"])
        if at > end:
            raise self.fail(f"{where}.at", "after the scenario's end")
        fault = item["fault"]
        text = fault if isinstance(fault, str) else yaml.safe_dump(fault, default_flow_style=True)
        text = text.strip()
        where = f"{where}.fault"
        if fault == "clear":
            return Event(at, Clear(), text)
        if not isinstance(fault, dict) or len(fault) != 1:
            raise self.fail(where, "expected `clear` or a mapping with one fault")
        ((kind, spec),) = fault.items()
        if kind in ("drop", "reject", "loss"):
            wanted = {"from", "to", "percent"} if kind == "loss" else {"from", "to"}
            if not isinstance(spec, dict) or set(spec) != wanted:
                raise self.fail(f"{where}.{kind}", f"expected keys {sorted(wanted)}")
            source = self.selector(f"{where}.{kind}.from", spec["from"], regions, agents, targets)
            dest = self.selector(f"{where}.{kind}.to", spec["to"], regions, agents, targets)
            percent = spec.get("percent", 100)
            if not isinstance(percent, int) or not 0 < percent <= 100:
                raise self.fail(f"{where}.{kind}.percent", f"{percent!r}: want 1..100")
            return Event(at, NetworkFault(kind, source, dest, percent), text)
        if kind == "dns":
            if not isinstance(spec, dict) or set(spec) != {"region", "name", "answer"}:
                raise self.fail(f"{where}.dns", "expected keys answer, name, region")
            if spec["region"] not in regions:
                raise self.fail(f"{where}.dns.region", f"no region named {spec['region']!r}")
            name = str(spec["name"])
            host = targets[name].host if name in targets else name
            if name not in targets and not host.endswith(f".{DOMAIN}"):
                raise self.fail(f"{where}.dns.name", f"{name!r}: a target or a name in {DOMAIN}")
            answer = str(spec["answer"])
            if answer not in ("nxdomain", "servfail"):
                try:
                    ipaddress.IPv4Address(answer)
                except ValueError:
                    raise self.fail(
                        f"{where}.dns.answer", f"{answer!r}: nxdomain, servfail or an IPv4 address"
                    ) from None
            return Event(at, DnsFault(str(spec["region"]), host, answer), text)
        if kind in ("stop", "start", "kill", "restart"):
            subject = self.selector(f"{where}.{kind}", spec, regions, agents, targets)
            allowed: dict[str, tuple[str, ...]] = {
                "stop": ("target",),
                "start": ("target",),
                "kill": ("agent",),
                "restart": ("agent", "coordinator"),
            }
            if subject.kind not in allowed[kind]:
                raise self.fail(f"{where}.{kind}", f"{spec!r}: {kind} takes {allowed[kind]}")
            return Event(at, ProcessFault(kind, subject), text)
        raise self.fail(where, f"unknown fault {kind!r}")

    def expectation(
        self,
        where: str,
        item: Any,
        checks: set[str],
        regions: Mapping[str, int],
        agents: set[str],
        end: float,
        *,
        window: bool,
    ) -> Expectation:
        if not isinstance(item, dict):
            raise self.fail(where, "expected a mapping")
        known = {"check", "state", "regions_down", "failure", "impaired"}
        if window:
            known |= {"at", "within"}
        for key in item:
            if key not in known:
                raise self.fail(f"{where}.{key}", f"unknown key (known: {sorted(known)})")
        if item.get("check") not in checks:
            raise self.fail(f"{where}.check", f"{item.get('check')!r} names no check")
        try:
            state = VerdictState(str(item.get("state"))).value
        except ValueError:
            states = ", ".join(s.value for s in VerdictState)
            raise self.fail(f"{where}.state", f"{item.get('state')!r}: want {states}") from None
        failure = item.get("failure")
        if failure is not None:
            try:
                FailureClass(failure)
            except ValueError:
                raise self.fail(f"{where}.failure", f"{failure!r} is no failure class") from None
        at = within = 0.0
        if window:
            if "at" not in item or "within" not in item:
                raise self.fail(where, "an expectation needs `at` and `within`")
            at = self.duration(f"{where}.at", item["at"])
            within = self.duration(f"{where}.within", item["within"])
            if at + within > end:
                raise self.fail(where, "its window ends after the scenario's end")
        return Expectation(
            check=str(item["check"]),
            state=state,
            at=at,
            within=within,
            regions_down=self.names(f"{where}.regions_down", item, "regions_down", set(regions)),
            failure=failure,
            impaired=self.names(f"{where}.impaired", item, "impaired", agents),
        )

    def names(
        self, where: str, item: dict[str, Any], key: str, known: set[str]
    ) -> frozenset[str] | None:
        if key not in item:
            return None
        value = item[key]
        if not isinstance(value, list) or not all(name in known for name in value):
            raise self.fail(where, f"{value!r}: want a list of names from {sorted(known)}")
        return frozenset(value)

"""deploy/container and deploy/compose.yaml: the image `make image` builds (here on a
Debian 12 base that mmdebstrap makes from this machine's mirror) runs its agent as uid
10001 with the compiled probe path against a coordinator on the host, and the compose
project's coordinator and agents on the compose file's own commands, mounts and
configuration; the compose file, its Prometheus and Grafana files hold together.

``podman run`` cannot start containers on every machine these tests run on (crun and a
hybrid cgroup hierarchy), so the image runs as a container runtime would run it: its
file system (``podman image mount``, read-only) as the root of a chroot, in a mount
namespace of its own that takes the bind mounts with it when the process ends, with the
image's user, working directory, environment and entrypoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from running_system import VANTAGE, System, wait_until

import vantage
from coordinator.config import (
    DEFAULT_HTTP_LISTEN,
    DEFAULT_LISTEN,
    exposure_problem,
    load_config,
)
from vantage import native
from vantage.checks import load_checks
from vantage.cli import parser
from vantage.configfile import split_host_port

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONTAINER = DEPLOY / "container"
COMPOSE = DEPLOY / "compose.yaml"
IMAGE = f"localhost/vantage:{vantage.__version__}"
UID = 10001
# Public images the compose file may name besides its own.
PUBLIC_IMAGES = ("docker.io/library/eclipse-mosquitto", "docker.io/prom/prometheus",
                 "docker.io/grafana/grafana")  # fmt: skip
# A container runtime's bind mounts inside the image's root, then the image's command as
# its user, in its working directory, with its environment alone. Arguments: the root,
# user, working directory, pairs of host path and image path up to "--", then the
# environment and the command.
CHROOT = r"""
set -eu
root=$1 user=$2 workdir=$3
shift 3
mount --bind /proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
while [ "$1" != -- ]; do mount --bind "$1" "$root$2"; shift 2; done
shift
exec chroot --userspec="$user" "$root" /usr/bin/env -i -C "$workdir" "$@"
"""


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def vantage_services() -> dict[str, dict[str, Any]]:
    services = compose()["services"]
    return {name: spec for name, spec in services.items() if spec.get("image") == IMAGE}


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@dataclass(frozen=True)
class Image:
    """A built image, mounted read-only at ``root``; ``config`` is its OCI config."""

    name: str
    root: Path
    config: dict[str, Any]

    def command(self, *args: str, mounts: dict[str, Path], netns: str | None = None) -> list[str]:
        """The argv that runs the image's entrypoint with ``args``, the host paths of
        ``mounts`` bound at their image paths; in the network namespace ``netns``, or
        the host's (loopback included: chroot shares it)."""
        pairs = [str(part) for target, source in mounts.items() for part in (source, target)]
        prefix = ["ip", "netns", "exec", netns] if netns else []
        return [
            *prefix,
            *("unshare", "--mount", "--propagation", "private", "sh", "-c", CHROOT, "sh"),
            *(str(self.root), self.config["User"], self.config["WorkingDir"]),
            *pairs,
            "--",
            *self.config["Env"],
            *self.config["Entrypoint"],
            *args,
        ]


def run_logged(
    args: list[str], what: str, timeout: float, env: dict[str, str] | None = None
) -> float:
    """Run a set-up command (from the repository's root); fail with its output when it
    fails. Returns the seconds it took."""
    started = time.monotonic()
    done = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"{what} exited {done.returncode}:\n{done.stdout[-4000:]}{done.stderr[-4000:]}")
    return time.monotonic() - started


def debian_mirror() -> str | None:
    """The mirror this machine's apt takes bookworm from (deb822 or one-line sources);
    None for mmdebstrap's default."""
    apt = Path("/etc/apt")
    for path in sorted(apt.glob("sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.MULTILINE))
            if "bookworm" in fields.get("Suites", "").split() and fields.get("URIs"):
                return fields["URIs"].split()[0]
    for path in [apt / "sources.list", *sorted(apt.glob("sources.list.d/*.list"))]:
        text = path.read_text() if path.exists() else ""
        for match in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M):
            return match.group(1)
    return None


def pip_ca_bundle() -> str | None:
    """The CA bundle this machine's pip verifies with, when it has one of its own: `make
    image` lends it to the build's pip."""
    if os.environ.get("PIP_CERT"):
        return os.environ["PIP_CERT"]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.cert"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or None


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    """`make image` on a fresh Debian 12 base, both under tags of this run alone, mounted;
    unmounted and removed afterwards, however the tests went."""
    missing = [tool for tool in ("podman", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (`make system-deps`)")
    if os.geteuid() != 0:
        pytest.skip("mounting and chrooting into the image needs root")
    run = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    base, name = f"localhost/vantage-test-base:{run}", f"localhost/vantage-test:{run}"
    rootfs = tmp_path_factory.mktemp("base") / "rootfs.tar"
    mirror = debian_mirror()
    env = dict(os.environ)
    if (bundle := pip_ca_bundle()) is not None:
        env["PIP_CERT"] = bundle
    timings = {}
    try:
        timings["mmdebstrap"] = run_logged(
            ["mmdebstrap", "--quiet", "--variant=minbase", "bookworm", str(rootfs)]
            + ([mirror] if mirror else []),
            "mmdebstrap",
            300,
        )
        run_logged(["podman", "import", "--quiet", str(rootfs), base], "podman import", 120)
        rootfs.unlink()
        flags = f"--isolation chroot --layers=false --force-rm --build-arg BASE={base}"
        timings["make image"] = run_logged(
            ["make", "--no-print-directory", "image", f"IMAGE={name}", f"IMAGE_FLAGS={flags}"],
            "make image",
            900,
            env=env,
        )
        inspected = subprocess.run(
            ["podman", "image", "inspect", name], capture_output=True, text=True, check=True
        )
        config = json.loads(inspected.stdout)[0]["Config"]
        mounted = subprocess.run(
            ["podman", "image", "mount", name], capture_output=True, text=True, check=True
        )
        print(", ".join(f"{step} {seconds:.0f} s" for step, seconds in timings.items()))
        yield Image(name, Path(mounted.stdout.strip()), config)
    finally:
        subprocess.run(["podman", "image", "unmount", name], capture_output=True, check=False)
        subprocess.run(["podman", "rmi", "--force", name, base], capture_output=True, check=False)


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of its own, loopback up: the compose project's network."""
    name = f"vantage-compose-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def state_directory(path: Path) -> Path:
    """A new named volume on the image's state directory: its owner and mode."""
    path.mkdir(mode=0o700)
    os.chown(path, UID, UID)
    return path


def secrets_directory(path: Path, secrets: dict[str, str]) -> Path:
    """What compose mounts on /run: /run/secrets/NAME holding each secret."""
    (path / "secrets").mkdir(parents=True)
    for name, text in secrets.items():
        (path / "secrets" / name).write_text(text + "\n")
    return path


def test_the_image_is_lean_and_runs_as_its_own_user(image: Image) -> None:
    config = image.config
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["/opt/vantage/bin/vantage"]
    assert config["WorkingDir"] == "/var/lib/vantage"
    assert "STATE_DIRECTORY=/var/lib/vantage" in config["Env"]
    ports = {split_host_port(DEFAULT_LISTEN)[1], split_host_port(DEFAULT_HTTP_LISTEN)[1]}
    assert set(config["ExposedPorts"]) == {f"{port}/tcp" for port in ports}
    assert config["Labels"]["org.opencontainers.image.version"] == vantage.__version__
    state = (image.root / "var/lib/vantage").stat()
    assert (state.st_uid, state.st_gid, state.st_mode & 0o777) == (UID, UID, 0o700)
    # Neither a compiler nor a build tool ships: only the runtime's packages.
    bin_dir = image.root / "opt/vantage/bin"
    assert not (image.root / "usr/bin/gcc").exists()
    assert not [path.name for path in bin_dir.iterdir() if path.name.startswith("pip")]
    site = next((image.root / "opt/vantage/lib").glob("python3*/site-packages"))
    assert not [
        path.name
        for path in site.iterdir()
        if re.match(r"(mypy|mypyc|setuptools|pip)\b", path.name)
    ]
    assert not list(image.root.glob("tmp/*"))


def makefile_native_count() -> int:
    """How many modules the Makefile's NATIVE compiles."""
    found = re.search(r"^NATIVE := ((?:.*\\\n)*.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert found is not None
    return len(found.group(1).replace("\\\n", " ").split())


@pytest.mark.e2e
def test_the_image_agent_reports_to_a_coordinator_on_the_host(
    image: Image, system: System, tmp_path: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        config = system.write_config(
            f"checks:\n  - {{name: listener, type: tcp, target: '127.0.0.1:{port}', "
            "interval: 1s, timeout: 500ms}\n",
            engine="engine:\n  min_agents: 1\n  min_regions: 1\n",
        )
        coordinator = system.coordinator(config)
        token = (system.dir / "agent.token").read_text().strip()
        mounts = {
            "/var/lib/vantage": state_directory(tmp_path / "state"),
            "/run": secrets_directory(tmp_path / "run", {"agent.token": token}),
        }
        agent = system.spawn(
            "agent-eu-1",
            *image.command(
                *("agent", *coordinator.connect, "--name", "eu-1", "--region", "eu"),
                *("--token-file", "/run/secrets/agent.token", "--log-level", "debug"),
                mounts=mounts,
            ),
        )

        def connected() -> bool:
            if agent.popen.poll() is not None:
                pytest.fail(f"the image's agent exited {agent.popen.returncode}: {agent.stderr()}")
            agents = json.loads(coordinator.cli("agents", "--json").stdout)["agents"]
            return [(entry["name"], entry["connected"]) for entry in agents] == [("eu-1", True)]

        wait_until(connected, 30, "the image's agent to show up connected")
        wait_until(
            lambda: coordinator.status("listener")["state"] == "up",
            30,
            "the image's agent's results to make the listener up",
        )

    # The image's own interpreter, as its user, with every module of the probe path
    # compiled (the Makefile's NATIVE).
    process = Path(f"/proc/{agent.popen.pid}")
    assert os.readlink(process / "exe").startswith(str(image.root))
    uids = re.search(r"^Uid:\s+(.*)$", (process / "status").read_text(), re.M)
    assert uids is not None
    assert uids.group(1).split() == [str(UID)] * 4
    (starting,) = [event for event in agent.log_events() if event.get("event") == "agent starting"]
    assert starting["compiled"] == makefile_native_count() == len(native.COMPILED)


@pytest.mark.e2e
def test_the_compose_coordinator_and_agents_run_on_their_own_files(
    image: Image, netns: str, system: System, tmp_path: Path
) -> None:
    """The compose project without compose: in a network namespace of its own (where
    the service names resolve to its loopback), the coordinator and the three agents
    with their commands and mounts from compose.yaml, their tokens made the README's
    way (the image's `token create` on the coordinator's volume), Debian's mosquitto on
    deploy/container/mosquitto.conf. Every check of deploy/container/checks.yaml comes
    to its verdict and the coordinator publishes to the broker."""
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (`make system-deps`)")
    services = compose()["services"]
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost {' '.join(services)}\n")
    volumes: dict[str, Path] = {}

    def mounts(service: str, secrets: dict[str, str] | None = None) -> dict[str, Path]:
        found: dict[str, Path] = {"/etc/hosts": hosts}
        for entry in services[service].get("volumes", []):
            source, target = entry.split(":")[:2]
            if source.startswith("."):
                found[target] = (DEPLOY / source).resolve()
            else:
                if source not in volumes:
                    volumes[source] = state_directory(tmp_path / f"volume-{source}")
                found[target] = volumes[source]
        if secrets is not None:
            found["/run"] = secrets_directory(tmp_path / f"run-{service}", secrets)
        return found

    system.spawn(
        "mosquitto",
        "ip",
        "netns",
        "exec",
        netns,
        "mosquitto",
        "-c",
        str(CONTAINER / "mosquitto.conf"),
    )
    config = flag(services["coordinator"]["command"], "--config")
    tokens = {}
    for service, spec in vantage_services().items():
        if spec["command"][0] != "agent":
            continue
        name, region = flag(spec["command"], "--name"), flag(spec["command"], "--region")
        create = ("token", "create", "--config", config, "--name", name, "--region", region)
        made = subprocess.run(
            image.command(*create, mounts=mounts("coordinator")),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert made.returncode == 0, made.stderr
        tokens[service] = made.stdout.strip()

    coordinator = system.spawn(
        "coordinator",
        *image.command(
            *services["coordinator"]["command"], mounts=mounts("coordinator"), netns=netns
        ),
    )

    def listening() -> dict[str, Any] | None:
        if coordinator.popen.poll() is not None:
            pytest.fail(
                f"the coordinator exited {coordinator.popen.returncode}: {coordinator.stderr()}"
            )
        events = [e for e in coordinator.log_events() if e.get("event") == "coordinator listening"]
        return events[0] if events else None

    event = wait_until(listening, 30, "the image's coordinator to listen")
    assert (event["grpc_port"], event["http_port"]) == (7400, 9470)
    for service, token in tokens.items():
        (secret,) = services[service]["secrets"]
        system.spawn(
            service,
            *image.command(
                *services[service]["command"],
                mounts=mounts(service, {secret["target"]: token}),
                netns=netns,
            ),
        )

    wanted = {
        "coordinator-http": "up",
        "coordinator-grpc": "up",
        "mqtt-broker": "up",
        "nothing-listens": "global",
    }
    assert {check.name for check in load_checks(CONTAINER / "checks.yaml")} == set(wanted)

    def verdicts() -> dict[str, str] | None:
        listed = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                netns,
                VANTAGE,
                "status",
                "--json",
                "--coordinator",
                "127.0.0.1:7400",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if listed.returncode != 0:
            return None
        states = {v["check"]: v["state"] for v in json.loads(listed.stdout)["verdicts"]}
        return states if states == wanted else None

    wait_until(verdicts, 90, "every compose check to come to its verdict", every=1)
    wait_until(
        lambda: any(e.get("event") == "mqtt connected" for e in coordinator.log_events()),
        30,
        "the coordinator to connect to the broker",
    )


def test_the_container_coordinator_config_loads_and_may_listen_beyond_loopback() -> None:
    config = load_config(CONTAINER / "coordinator.yaml")
    assert config.exposed() == ["listen", "http_listen"]
    assert exposure_problem(config, has_query_tokens=False) is None
    assert config.checks_file == CONTAINER / "checks.yaml"
    load_checks(config.checks_file)
    state = Path("/var/lib/vantage")
    assert config.tokens_file == state / "tokens.yaml"
    assert config.store_file == state / "vantage.db"
    # The default ports: the ones the image exposes and compose publishes.
    assert config.listen.endswith(DEFAULT_LISTEN.rpartition(":")[2])
    assert config.http_listen.endswith(DEFAULT_HTTP_LISTEN.rpartition(":")[2])
    assert config.mqtt.url is not None
    assert split_host_port(config.mqtt.url.removeprefix("mqtt://"))[0] in compose()["services"]


def test_every_compose_service_has_a_known_image_and_existing_mounts() -> None:
    project = compose()
    services = project["services"]
    declared = set(project["volumes"])
    for name, spec in services.items():
        image = spec["image"]
        if image == IMAGE:
            build = spec["build"]
            assert (DEPLOY / build["context"]).resolve() == ROOT, name
            assert (ROOT / build["dockerfile"]).resolve() == CONTAINER / "Containerfile", name
            assert build["args"]["VERSION"] == vantage.__version__, name
        else:
            repository, _, tag = image.rpartition(":")
            assert repository in PUBLIC_IMAGES, name
            assert tag not in ("", "latest"), f"{name}: pin a version"
        assert set(spec.get("depends_on", [])) <= set(services), name
        for entry in spec.get("volumes", []):
            source = entry.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
            else:
                assert source in declared, f"{name}: volume {source}"
        for published in spec.get("ports", []):
            # Plaintext and open queries (deploy/container/coordinator.yaml): loopback only.
            assert published.startswith("127.0.0.1:"), f"{name}: {published}"
    # Tokens come from the user, never from the repository or the build context.
    for secret in project["secrets"].values():
        assert Path(secret["file"]).parent == Path("secrets")
    assert "deploy/secrets" in (ROOT / ".containerignore").read_text().splitlines()


def test_the_vantage_services_commands_are_ones_the_cli_accepts() -> None:
    services = vantage_services()
    coordinator = parser().parse_args(services.pop("coordinator")["command"])
    assert coordinator.command == "coordinator"
    assert coordinator.config == Path("/etc/vantage/coordinator.yaml")
    assert (DEPLOY / "container" / coordinator.config.name).exists()
    grpc_port = split_host_port(load_config(CONTAINER / "coordinator.yaml").listen)[1]
    agents = []
    for name, spec in services.items():
        args = parser().parse_args(spec["command"])
        assert args.command == "agent", name
        assert args.coordinator == f"coordinator:{grpc_port}", name
        assert args.tls is False, f"{name}: plaintext inside the compose network"
        (secret,) = spec["secrets"]
        assert args.token_file == Path("/run/secrets") / secret["target"], name
        assert secret["source"] == f"{args.name}-token", name
        agents.append((args.name, args.region))
    assert sorted(agents) == [("ap-1", "ap"), ("eu-1", "eu"), ("us-1", "us")]


def test_the_compose_prometheus_is_the_shipped_one_aimed_at_the_coordinator(
    tmp_path: Path,
) -> None:
    shipped = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    ours = yaml.safe_load((CONTAINER / "prometheus.yml").read_text())
    (job,) = ours["scrape_configs"]
    (shipped_job,) = shipped["scrape_configs"]
    assert ours["global"] == shipped["global"]
    assert ours["rule_files"] == shipped["rule_files"]
    assert {key: job[key] for key in ("job_name", "metrics_path")} == {
        key: shipped_job[key] for key in ("job_name", "metrics_path")
    }
    http_port = split_host_port(load_config(CONTAINER / "coordinator.yaml").http_listen)[1]
    assert job["static_configs"] == [{"targets": [f"coordinator:{http_port}"]}]
    # As the container sees them: both files side by side in /etc/prometheus.
    mounted = {}
    for entry in compose()["services"]["prometheus"]["volumes"]:
        source, target = entry.split(":")[:2]
        if target.startswith("/etc/prometheus/"):
            mounted[Path(target).name] = DEPLOY / source
    assert set(mounted) == {"prometheus.yml", "rules.yml"}
    for name, source in mounted.items():
        shutil.copy(source, tmp_path / name)
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (`make system-deps`)")
    done = subprocess.run(
        [tool, "check", "config", "prometheus.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_compose_grafana_finds_the_dashboard_and_the_compose_prometheus() -> None:
    shipped = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "vantage.yaml").read_text()
    )
    ours = yaml.safe_load((CONTAINER / "grafana-datasource.yaml").read_text())
    (source,) = ours["datasources"]
    (shipped_source,) = shipped["datasources"]
    assert {**source, "url": None} == {**shipped_source, "url": None}
    services = compose()["services"]
    assert source["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "vantage.yaml").read_text()
    )
    mounts = dict(entry.split(":")[:2][::-1] for entry in services["grafana"]["volumes"])
    (dashboards,) = provider["providers"]
    assert mounts[dashboards["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning/dashboards"] == "./grafana/provisioning/dashboards"
    assert mounts["/etc/grafana/provisioning/datasources/vantage.yaml"] == (
        "./container/grafana-datasource.yaml"
    )

"""`make dist`: a pure-Python wheel holding everything the runtime needs, which installs
into a fresh virtual environment (no checkout of this repository) and runs a coordinator
and an agent that connects to it."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest
from running_system import System, wait_until

import vantage

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("vantage", "agent", "coordinator", "vantage_proto")


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel and sdist, built as the Makefile's ``dist`` target builds them."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--quiet", "--no-isolation", "--outdir", str(out), "."],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def wheel(dist: Path) -> Path:
    (found,) = dist.glob("vantage-*.whl")
    return found


def test_the_makefile_builds_the_same_way() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "\t$(PY) -m build --quiet --no-isolation --outdir $(DIST) .\n" in makefile


def test_the_wheel_is_pure_python_and_holds_what_the_runtime_reads(dist: Path) -> None:
    built = wheel(dist)
    assert built.name == f"vantage-{vantage.__version__}-py3-none-any.whl"
    assert (dist / f"vantage-{vantage.__version__}.tar.gz").exists()
    names = set(zipfile.ZipFile(built).namelist())
    # make native leaves mypyc's extensions beside the sources: never in the wheel.
    assert [name for name in names if name.endswith((".so", ".pyd", ".c"))] == []
    sources = {
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*")
        if path.suffix in {".py", ".pyi"} and "__pycache__" not in path.parts
    }
    assert sources - names == set()
    data = {f"{package}/py.typed" for package in PACKAGES} | {"coordinator/openapi.yaml"}
    assert data - names == set()
    assert any(name.startswith("vantage_proto/v1/agent_pb2") for name in names)
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(built).read(entry_points).decode()
    assert "vantage = vantage.cli:main" in text


@pytest.mark.e2e
def test_the_installed_wheel_runs_a_coordinator_and_an_agent(
    dist: Path, system: System, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-c",
            str(ROOT / "constraints.txt"),
            str(wheel(dist)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert install.returncode == 0, install.stderr
    installed, python = str(venv / "bin" / "vantage"), str(venv / "bin" / "python")

    def run(*args: str, program: str = installed) -> subprocess.CompletedProcess[str]:
        # Away from the checkout, so that nothing can import from it.
        return subprocess.run(
            [program, *args], cwd=tmp_path, capture_output=True, text=True, timeout=30
        )

    version = run("--version")
    assert version.stdout.strip() == f"vantage {vantage.__version__}", version.stderr
    where = run("-c", "import coordinator.api; print(coordinator.api.__file__)", program=python)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr

    config = system.write_config("checks: []\n")
    coordinator = system.coordinator(config, program=installed)
    address = f"127.0.0.1:{coordinator.grpc_port}"
    agent = system.spawn(
        "agent-eu-1",
        installed,
        "agent",
        "--coordinator",
        address,
        "--name",
        "eu-1",
        "--region",
        "eu",
        "--token-file",
        str(system.dir / "agent.token"),
    )

    def connected() -> list[tuple[str, str, bool]] | None:
        if agent.popen.poll() is not None:
            pytest.fail(f"the agent exited {agent.popen.returncode}: {agent.stderr()}")
        listed = run("agents", "--json", "--coordinator", address)
        assert listed.returncode == 0, listed.stderr
        agents = json.loads(listed.stdout)["agents"]
        seen = [(entry["name"], entry["region"], entry["connected"]) for entry in agents]
        return seen if seen == [("eu-1", "eu", True)] else None

    wait_until(connected, 30, "the installed agent to show up connected")

    # The JSON API's description is package data: served from the installed wheel.
    url = f"http://127.0.0.1:{coordinator.http_port}/api/v1/openapi.yaml"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == (ROOT / "coordinator" / "openapi.yaml").read_bytes()

"""What a run leaves on the host, and making sure it leaves nothing.

Every run claims a *slot* (its /20 of 198.18.0.0/15 and its name prefix ``vtSS..``) under
a lock in ``/run/vantage-testbed/``, in a file that names the owning process. A claim
whose owner is gone (a runner killed with SIGKILL, a crashed CI job) is cleaned up by the
next run that claims a slot, so a dead run never poisons the next one.

``remove_all(prefix)`` removes everything a prefix can own -- processes in its
namespaces, the namespaces (their veths and nftables tables go with them), host-side
links, ``/etc/netns/<ns>`` -- without an event loop and without raising: it is the
fallback of ``atexit`` and signal handlers. ``leftovers(prefix, ...)`` lists what is
still there; a run fails when that list is not empty.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .commands import run_sync
from .topology import SLOTS

REGISTRY = Path("/run/vantage-testbed")
NETNS_ETC = Path("/etc/netns")
NETNS_RUN = Path("/run/netns")
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


class NoFreeSlot(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Claim:
    slot: int
    prefix: str

    @property
    def file(self) -> Path:
        return REGISTRY / self.prefix


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), None when it is gone or a
    zombie: with the pid it names a process even after the pid is reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]  # field 22 of stat


def _owner_alive(entry: Path) -> bool:
    try:
        pid_text, started = entry.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    return _start_time(pid) == started


def claim_slot() -> Claim:
    """Claim a free slot for this process (cleaning up after dead owners first)."""
    REGISTRY.mkdir(parents=True, exist_ok=True)
    with (REGISTRY / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        used: set[int] = set()
        for entry in sorted(REGISTRY.glob("vt*")):
            if _owner_alive(entry):
                used.add(int(entry.name[2:4]))
            else:
                remove_all(entry.name)
                entry.unlink(missing_ok=True)
        free = [slot for slot in range(SLOTS) if slot not in used]
        if not free:
            raise NoFreeSlot(f"all {SLOTS} test-bed slots are in use ({REGISTRY})")
        slot = free[0]
        pid = os.getpid()
        tag = _BASE36[pid % 36] + _BASE36[(pid // 36) % 36]
        claim = Claim(slot, f"vt{slot:02d}{tag}")
        claim.file.write_text(f"{pid} {_start_time(pid)}\n")
        return claim


def release(claim: Claim) -> None:
    claim.file.unlink(missing_ok=True)


def namespaces(prefix: str) -> list[str]:
    listing = run_sync("ip", "netns", "list").stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith(f"{prefix}-")]


def host_links(prefix: str) -> list[str]:
    listing = run_sync("ip", "-o", "link", "show").stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in listing.splitlines()]
    return [name for name in names if name.startswith(prefix)]


def host_tables(prefix: str) -> list[str]:
    """``table FAMILY NAME`` lines of the host's nftables tables named with ``prefix``."""
    listing = run_sync("nft", "list", "tables").stdout
    return [
        line.strip()
        for line in listing.splitlines()
        if len(line.split()) == 3 and line.split()[2].startswith(prefix)
    ]


def netns_inode(ns: str) -> int | None:
    try:
        return (NETNS_RUN / ns).stat().st_ino
    except OSError:
        return None


def processes_in(inodes: set[int]) -> list[int]:
    """Pids of processes living in any of the network namespaces ``inodes``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            link = os.readlink(entry / "ns" / "net")
        except OSError:
            continue
        if link.startswith("net:[") and int(link[5:-1]) in inodes:
            pids.append(int(entry.name))
    return pids


def remove_all(prefix: str) -> None:
    """Remove everything ``prefix`` can own. Never raises; safe to call twice."""
    names = namespaces(prefix)
    inodes = {inode for ns in names if (inode := netns_inode(ns)) is not None}
    for _ in range(50):
        pids = processes_in(inodes)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    for ns in names:
        run_sync("ip", "netns", "del", ns)
    for link in host_links(prefix):
        run_sync("ip", "link", "del", link)
    for line in host_tables(prefix):
        family, table = line.split()[1:3]
        run_sync("nft", "delete", "table", family, table)
    if NETNS_ETC.is_dir():
        for directory in NETNS_ETC.glob(f"{prefix}-*"):
            shutil.rmtree(directory, ignore_errors=True)


def leftovers(prefix: str, inodes: set[int], pids: list[int]) -> list[str]:
    """What of ``prefix`` is still on the host: namespaces, links, nftables tables,
    /etc/netns directories, processes (in its namespaces, or any of ``pids``)."""
    found = [f"namespace {ns}" for ns in namespaces(prefix)]
    found += [f"link {link}" for link in host_links(prefix)]
    found += [f"nft table {line.strip()}" for line in host_tables(prefix)]
    if NETNS_ETC.is_dir():
        found += [f"directory {path}" for path in NETNS_ETC.glob(f"{prefix}-*")]
    alive = set(processes_in(inodes))
    for pid in pids:
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                alive.add(pid)
    found += [f"process {pid}" for pid in sorted(alive)]
    return found

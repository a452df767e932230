"""Running system commands (ip, nft, ss) from the runner's event loop.

Exceptions: ``CommandFailed`` (a command exited non-zero; ``str()`` names it and its
stderr).
"""

from __future__ import annotations

import asyncio
import subprocess


class CommandFailed(Exception):
    pass


async def run(*argv: str, input: str | None = None, check: bool = True) -> str:
    """Run ``argv`` to completion and return its stdout; CommandFailed when it fails and
    ``check`` is set."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await process.communicate(None if input is None else input.encode())
    if check and process.returncode != 0:
        shown = " ".join(argv)
        if input is not None:
            shown += f" <<< {input.strip()!r}"
        raise CommandFailed(f"{shown}: exit {process.returncode}: {stderr.decode().strip()}")
    return stdout.decode()


def run_sync(*argv: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """The same without an event loop, never raising: for cleanup paths (atexit)."""
    return subprocess.run(argv, input=input, capture_output=True, text=True, check=False)


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]

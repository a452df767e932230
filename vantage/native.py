"""The modules compiled to C extensions with mypyc, and whether the compiled ones are current.

The probe path (every probe runs through these) is ordinary typed Python; ``make native``
(which ``make run``, ``make test`` and ``make bench`` depend on) compiles it with mypyc
into extension modules beside the sources, which Python then imports instead of them: an
agent spends about 10% less CPU per probe. Nothing else changes; without a compiler the
same code runs as Python.

A compiled module older than its source would run stale code, so ``stale()`` names them:
the test suite refuses to start on one, and the agent warns.

``python -m vantage.native`` builds them (the Makefile's ``native`` target runs it): one
shared library ``vantage/_native__mypyc*.so`` plus a small extension per module.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from pathlib import Path

# Keep in step with NATIVE in the Makefile (tests/test_native.py checks).
COMPILED = (
    "agent.buffer",
    "agent.probes.http",
    "agent.probes.network",
    "agent.scheduler",
    "coordinator.engine",
    "coordinator.judgement",
    "coordinator.views",
    "vantage.results",
    "vantage.wire",
)

_ROOT = Path(__file__).resolve().parent.parent
_GROUP = "vantage._native"  # the shared library: vantage/_native__mypyc.*.so
_LIBRARY = _GROUP + "__mypyc"


def source(module: str) -> Path:
    """The source file of a module of this project."""
    return _ROOT.joinpath(*module.split(".")).with_suffix(".py")


def extension(module: str) -> Path | None:
    """The compiled extension of ``module`` beside its source, or None when not built."""
    base = source(module).with_suffix("")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = base.with_name(base.name + suffix)
        if candidate.exists():
            return candidate
    return None


def compiled() -> list[str]:
    """The modules of ``COMPILED`` that import as compiled extensions."""
    found = []
    for module in COMPILED:
        spec = importlib.util.find_spec(module)
        if spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            found.append(module)
    return found


def stale() -> list[str]:
    """Modules changed since they were compiled: ``make native``.

    Their code lives in the shared library (the extension beside each source is a shim
    that rebuilds only when the module list changes), so that library's age counts.
    """
    library = extension(_LIBRARY)
    if library is None:
        return []
    built = library.stat().st_mtime
    return [
        module
        for module in COMPILED
        if extension(module) is not None and source(module).stat().st_mtime > built
    ]


def build() -> None:
    """Compile ``COMPILED`` with mypyc into extensions beside their sources."""
    from mypyc.build import mypycify
    from setuptools import setup

    os.chdir(_ROOT)
    sources = [str(source(module).relative_to(_ROOT)) for module in COMPILED]
    setup(
        name="vantage-native",
        ext_modules=mypycify(sources, group_name=_GROUP, target_dir="build/native"),
        script_args=["--quiet", "build_ext", "--inplace", "--build-temp", "build/native"],
    )
    # An edit that changes no generated C (a docstring, a comment) compiles nothing, and
    # would leave the library older than its sources, stale() for ever: it is current.
    library = extension(_LIBRARY)
    if library is not None:
        library.touch()


if __name__ == "__main__":
    build()

"""The compiled probe path: the Makefile compiles what vantage.native lists, and only
current compiled modules are imported."""

import re
from pathlib import Path

from vantage import native

ROOT = Path(__file__).resolve().parent.parent


def test_the_makefile_compiles_the_modules_vantage_native_lists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    found = re.search(r"^NATIVE := ((?:.*\\\n)*.*)$", makefile, re.MULTILINE)
    assert found is not None
    files = found.group(1).replace("\\\n", " ").split()
    assert sorted(files) == sorted(
        str(native.source(module).relative_to(ROOT)) for module in native.COMPILED
    )


def test_every_compiled_module_imports_as_its_extension() -> None:
    built = [module for module in native.COMPILED if native.extension(module) is not None]
    assert native.compiled() == built
    assert native.stale() == []

"""The dependency rules of cached/: the layers and contracts of pyproject.toml's
``[tool.importlinter]`` (issue 15) checked by import-linter, and what it cannot express,
checked on the source (imports anywhere in a module, also inside functions): the upstream
backends answer no client request (no ``aiohttp.web``), the daemon's own credentials live
in the identity package."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cached"


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_import_contracts_hold() -> None:
    """pyproject.toml's [tool.importlinter] contracts: the layers of cached/ (a module
    imports only from the layers below its own), no import circle in any package, and the
    specific rules of issue 7 (backends answer no client request, the download path does
    not know the kind of upstream, the command line goes through the composition root)."""
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    done = subprocess.run(
        [lint, "--no-cache"], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_backends_answer_no_client_request() -> None:
    """No ``aiohttp.web`` in the upstream backends (import-linter cannot forbid a submodule
    of an external package)."""
    broken = {
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in sorted((PACKAGE / "upstream").glob("*.py"))
        for name in imports_of(path)
        if _within(name, "aiohttp.web")
    }
    assert not broken, sorted(broken)


def test_keystone_and_service_credentials_live_in_identity() -> None:
    defined = {
        node.name
        for node in ast.parse((PACKAGE / "manage" / "access.py").read_text()).body
        if isinstance(node, ast.ClassDef)
    }
    assert not defined & {"Keystone", "ServiceAuth", "TokenInfo", "IdentityUnavailable"}
    for user in ("manage/access.py", "jobs/prefetch.py", "manage/api.py"):
        assert not {
            name
            for name in imports_of(PACKAGE / user)
            if name.endswith((".Keystone", ".ServiceAuth")) and not _within(name, "cached.identity")
        }, user

"""The dependency rules of issue 7's layering, checked on the source (imports anywhere in a
module, also inside functions): the upstream backends know nothing of the cache directory
and answer no client request (no ``aiohttp.web``: the pass-through and the file store's image
API live proxy-side), the command line goes through the composition root, image ids are a
leaf."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        ("upstream/*.py", ("cached.store", "cached.fill", "cached.filler", "cached.proxy")),
        # The backends only fetch: request handling is cached/passthrough.py, cached/fileapi.py.
        (
            "upstream/*.py",
            (
                "aiohttp.web",
                "cached.replies",
                "cached.versions",
                "cached.ranges",
                "cached.passthrough",
                "cached.fileapi",
            ),
        ),
        # The proxy does not know which kind of upstream answers: the app picks the pass-through.
        ("proxy.py", ("cached.upstream.glance", "cached.upstream.filestore")),
        ("passthrough.py", ("cached.store", "cached.fill", "cached.upstream.filestore")),
        ("fileapi.py", ("cached.store", "cached.fill", "cached.upstream.glance")),
        ("cli.py", ("cached.store",)),
        ("ids.py", ("cached",)),
        ("admin.py", ("cached.store", "cached.upstream")),
    ],
)
def test_import_rules(modules: str, forbidden: tuple[str, ...]) -> None:
    paths = sorted(PACKAGE.glob(modules))
    assert paths, modules
    broken = {
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in paths
        for name in imports_of(path)
        for package in forbidden
        if _within(name, package)
    }
    assert not broken, sorted(broken)


def test_keystone_and_service_credentials_live_in_identity() -> None:
    defined = {
        node.name
        for node in ast.parse((PACKAGE / "admin.py").read_text()).body
        if isinstance(node, ast.ClassDef)
    }
    assert not defined & {"Keystone", "ServiceAuth", "TokenInfo", "IdentityUnavailable"}
    for user in ("admin.py", "prefetch.py", "manage.py"):
        assert not {
            name
            for name in imports_of(PACKAGE / user)
            if name.endswith((".Keystone", ".ServiceAuth")) and not _within(name, "cached.identity")
        }, user

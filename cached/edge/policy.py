"""Request policy enforced at the proxy, before anything reaches the upstream.

The optional ``policy`` file is YAML in the shape of Glance's ``policy.yaml``: rule names and
check strings. The names Glance gives its metadef operations (``add_metadef_namespace``,
``get_metadef_tags``, ...; the same names the seed's ``GlanceApiPolicies`` lock-down
overrides) are mapped here to their routes; helper rules (``metadef_admin``,
``metadef_default``, ...) may be referred to with ``rule:``. A ``routes`` key adds cached's
own method + path rules for anything else, first match deciding::

    metadef_admin: "role:admin"
    add_metadef_namespace: "rule:metadef_admin"
    routes:
      - {method: [PUT, DELETE], path: /v2/images/*, rule: "role:admin"}

Check strings (a subset of oslo.policy's): ``""`` or ``@`` (anyone), ``!`` (nobody),
``role:admin`` / ``is_admin:True`` (an admin, decided as for the management API:
cached/manage/access.py's guard), ``rule:NAME``, combined with ``and``, ``or``, ``not`` and
parentheses. Other roles cannot be decided here (cached learns only whether a caller is
admin); they are refused at load with a message. Operations without a rule pass to the
upstream, which applies its own policy.

Paths are matched as the upstream will route them: percent-decoded (aiohttp), dot segments
removed, repeated and trailing slashes dropped, any ``/v2.N`` prefix read as ``/v2``.

A denied request gets Glance's 403 (``You are not authorized to complete <rule> action.``,
JSON when the client accepts it, webob's plain text otherwise) and is not forwarded.

State: a :class:`Policy` is read-only once built. :class:`ActivePolicy` holds the one in
force (or none); only the event loop replaces it, at start-up and when a reload (SIGHUP)
read a new file that validated (cached/app.py's reload section).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from cached.config import read_yaml
from cached.edge import replies
from cached.edge import routes as routing
from cached.errors import ConfigError

# Glance 33's metadef routes (glance/api/v2/router.py) and the policy each enforces
# (glance/policies/metadef.py). Bulk deletes of a namespace's objects, properties and tags are
# checked as delete_metadef_namespace by Glance (and delete_metadef_tags for tags).
_NS = "/v2/metadefs/namespaces/{}"
METADEF_ROUTES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("GET", "/v2/metadefs/namespaces", ("get_metadef_namespaces",)),
    ("POST", "/v2/metadefs/namespaces", ("add_metadef_namespace",)),
    ("GET", _NS, ("get_metadef_namespace",)),
    ("PUT", _NS, ("modify_metadef_namespace",)),
    ("DELETE", _NS, ("delete_metadef_namespace",)),
    ("GET", _NS + "/objects", ("get_metadef_objects",)),
    ("POST", _NS + "/objects", ("add_metadef_object",)),
    ("DELETE", _NS + "/objects", ("delete_metadef_namespace",)),
    ("GET", _NS + "/objects/{}", ("get_metadef_object",)),
    ("PUT", _NS + "/objects/{}", ("modify_metadef_object",)),
    ("DELETE", _NS + "/objects/{}", ("delete_metadef_object",)),
    ("GET", _NS + "/properties", ("get_metadef_properties",)),
    ("POST", _NS + "/properties", ("add_metadef_property",)),
    ("DELETE", _NS + "/properties", ("delete_metadef_namespace",)),
    ("GET", _NS + "/properties/{}", ("get_metadef_property",)),
    ("PUT", _NS + "/properties/{}", ("modify_metadef_property",)),
    ("DELETE", _NS + "/properties/{}", ("remove_metadef_property",)),
    ("GET", _NS + "/tags", ("get_metadef_tags",)),
    ("POST", _NS + "/tags", ("add_metadef_tags",)),
    ("DELETE", _NS + "/tags", ("delete_metadef_namespace", "delete_metadef_tags")),
    ("GET", _NS + "/tags/{}", ("get_metadef_tag",)),
    ("POST", _NS + "/tags/{}", ("add_metadef_tag",)),
    ("PUT", _NS + "/tags/{}", ("modify_metadef_tag",)),
    ("DELETE", _NS + "/tags/{}", ("delete_metadef_tag",)),
    ("GET", "/v2/metadefs/resource_types", ("list_metadef_resource_types",)),
    ("GET", _NS + "/resource_types", ("get_metadef_resource_type",)),
    ("POST", _NS + "/resource_types", ("add_metadef_resource_type_association",)),
    ("DELETE", _NS + "/resource_types/{}", ("remove_metadef_resource_type_association",)),
)
OPERATIONS = frozenset(name for _, _, names in METADEF_ROUTES for name in names)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_VERSION = re.compile(r"^v2(?:\.\d+)?$")
_TOKEN = re.compile(r"\s*(\(|\)|[^\s()]+)")

Decide = Callable[[web.Request], Awaitable[bool]]


def normalise(path: str) -> list[str]:
    """The segments of ``path`` as the upstream routes it (see the module docstring)."""
    out = routing.segments(path)
    if out and _VERSION.match(out[0]):
        out[0] = "v2"
    return out


def _segments(pattern: str) -> list[str]:
    return [s for s in pattern.split("/") if s]


def _match(pattern: list[str], path: list[str]) -> bool:
    """``*`` or ``{}`` match one segment, a final ``**`` any rest (also none)."""
    for i, want in enumerate(pattern):
        if want == "**":
            return True
        if i >= len(path) or (want not in ("*", "{}") and want != path[i]):
            return False
    return len(pattern) == len(path)


# ----------------------------------------------------------------------- check strings
@dataclass(frozen=True)
class _Check:
    kind: str  # "allow" | "deny" | "admin" | "rule" | "and" | "or" | "not"
    args: tuple[Any, ...] = ()


def parse_check(text: str, where: str) -> _Check:
    """Parse an oslo.policy check string (the subset in the module docstring).

    Raises:
        ConfigError: naming ``where`` (the rule) and the part not understood.
    """
    tokens = _TOKEN.findall(text)
    pos = 0

    def fail(message: str) -> ConfigError:
        return ConfigError(f"policy rule {where!r}: {message} in {text!r}")

    def expr() -> _Check:
        nonlocal pos
        terms = [conj()]
        while pos < len(tokens) and tokens[pos].lower() == "or":
            pos += 1
            terms.append(conj())
        return terms[0] if len(terms) == 1 else _Check("or", tuple(terms))

    def conj() -> _Check:
        nonlocal pos
        terms = [unary()]
        while pos < len(tokens) and tokens[pos].lower() == "and":
            pos += 1
            terms.append(unary())
        return terms[0] if len(terms) == 1 else _Check("and", tuple(terms))

    def unary() -> _Check:
        nonlocal pos
        if pos >= len(tokens):
            raise fail("a check is missing")
        token = tokens[pos]
        pos += 1
        if token.lower() == "not":
            return _Check("not", (unary(),))
        if token == "(":
            inner = expr()
            if pos >= len(tokens) or tokens[pos] != ")":
                raise fail("')' is missing")
            pos += 1
            return inner
        if token == "@":
            return _Check("allow")
        if token == "!":
            return _Check("deny")
        kind, sep, value = token.partition(":")
        if sep and kind == "rule" and value:
            return _Check("rule", (value,))
        if sep and (kind, value.lower()) in (("role", "admin"), ("is_admin", "true")):
            return _Check("admin")
        raise fail(
            f"{token!r} cannot be decided by cached (it knows only whether a caller is "
            "admin: use @, !, role:admin, is_admin:True, rule:NAME, and, or, not)"
        )

    if not tokens:
        return _Check("allow")
    check = expr()
    if pos != len(tokens):
        raise fail(f"unexpected {tokens[pos]!r}")
    return check


@dataclass(frozen=True)
class RouteRule:
    """One of the file's ``routes``: methods (empty: any), a path pattern, a check."""

    methods: frozenset[str]
    pattern: list[str]
    name: str
    check: _Check


class Policy:
    """The rules of one policy file."""

    def __init__(self, rules: Mapping[str, _Check], routes: list[RouteRule]) -> None:
        self.rules = dict(rules)
        self.routes = routes
        self._metadef = [(m, _segments(p), names) for m, p, names in METADEF_ROUTES]

    def rules_for(self, method: str, path: str) -> list[tuple[str, _Check]]:
        """The named checks a request must pass (all of them); empty: not this policy's."""
        method = "GET" if method == "HEAD" else method
        segments = normalise(path)
        if segments[:2] == ["v2", "metadefs"]:
            for want, pattern, names in self._metadef:
                if want == method and _match(pattern, segments):
                    return [(n, self.rules[n]) for n in names if n in self.rules]
        for rule in self.routes:
            if (not rule.methods or method in rule.methods) and _match(rule.pattern, segments):
                return [(rule.name, rule.check)]
        return []

    async def _holds(self, check: _Check, is_admin: Decide, request: web.Request) -> bool:
        kind = check.kind
        if kind == "allow":
            return True
        if kind == "deny":
            return False
        if kind == "admin":
            return await is_admin(request)
        if kind == "rule":
            return await self._holds(self.rules[check.args[0]], is_admin, request)
        if kind == "not":
            return not await self._holds(check.args[0], is_admin, request)
        results = [await self._holds(c, is_admin, request) for c in check.args]
        return all(results) if kind == "and" else any(results)

    async def denied(self, request: web.Request, is_admin: Decide, path: str) -> str | None:
        """The name of the first rule ``request`` fails, or None if it may pass; ``path`` is
        the request's as the upstream routes it (cached/edge/routes.py)."""
        for name, check in self.rules_for(request.method, path):
            if not await self._holds(check, is_admin, request):
                return name
        return None


class ActivePolicy:
    """The policy in force, or None (every request passes to the upstream's own policy).

    Replaced whole, on the event loop only: a request sees either the old or the new rules.
    """

    def __init__(self, policy: Policy | None = None, source: str = "") -> None:
        self.policy = policy
        self.source = source

    def replace(self, policy: Policy | None, source: str) -> None:
        self.policy, self.source = policy, source

    def describe(self) -> str:
        if self.policy is None:
            return "no request policy: requests pass to the upstream's own policy"
        return (
            f"request policy {self.source}: {len(self.policy.rules)} rules, "
            f"{len(self.policy.routes)} routes"
        )


def _check_references(rules: Mapping[str, _Check], source: str) -> None:
    def refs(check: _Check) -> list[str]:
        if check.kind == "rule":
            return [check.args[0]]
        return [r for c in check.args if isinstance(c, _Check) for r in refs(c)]

    def visit(name: str, seen: tuple[str, ...]) -> None:
        if name in seen:
            raise ConfigError(f"{source}: policy rule {name!r} refers to itself")
        for ref in refs(rules[name]):
            if ref not in rules:
                raise ConfigError(f"{source}: policy rule {name!r}: no rule {ref!r}")
            visit(ref, (*seen, name))

    for name in rules:
        visit(name, ())


def _route(index: int, raw: Any, source: str) -> RouteRule:
    where = f"{source}: routes[{index}]"
    if not isinstance(raw, dict) or set(raw) - {"method", "path", "rule"} or "path" not in raw:
        raise ConfigError(f"{where}: must be {{method: ..., path: /v2/..., rule: ...}}")
    methods = raw.get("method", "*")
    listed = [methods] if isinstance(methods, str) else methods
    if not isinstance(listed, list) or not all(isinstance(m, str) for m in listed):
        raise ConfigError(f"{where}: method must be a method name or a list of them")
    names = {m.upper() for m in listed}
    if names - _METHODS - {"*"}:
        raise ConfigError(f"{where}: unknown method {sorted(names - _METHODS - {'*'})[0]!r}")
    path = raw["path"]
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"{where}: path must start with '/', got {path!r}")
    rule = raw.get("rule", "")
    if not isinstance(rule, str):
        raise ConfigError(f"{where}: rule must be a check string")
    name = f"{'|'.join(sorted(names))} {path}"
    pattern = normalise(path)
    if "**" in pattern[:-1]:
        raise ConfigError(f"{where}: '**' only at the end of a path")
    return RouteRule(
        frozenset() if "*" in names else frozenset(names), pattern, name, parse_check(rule, name)
    )


def parse(document: Any, source: str) -> Policy:
    """Validate a loaded policy document.

    Raises:
        ConfigError: naming the file and the rule.
    """
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: a policy file is a mapping of rule: check string")
    raw_routes = document.get("routes", [])
    if not isinstance(raw_routes, list):
        raise ConfigError(f"{source}: routes must be a list")
    rules: dict[str, _Check] = {}
    for name, text in document.items():
        if name == "routes":
            continue
        if not isinstance(name, str) or not isinstance(text, str):
            raise ConfigError(f"{source}: policy rule {name!r} must map to a check string")
        rules[name] = parse_check(text, name)
    _check_references(rules, source)
    referenced = set()
    for check in rules.values():
        stack = [check]
        while stack:
            c = stack.pop()
            if c.kind == "rule":
                referenced.add(c.args[0])
            stack.extend(a for a in c.args if isinstance(a, _Check))
    routes = [_route(i, r, source) for i, r in enumerate(raw_routes)]
    for route in routes:
        stack = [route.check]
        while stack:
            c = stack.pop()
            if c.kind == "rule":
                if c.args[0] not in rules:
                    raise ConfigError(f"{source}: {route.name}: no rule {c.args[0]!r}")
                referenced.add(c.args[0])
            stack.extend(a for a in c.args if isinstance(a, _Check))
    unused = sorted(set(rules) - OPERATIONS - referenced)
    if unused:
        raise ConfigError(
            f"{source}: policy rule {unused[0]!r} is not an operation cached enforces "
            "(the metadef operations) nor referred to by one; use routes for other requests"
        )
    return Policy(rules, routes)


def load(path: str | Path) -> Policy:
    """Read and validate the policy file (blocking: call from a thread at start-up)."""
    return parse(read_yaml(path), str(path))


def forbidden(request: web.Request, rule: str) -> web.Response:
    """Glance's 403 for a policy refusal, in the shape the client's ``Accept`` asks for."""
    return replies.error(request, 403, f"You are not authorized to complete {rule} action.")


__all__ = [
    "METADEF_ROUTES",
    "OPERATIONS",
    "ActivePolicy",
    "Policy",
    "forbidden",
    "load",
    "normalise",
    "parse",
]

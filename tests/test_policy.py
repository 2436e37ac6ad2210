"""The request policy at the proxy (cached/edge/policy.py): the shipped metadef lock-down in front
of the fake Glance (path variants included), cached's own method + path rules, and the
errors a bad policy file gets."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import auth, start_daemon, stop_daemon
from daemonproc import CachedProcess, run_cached
from fakeglance import FakeGlance

from cached.edge import policy
from cached.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
LOCKDOWN = REPO / "conf" / "policy-metadef-lockdown.yaml"
ADMIN_DIGEST = "sha256:" + hashlib.sha256(b"token-admin").hexdigest()


def test_the_lockdown_names_every_metadef_operation() -> None:
    lockdown = policy.load(LOCKDOWN)
    assert policy.OPERATIONS <= set(lockdown.rules)
    writes = {n for n in policy.OPERATIONS if not n.startswith(("get_", "list_"))}
    for name in policy.OPERATIONS:
        assert lockdown.rules[name] == policy.parse_check(
            "rule:metadef_admin" if name in writes else "rule:metadef_default", name
        )


@pytest.mark.parametrize(
    ("path", "segments"),
    [
        ("/v2/metadefs/namespaces", ["v2", "metadefs", "namespaces"]),
        ("/v2.1/metadefs/namespaces/", ["v2", "metadefs", "namespaces"]),
        ("/v2.16/./metadefs//namespaces", ["v2", "metadefs", "namespaces"]),
        ("/v2/images/../metadefs/namespaces", ["v2", "metadefs", "namespaces"]),
        ("/v3/metadefs/namespaces", ["v3", "metadefs", "namespaces"]),
    ],
)
def test_paths_are_read_as_the_upstream_routes_them(path: str, segments: list[str]) -> None:
    assert policy.normalise(path) == segments


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"add_metadef_namespace": "role:member"}, "'role:member' cannot be decided"),
        ({"add_metadef_namespace": "rule:nope"}, "no rule 'nope'"),
        ({"a": "rule:b", "b": "rule:a", "add_metadef_tag": "rule:a"}, "refers to itself"),
        ({"get_image": "role:admin"}, "'get_image' is not an operation cached enforces"),
        ({"add_metadef_tag": "role:admin or"}, "a check is missing"),
        ({"add_metadef_tag": "(role:admin"}, "')' is missing"),
        ({"add_metadef_tag": 5}, "must map to a check string"),
        ({"routes": [{"path": "v2/images"}]}, "path must start with '/'"),
        ({"routes": [{"method": "FETCH", "path": "/v2"}]}, "unknown method 'FETCH'"),
        ({"routes": [{"path": "/v2/**/file"}]}, "'**' only at the end"),
        ({"routes": [{"path": "/v2", "rule": "rule:x"}]}, "no rule 'x'"),
        ({"routes": "all"}, "routes must be a list"),
        (["a"], "a policy file is a mapping"),
    ],
)
def test_bad_policies_are_refused_with_the_rule_named(document: object, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        policy.parse(document, "p.yaml")


def test_check_config_refuses_a_bad_policy_file(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text("add_metadef_namespace: 'role:member'\n")
    res = run_cached(
        "check-config", "--upstream", "http://glance:9292", "-c", str(_conf(tmp_path, bad))
    )
    assert res.returncode == 2
    assert res.stderr.startswith(
        "cached: configuration error: policy rule 'add_metadef_namespace': 'role:member' cannot"
    )


def _conf(tmp_path: Path, policy_file: Path) -> Path:
    conf = tmp_path / "cached.yaml"
    conf.write_text(f"policy: {policy_file}\n")
    return conf


def seen(glance: FakeGlance, method: str, tail: str) -> bool:
    return any(r.method == method and r.path.endswith(tail) for r in glance.requests)


@pytest.mark.parametrize(
    "path",
    [
        "/v2/metadefs/namespaces",
        "/v2.1/metadefs/namespaces",
        "/v2/./metadefs//namespaces",
        "/v2/%6Detadefs/namespaces",
    ],
)
async def test_lockdown_refuses_a_members_namespace_at_the_proxy(
    glance: FakeGlance, tmp_path: Path, path: str
) -> None:
    d = await start_daemon(tmp_path, glance.url, admin_tokens=[ADMIN_DIGEST], policy=str(LOCKDOWN))
    try:
        body = json.dumps({"namespace": "flood"})
        async with d.session.post(
            d.url + path, data=body, headers={**auth("token-p1"), "Accept": "application/json"}
        ) as resp:
            assert resp.status == 403
            assert await resp.json() == {
                "message": "You are not authorized to complete add_metadef_namespace action."
                "<br /><br />\n\n\n",
                "code": "403 Forbidden",
                "title": "Forbidden",
            }
        assert not seen(glance, "POST", "namespaces") and not seen(glance, "POST", "namespaces/")
        # no Accept: webob's plain text (aiohttp's */* would get its HTML page, as from Glance)
        async with d.session.post(
            d.url + path, data=body, headers=auth("token-p1"), skip_auto_headers=("Accept",)
        ) as resp:
            assert resp.status == 403 and resp.content_type == "text/plain"
            assert (await resp.text()).startswith("403 Forbidden\n\nYou are not authorized")
        assert glance.requests == []
    finally:
        await stop_daemon(d)


VND_V2 = "application/vnd.openstack.images-v2"


@pytest.mark.parametrize("version", ["v2", "v2.1", "v2.17"])
async def test_lockdown_refuses_a_namespace_routed_by_the_media_type(
    glance: FakeGlance, tmp_path: Path, version: str
) -> None:
    """Issue 13, item 1: Glance routes ``POST /metadefs/namespaces`` with a versioned
    media type as ``POST /v2/metadefs/namespaces``; cached judges it so."""
    d = await start_daemon(tmp_path, glance.url, admin_tokens=[ADMIN_DIGEST], policy=str(LOCKDOWN))
    try:
        body = json.dumps({"namespace": "flood"})
        accept = f"application/vnd.openstack.images-{version}"
        for path in ("/metadefs/namespaces", "//metadefs/./namespaces"):
            async with d.session.post(
                d.url + path, data=body, headers={**auth("token-p1"), "Accept": accept}
            ) as resp:
                assert resp.status == 403
                assert "add_metadef_namespace" in await resp.text()
        assert glance.requests == []
    finally:
        await stop_daemon(d)


@pytest.mark.parametrize(
    "accept",
    [
        "application/vnd.openstack.images-v2;q=1",
        "application/vnd.openstack.images-v2, */*",
        "APPLICATION/vnd.openstack.images-v2",
        "application/vnd.openstack.images-V2",
    ],
)
async def test_a_media_type_cached_cannot_read_exactly_is_refused(
    glance: FakeGlance, tmp_path: Path, accept: str
) -> None:
    d = await start_daemon(tmp_path, glance.url, admin_tokens=[ADMIN_DIGEST], policy=str(LOCKDOWN))
    try:
        async with d.session.post(
            d.url + "/metadefs/namespaces",
            data=b"{}",
            headers={**auth("token-p1"), "Accept": accept},
        ) as resp:
            assert resp.status == 400
            assert "does not route" in await resp.text()
        assert glance.requests == []
    finally:
        await stop_daemon(d)


async def test_a_trailing_slash_is_left_to_the_upstream(glance: FakeGlance, tmp_path: Path) -> None:
    """Glance 33 routes no path ending in '/' (404): cached judges none either."""
    d = await start_daemon(tmp_path, glance.url, admin_tokens=[ADMIN_DIGEST], policy=str(LOCKDOWN))
    try:
        async with d.session.post(
            d.url + "/v2/metadefs/namespaces/", data=b"{}", headers=auth("token-p1")
        ) as resp:
            assert resp.status == 404
        assert seen(glance, "POST", "namespaces/")
    finally:
        await stop_daemon(d)


async def test_lockdown_passes_reads_and_admins(glance: FakeGlance, tmp_path: Path) -> None:
    d = await start_daemon(tmp_path, glance.url, admin_tokens=[ADMIN_DIGEST], policy=str(LOCKDOWN))
    try:
        url = d.url + "/v2/metadefs/namespaces"
        async with d.session.get(url, headers=auth("token-p1")) as resp:
            assert resp.status == 404  # passed on: the fake Glance has no metadef API
        assert seen(glance, "GET", "/v2/metadefs/namespaces")
        async with d.session.post(url, json={"namespace": "x"}, headers=auth("token-admin")):
            pass
        assert seen(glance, "POST", "/v2/metadefs/namespaces")
        for method, tail in (
            ("DELETE", "/OS::Compute::Hypervisor/tags"),
            ("PUT", "/OS::Compute::Hypervisor/properties/cpu"),
            ("POST", "/OS::Compute::Hypervisor/resource_types"),
        ):
            async with d.session.request(method, url + tail, headers=auth("token-p1")) as resp:
                assert resp.status == 403, (method, tail)
        assert not seen(glance, "DELETE", "/tags") and not seen(glance, "PUT", "/cpu")
    finally:
        await stop_daemon(d)


async def test_route_rules_for_anything_else(glance: FakeGlance, tmp_path: Path) -> None:
    rules = tmp_path / "policy.yaml"
    rules.write_text(
        "routes:\n"
        "  - {method: [GET, HEAD], path: /v2/**, rule: '@'}\n"
        "  - {method: POST, path: /v2/images, rule: '@'}\n"
        "  - {method: '*', path: /v2/**, rule: 'role:admin'}\n"
    )
    d = await start_daemon(tmp_path, glance.url, admin_tokens=[ADMIN_DIGEST], policy=str(rules))
    try:
        image = glance.add_image(b"x" * 1000)
        status, _, body = await d.get(image.id)  # reads pass, also image data
        assert (status, body) == (200, b"x" * 1000)
        async with d.session.post(f"{d.url}/v2/images", json={}, headers=auth()) as resp:
            assert resp.status == 201  # a snapshot upload starts with a create
        async with d.session.delete(f"{d.url}/v2.2/images/{image.id}", headers=auth()) as resp:
            assert resp.status == 403
            assert "complete * /v2/** action" in await resp.text()
        assert image.id in glance.images  # never reached the upstream
        async with d.session.delete(
            f"{d.url}/v2/images/{image.id}", headers=auth("token-admin")
        ) as resp:
            assert resp.status == 204
        assert image.id not in glance.images
    finally:
        await stop_daemon(d)


# ------------------------------------------------------------------ reload (SIGHUP)
class Reloads:
    """A real ``cached serve`` with a configuration file, reloaded by SIGHUP."""

    def __init__(self, proc: CachedProcess, conf: Path) -> None:
        self.proc, self.conf, self.done = proc, conf, 0

    async def reload(self) -> str:
        """SIGHUP; wait until the daemon logged the end of this reload; return that line."""
        self.proc.signal(signal.SIGHUP)
        self.done += 1
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            lines = [
                line
                for line in (await asyncio.to_thread(self.proc.output)).splitlines()
                if "reloaded:" in line or "reload refused" in line
            ]
            if len(lines) >= self.done:
                return lines[self.done - 1]
            await asyncio.sleep(0.02)
        raise AssertionError(f"reload {self.done} never ended:\n{self.proc.output()}")


async def status_of(method: str, url: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, json={"namespace": "x"}, headers=auth()) as resp,
    ):
        return resp.status


async def test_a_reload_reads_the_policy_again(glance: FakeGlance, tmp_path: Path) -> None:
    rules, conf = tmp_path / "policy.yaml", tmp_path / "cached.yaml"
    conf.write_text("log_level: INFO\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    proc = CachedProcess(glance.url, cache, tmp_path / "cached.log", "-c", str(conf))
    image = glance.add_image(b"x" * 100)
    try:
        url = await asyncio.to_thread(proc.start)
        daemon = Reloads(proc, conf)
        namespaces, image_url = f"{url}/v2/metadefs/namespaces", f"{url}/v2/images/{image.id}"
        assert await status_of("POST", namespaces) == 404  # no policy: the upstream answers

        # A policy file where there was none: in force at once.
        rules.write_text("add_metadef_namespace: '!'\n")
        conf.write_text(f"log_level: INFO\npolicy: {rules}\n")
        assert "applied policy" in await daemon.reload()
        assert f"reload: request policy {rules}: 1 rules, 0 routes" in proc.output()
        assert await status_of("POST", namespaces) == 403

        # A bad file (a role cached cannot decide; not YAML; a rule that names no rule) is
        # refused with one line, and the rules in force stay.
        for text, why in (
            ("add_metadef_namespace: 'role:member'\n", "'role:member' cannot be decided"),
            ("add_metadef_namespace: [\n", str(rules)),
            ("add_metadef_namespace: 'rule:nope'\n", "no rule 'nope'"),
        ):
            rules.write_text(text)
            line = await daemon.reload()
            assert "reload refused, still running on the previous configuration" in line
            assert why in line
            assert await status_of("POST", namespaces) == 403
        assert "Traceback" not in proc.output()

        # A good change of the same file: the new rules, and only they, apply at once.
        rules.write_text("routes:\n  - {method: DELETE, path: /v2/images/*, rule: '!'}\n")
        assert "reloaded: nothing to change" in await daemon.reload()
        assert await status_of("POST", namespaces) == 404
        assert await status_of("DELETE", image_url) == 403
        assert image.id in glance.images

        # No policy any more: requests pass to the upstream's own policy.
        conf.write_text("log_level: INFO\n")
        assert "applied policy" in await daemon.reload()
        assert "reload: no request policy" in proc.output()
        assert await status_of("DELETE", image_url) == 204
        assert image.id not in glance.images
    finally:
        assert await asyncio.to_thread(proc.stop) == 0

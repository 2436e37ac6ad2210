"""Issue 16, item 4: what compute nodes send. Nova sends the user's token and, for long
operations, its own service token (``X-Service-Token``); Glance (keystonemiddleware with
``service_token_roles_required``) then accepts a user token that expired meanwhile. Through
cached, hit and miss, the answer must be the one Glance gives directly.

Its own Keystone 30 (tokens valid ``EXPIRATION`` seconds, so that a user token expires within
the test; the tests wait for Keystone to call it expired) and its own keystone-flavored Glance
33, one each for the module; cached in front authenticates with an application credential.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import realglance
import realkeystone
from realglance import CachedDaemon, FailureLogs
from realkeystone import (
    KeystoneGlance,
    KeystoneServer,
    User,
    create_image,
    file_url,
    http,
    wait_for,
)

pytestmark = [pytest.mark.keystone, pytest.mark.glance, pytest.mark.timeout(600)]

EXPIRATION = 40  # seconds a token of this module's Keystone is valid
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def failure_logs(request: pytest.FixtureRequest) -> Iterator[FailureLogs]:
    plugin = FailureLogs()
    request.config.pluginmanager.register(plugin, "realkeystone-expiry-failure-logs")
    yield plugin
    request.config.pluginmanager.unregister(plugin)


@pytest.fixture(scope="module")
def venvs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    logs = tmp_path_factory.mktemp("venvs")
    try:
        keystone = realkeystone.ensure_venv(realkeystone.default_venv(), logs / "keystone.log")
        glance = realglance.ensure_venv(realglance.default_venv(), logs / "glance.log")
    except (realkeystone.VenvUnavailable, realglance.VenvUnavailable) as exc:
        if os.environ.get("CACHED_KEYSTONE_REQUIRED"):  # CI: never skip silently
            raise
        pytest.skip(str(exc))
    return keystone, glance


@pytest.fixture(scope="module")
def keystone(
    venvs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, failure_logs: FailureLogs
) -> Iterator[KeystoneServer]:
    server = KeystoneServer(
        venvs[0], tmp_path_factory.mktemp("keystone-short"), token_expiration=EXPIRATION
    )
    failure_logs.add({f"{k} (short tokens)": p for k, p in server.log_files().items()})
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def users(keystone: KeystoneServer) -> dict[str, User]:
    p1 = keystone.create_project("p1")
    alice = keystone.create_user("alice", "alice-pw", p1)
    keystone.grant(alice.id, p1, "member")
    keystone.grant(alice.id, p1, "reader")
    service = keystone.api("GET", "/v3/projects?name=service")["projects"][0]["id"]
    nova = keystone.create_user("nova", "nova-pw", service)
    keystone.grant(nova.id, service, "service")
    keystone.grant(nova.id, service, "admin")
    cached = keystone.create_user("cached", "cached-pw", service)
    keystone.grant(cached.id, service, "admin")
    keystone.grant(cached.id, service, "service")
    return {"alice": alice, "nova": nova, "cached": cached}


@pytest.fixture(scope="module")
def glance(
    venvs: tuple[Path, Path],
    keystone: KeystoneServer,
    tmp_path_factory: pytest.TempPathFactory,
    failure_logs: FailureLogs,
) -> Iterator[KeystoneGlance]:
    server = KeystoneGlance(venvs[1], tmp_path_factory.mktemp("glance-short"), keystone)  # type: ignore[arg-type]
    failure_logs.add({f"{k} (short tokens)": p for k, p in server.log_files().items()})
    try:
        server.start(probe_token=keystone.admin_token())
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cached(
    keystone: KeystoneServer,
    users: dict[str, User],
    glance: KeystoneGlance,
    tmp_path_factory: pytest.TempPathFactory,
    failure_logs: FailureLogs,
) -> Iterator[CachedDaemon]:
    cred_id, secret = keystone.create_app_credential(users["cached"], "service", "cached-node")
    workdir = tmp_path_factory.mktemp("cached-short")
    conf = workdir / "cached.yaml"
    conf.write_text(
        json.dumps(
            {
                "keystone_authtoken": {
                    "auth_url": keystone.url,
                    "auth_type": "v3applicationcredential",
                    "application_credential_id": cred_id,
                    "application_credential_secret": secret,
                }
            }
        )
    )
    daemon = CachedDaemon(workdir, glance.url, workdir / "cache", ["-c", str(conf)])
    failure_logs.add({"cached (short tokens)": daemon.log})
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def test_expired_user_token_with_a_service_token_downloads_as_from_glance(
    keystone: KeystoneServer,
    users: dict[str, User],
    glance: KeystoneGlance,
    cached: CachedDaemon,
    tmp_path: Path,
) -> None:
    alice, nova = users["alice"], users["nova"]
    images: dict[str, bytes] = {}
    for name in ("hit", "miss"):
        data = os.urandom(MiB + 5)
        images[create_image(cached.url, keystone.token_of(alice, "p1"), name, data)] = data
    hit, miss = list(images)
    # The hit case: cached holds the image before the user's token expires.
    fresh = keystone.token_of(alice, "p1")
    assert http("GET", file_url(cached.url, hit), fresh)[::2] == (200, images[hit])
    assert wait_for((cached.cache_dir / hit).exists)

    user_token = keystone.token_of(alice, "p1")  # the token Nova got with the request
    assert wait_for(lambda: keystone.token_status(user_token) == 404, timeout=EXPIRATION + 30)

    def both() -> dict[str, str]:
        """Nova's service token: a current one with each request (tokens live 40 s here)."""
        return {"X-Service-Token": keystone.token_of(nova, "service")}

    for image_id in (hit, miss):
        direct = http("GET", file_url(glance.url, image_id), user_token, both())
        proxied = http("GET", file_url(cached.url, image_id), user_token, both())
        assert direct[::2] == (200, images[image_id])
        assert proxied[::2] == (200, images[image_id]), (image_id, proxied[1])
        # The expired user token alone: Glance's 401, and no image bytes.
        alone_direct = http("GET", file_url(glance.url, image_id), user_token)
        alone = http("GET", file_url(cached.url, image_id), user_token)
        assert alone_direct[0] == alone[0] == 401
        assert images[image_id][:64] not in alone[2]
    hit_status = http("GET", file_url(cached.url, hit), user_token, both())[1]
    assert hit_status.get("cache-status", "").startswith("cached; hit"), hit_status
    # A service token without the service role does not revive the expired user token.
    alice_now = keystone.token_of(alice, "p1")
    not_service = {"X-Service-Token": alice_now}
    assert http("GET", file_url(glance.url, hit), user_token, not_service)[0] == 401
    assert http("GET", file_url(cached.url, hit), user_token, not_service)[0] == 401

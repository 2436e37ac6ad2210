"""Issue 13 item 2 against the real worker-limited upstream: Glance 33 under uWSGI with four
worker threads. Eight clients trickle a 100-byte ``POST /v2/images`` body through cached (a
byte every 0.25 s); while they do, a cached image's hit (its authorisation probe needs a
Glance worker), a list call and an upload of a new image's data go through. Before the
bodies were buffered, the trickles held all four workers and every other caller got 502.

Run: ``python -m pytest tests/test_real_glance_shield.py -q -m glance`` (the virtualenv as
for ``tests/test_real_glance.py``).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakekeystone import FakeKeystone
from realglance import (
    CachedDaemon,
    GlanceServer,
    add_standard_tokens,
    venv_or_skip,
)
from test_shield import Trickle

pytestmark = [pytest.mark.glance, pytest.mark.timeout(300)]

WORKERS = 4


@pytest.fixture(scope="module")
def four_worker_glance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlanceServer]:
    venv = venv_or_skip(tmp_path_factory)
    with FakeKeystone().serve_in_thread() as keystone:
        add_standard_tokens(keystone)
        server = GlanceServer(venv, tmp_path_factory.mktemp("glance-4"), keystone, threads=WORKERS)
        server.start(probe_token="admin-token")
        try:
            yield server
        finally:
            server.stop()


def _http(
    method: str, url: str, body: bytes | None = None, content_type: str = "application/json"
) -> tuple[int, bytes]:
    headers = {"X-Auth-Token": "token-p1"}
    if body is not None:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _new_image(url: str, data: bytes) -> str:
    body = json.dumps({"name": "shield", "disk_format": "raw", "container_format": "bare"})
    status, answer = _http("POST", f"{url}/v2/images", body.encode())
    assert status == 201, answer
    image_id = str(json.loads(answer)["id"])
    status, answer = _http(
        "PUT", f"{url}/v2/images/{image_id}/file", data, "application/octet-stream"
    )
    assert status == 204, answer
    return image_id


def test_downloads_go_on_while_slow_bodies_trickle_at_a_real_glance(
    four_worker_glance: GlanceServer, tmp_path: Path
) -> None:
    conf = tmp_path / "cached.yaml"
    conf.write_text("upstream_read_timeout: 5\n")  # waiting for a worker: 502 after 5 s
    daemon = CachedDaemon(tmp_path, four_worker_glance.url, tmp_path / "cache", ["-c", str(conf)])
    daemon.start()
    trickles: list[Trickle] = []
    try:
        data = os.urandom(1 << 20)
        image_id = _new_image(daemon.url, data)
        assert _http("GET", f"{daemon.url}/v2/images/{image_id}/file") == (200, data)
        trickles = [Trickle(daemon.url) for _ in range(2 * WORKERS)]
        deadline = time.monotonic() + 30
        while not all(t.sent >= 3 for t in trickles):  # relayed as they came, they would
            assert time.monotonic() < deadline, "the bodies never trickled"  # hold all 4
            time.sleep(0.02)
        assert _http("GET", f"{daemon.url}/v2/images/{image_id}/file") == (200, data)
        status, _ = _http("GET", f"{daemon.url}/v2/images")
        assert status == 200
        other = os.urandom(1 << 16)
        other_id = _new_image(daemon.url, other)  # an upload goes on too
        assert _http("GET", f"{daemon.url}/v2/images/{other_id}/file") == (200, other)
        assert all(not t.cut and t.sent < t.length for t in trickles)  # still trickling
    finally:
        for trickle in trickles:
            trickle.stop()
        daemon.stop()

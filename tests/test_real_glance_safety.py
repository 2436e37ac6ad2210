"""Issue 18 against a real Glance 33 (``[image_format] require_image_format_match = false``)
behind ``cached``: what Glance's own upload inspection lets in, and the verdict cached gives
it.

- Glance's safety checks are fatal on upload even with the format match off: a qcow2 with a
  backing file declared qcow2/bare is refused (415 ``Image failed safety checks``; the image
  stays ``queued``).
- A clean qcow2 declared raw goes in (Glance only warns): cached's verdict is ``mismatch``.
- A qcow2 with a backing file declared ``ovf`` goes in (Glance inspects only ``bare``):
  cached's verdict is ``unsafe (backing_file)``.

The images are made by ``qemu-img`` (skipped without it). Run:
``python -m pytest tests/test_real_glance_safety.py -q -m glance`` (the virtualenv as for
``tests/test_real_glance.py``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakekeystone import FakeKeystone
from realglance import (
    CachedDaemon,
    GlanceServer,
    add_standard_tokens,
    http,
    venv_or_skip,
)

pytestmark = [pytest.mark.glance, pytest.mark.timeout(300)]


def qemu_img(*args: object) -> None:
    tool = shutil.which("qemu-img")
    if tool is None:
        pytest.skip("qemu-img not installed (apt-get install qemu-utils)")
    subprocess.run([tool, *map(str, args)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def lenient_glance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlanceServer]:
    venv = venv_or_skip(tmp_path_factory)
    with FakeKeystone().serve_in_thread() as keystone:
        add_standard_tokens(keystone)
        server = GlanceServer(
            venv,
            tmp_path_factory.mktemp("glance-safety"),
            keystone,
            image_format={"require_image_format_match": "false"},
        )
        server.start(probe_token="admin-token")
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def cached(
    lenient_glance: GlanceServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CachedDaemon]:
    workdir = tmp_path_factory.mktemp("cached-safety")
    conf = workdir / "cached.yaml"
    conf.write_text("admin_listen: 127.0.0.1:0\n")  # the operator's door
    daemon = CachedDaemon(workdir, lenient_glance.url, workdir / "cache", ["-c", str(conf)])
    daemon.start()
    yield daemon
    daemon.stop()


def upload(
    url: str, data: bytes, disk_format: str, container_format: str
) -> tuple[str, int, bytes]:
    """Create an image as p1 and upload ``data``: its id, the upload's status and body."""
    body = json.dumps(
        {"name": "safety", "disk_format": disk_format, "container_format": container_format}
    ).encode()
    status, _, answer = http(
        "POST", f"{url}/v2/images", "token-p1", {"Content-Type": "application/json"}, body
    )
    assert status == 201, answer
    image_id = str(json.loads(answer)["id"])
    status, _, answer = http(
        "PUT",
        f"{url}/v2/images/{image_id}/file",
        "token-p1",
        {"Content-Type": "application/octet-stream"},
        data,
    )
    return image_id, status, answer


def image_status(url: str, image_id: str) -> str:
    status, _, answer = http("GET", f"{url}/v2/images/{image_id}", "token-p1")
    assert status == 200, answer
    return str(json.loads(answer)["status"])


def qcow2(tmp_path: Path, backing: bool) -> bytes:
    out = tmp_path / f"{'backing' if backing else 'clean'}.qcow2"
    if backing:
        qemu_img("create", "-q", "-f", "raw", tmp_path / "base.raw", "1M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", tmp_path / "base.raw", "-F", "raw", out)
    else:
        qemu_img("create", "-q", "-f", "qcow2", out, "16M")
    return out.read_bytes()


def cached_verdict(cached: CachedDaemon, image_id: str, data: bytes) -> dict[str, object]:
    """Download through cached (a miss that fills), then its verdict from the admin API."""
    status, _, body = http("GET", f"{cached.url}/v2/images/{image_id}/file", "token-p1")
    assert (status, body == data) == (200, True)
    deadline = time.monotonic() + 20
    while True:
        status, _, answer = http("GET", f"{cached.admin_url}/v2/cache/safety/{image_id}")
        if status == 200:
            row: dict[str, object] = json.loads(answer)
            return row
        assert time.monotonic() < deadline, f"{image_id} never cached: {status} {answer[:200]!r}"
        time.sleep(0.05)


def test_glance_refuses_unsafe_bare_uploads_even_without_the_format_match(
    lenient_glance: GlanceServer, tmp_path: Path
) -> None:
    data = qcow2(tmp_path, backing=True)
    image_id, status, answer = upload(lenient_glance.url, data, "qcow2", "bare")
    # Glance 33 answers InvalidImageData with 415 (image_data.py) and restores the image
    assert (status, b"Image failed safety checks" in answer) == (415, True), answer
    assert image_status(lenient_glance.url, image_id) == "queued"


def test_a_clean_qcow2_declared_raw_goes_in_and_is_a_mismatch(
    lenient_glance: GlanceServer, cached: CachedDaemon, tmp_path: Path
) -> None:
    data = qcow2(tmp_path, backing=False)
    image_id, status, _ = upload(cached.url, data, "raw", "bare")  # (through cached)
    assert status == 204
    assert image_status(lenient_glance.url, image_id) == "active"
    row = cached_verdict(cached, image_id, data)
    assert (row["verdict"], row["detected"], row["declared"], row["checks"]) == (
        "mismatch",
        "qcow2",
        "raw",
        [],
    )


def test_an_unsafe_qcow2_as_ovf_goes_in_and_is_unsafe(
    lenient_glance: GlanceServer, cached: CachedDaemon, tmp_path: Path
) -> None:
    data = qcow2(tmp_path, backing=True)
    image_id, status, _ = upload(cached.url, data, "qcow2", "ovf")
    assert status == 204  # Glance inspects bare images only
    assert image_status(lenient_glance.url, image_id) == "active"
    row = cached_verdict(cached, image_id, data)
    assert (row["verdict"], row["detected"], row["container"], row["checks"]) == (
        "unsafe",
        "qcow2",
        "ovf",
        ["backing_file"],
    )

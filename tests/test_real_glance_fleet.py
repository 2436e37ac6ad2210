"""Issue 17 against a real Glance 33: three ``cached`` members of one fleet in front of it
(keystone flavor; the fake Keystone says who is who), the real ``glance`` client downloading
through every member at once, listing where an image is cached (``cache-nodes-list``) and
deleting and deactivating it through one member.

Each member listens on a port picked before any starts, so that every member's
``fleet_members`` can name its siblings; the members check tokens with Keystone and fill for
a sibling with the service token (``keystone_authtoken``). ``fleet_lookup_timeout`` is 2 s,
as in ``tests/test_fleet.py``: a loaded test machine may answer a lookup late, and a late
answer sends a member to Glance, which the counts below would read as a failure.

Run: ``python -m pytest tests/test_real_glance_fleet.py -q -m glance`` (the virtualenv as
for ``tests/test_real_glance.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from fakekeystone import FakeKeystone
from realglance import (
    CachedDaemon,
    GlanceCLI,
    GlanceServer,
    add_standard_tokens,
    free_port,
    http,
    venv_or_skip,
)

pytestmark = [pytest.mark.glance, pytest.mark.timeout(300)]

MiB = 1 << 20
IDS = ("ctl-a", "ctl-b", "ctl-c")
PEER_LINE = re.compile(r'"(?:HEAD|GET) /cached-peer/v1/images/')


@dataclass
class Fleet:
    glance: GlanceServer
    members: dict[str, CachedDaemon]
    urls: dict[str, str]  # fleet_members' url of each member: what cache-nodes-list shows
    cli: GlanceCLI

    def peer_lines(self) -> int:
        """Peer image requests answered by all members so far."""
        return sum(len(PEER_LINE.findall(m.output())) for m in self.members.values())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    venv = venv_or_skip(tmp_path_factory)
    with FakeKeystone().serve_in_thread() as keystone:
        add_standard_tokens(keystone)
        glance = GlanceServer(venv, tmp_path_factory.mktemp("glance-fleet"), keystone)
        glance.start(probe_token="admin-token")
        work = tmp_path_factory.mktemp("fleet")
        key = work / "fleet.key"
        key.write_bytes(os.urandom(48).hex().encode())
        key.chmod(0o600)
        ports = {m: free_port() for m in IDS}
        urls = {m: f"http://127.0.0.1:{ports[m]}" for m in IDS}
        members: dict[str, CachedDaemon] = {}
        try:
            for m in IDS:
                conf = work / f"{m}.yaml"
                conf.write_text(
                    yaml.safe_dump(
                        {
                            "listen": f"127.0.0.1:{ports[m]}",  # cached-manage -c reads it
                            "fleet_self": m,
                            "fleet_members": [{"id": i, "url": urls[i]} for i in IDS],
                            "fleet_secret_file": str(key),
                            "fleet_lookup_timeout": 2.0,
                            "auth_cache_ttl": 30,
                            "keystone_authtoken": {
                                "auth_url": keystone.url + "/v3",
                                "auth_type": "admin_token",
                                "token": "admin-token",
                            },
                        }
                    )
                )
                members[m] = CachedDaemon(
                    work / m,
                    glance.url,
                    work / m / "cache",
                    ["-c", str(conf), "--listen", f"127.0.0.1:{ports[m]}"],
                )
                members[m].start()
            yield Fleet(glance, members, urls, GlanceCLI(venv, work / "glanceclient-home"))
        finally:
            for member in members.values():
                member.stop()
            glance.stop()


def wait_for(check: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(0.05)


def new_image(fleet: Fleet, tmp_path: Path, name: str, size: int) -> tuple[str, bytes]:
    """An image of ``size`` random bytes uploaded as p1 to Glance directly (nothing cached)."""
    data = os.urandom(size)
    path = tmp_path / f"{name}.img"
    path.write_bytes(data)
    return fleet.cli.create_image(fleet.glance.url, "token-p1", path, name), data


def data_gets(fleet: Fleet, image_id: str) -> list[int]:
    """Bytes Glance sent for each data GET of ``image_id``, the authorisation probes
    (``bytes=0-0``) left out."""
    return [
        r.body_bytes
        for r in fleet.glance.file_gets(image_id)
        if r.range != "bytes=0-0" and r.status in (200, 206)
    ]


def cached_ids(fleet: Fleet, member: str) -> set[str]:
    """The images ``member`` lists as cached (``GET /v2/cache``, as ``glance cache-list``
    asks it; the client itself is run once per test where it matters, it starts slowly)."""
    status, _, body = http("GET", f"{fleet.members[member].url}/v2/cache", "admin-token")
    assert status == 200, body
    return {str(i["image_id"]) for i in json.loads(body)["cached_images"]}


def test_the_members_download_an_image_that_left_glance_once(fleet: Fleet, tmp_path: Path) -> None:
    """The real client downloads a cold 24 MiB image through all three members at once: the
    same bytes everywhere, one data GET at Glance, every member holding its own copy, and
    ``glance cache-nodes-list`` through any member naming all three."""
    image_id, data = new_image(fleet, tmp_path, "fleet-cold", 24 * MiB + 123)
    procs = {
        m: fleet.cli.popen(
            fleet.members[m].url, "token-p1", "image-download", "--file",
            str(tmp_path / f"{m}.out"), image_id,
        )
        for m in IDS
    }  # fmt: skip
    for m, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (m, out, err)
        body = (tmp_path / f"{m}.out").read_bytes()
        assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest(), m
    gets = data_gets(fleet, image_id)  # one copy left Glance
    assert gets == [len(data)], (fleet.glance.file_gets(image_id), fleet.peer_lines())
    for m in IDS:  # each member verified and kept its own copy
        wait_for(lambda m=m: image_id in cached_ids(fleet, m), f"{m} lists {image_id}")
    assert image_id in fleet.cli.ok(fleet.members["ctl-c"].url, "admin-token", "cache-list")
    for m in IDS:
        out = fleet.cli.ok(fleet.members[m].url, "admin-token", "cache-nodes-list", image_id)
        assert sorted(re.findall(r"http://127\.0\.0\.1:\d+", out)) == sorted(fleet.urls.values())
    # A member's hit again: no more data from Glance (its probe authorises, no more).
    status, headers, body = http("GET", f"{fleet.members['ctl-b'].url}/v2/images/{image_id}/file",
                                 "token-p1")  # fmt: skip
    assert (status, body == data) == (200, True)
    assert "hit" in headers["cache-status"]
    assert data_gets(fleet, image_id) == [len(data)]


def test_callers_glance_refuses_cause_no_peer_request(fleet: Fleet, tmp_path: Path) -> None:
    """A reader of the image's project (Glance: 403) and another project (404) get Glance's
    answer through every member, and no member asks a sibling for the image."""
    image_id, _ = new_image(fleet, tmp_path, "fleet-refused", 2 * MiB)
    direct = {
        t: fleet.cli.run(fleet.glance.url, t, "image-download", "--file", os.devnull, image_id)
        for t in ("token-reader-p1", "token-p2")
    }
    assert all(res.returncode != 0 for res in direct.values())
    before = fleet.peer_lines()
    for m in IDS:
        url = f"{fleet.members[m].url}/v2/images/{image_id}/file"
        assert http("GET", url, "token-reader-p1")[0] == 403
        assert http("GET", url, "token-p2")[0] == 404
        for token, theirs in direct.items():
            res = fleet.cli.run(
                fleet.members[m].url, token, "image-download", "--file", os.devnull, image_id
            )
            assert res.returncode != 0
            assert res.stderr.splitlines()[-1:] == theirs.stderr.splitlines()[-1:]
    assert fleet.peer_lines() == before
    assert data_gets(fleet, image_id) == []


def _everywhere(fleet: Fleet, tmp_path: Path, name: str) -> tuple[str, bytes]:
    """A new image downloaded through every member in turn (each one then holds it)."""
    image_id, data = new_image(fleet, tmp_path, name, 4 * MiB)
    for m in IDS:
        out = tmp_path / f"{name}-{m}.out"
        fleet.cli.ok(fleet.members[m].url, "token-p1", "image-download", "--file", str(out),
                     image_id)  # fmt: skip
        assert out.read_bytes() == data
        wait_for(lambda m=m: image_id in cached_ids(fleet, m), f"{m} lists {image_id}")
    assert len(data_gets(fleet, image_id)) == 1
    return image_id, data


def test_an_image_deleted_through_one_member_leaves_every_member(
    fleet: Fleet, tmp_path: Path
) -> None:
    """``glance image-delete`` through ctl-a: Glance deletes it, every member drops its copy
    and answers 404 as Glance does."""
    image_id, _ = _everywhere(fleet, tmp_path, "fleet-delete")
    fleet.cli.ok(fleet.members["ctl-a"].url, "token-p1", "image-delete", image_id)
    assert http("GET", f"{fleet.glance.url}/v2/images/{image_id}", "token-p1")[0] == 404
    for m in IDS:
        wait_for(lambda m=m: image_id not in cached_ids(fleet, m), f"{m} forgot {image_id}")
        assert not (fleet.members[m].cache_dir / image_id).exists()
        url = f"{fleet.members[m].url}/v2/images/{image_id}/file"
        assert http("GET", url, "token-p1")[0] == 404


def test_an_image_deactivated_through_one_member_is_refused_by_every_member(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Every member has served p1 the image (its allowance cached for 30 s); an admin
    deactivates it through ctl-c: p1's next download through any member gets Glance's 403
    at once, not a hit from the allowance it had; an admin still downloads it."""
    image_id, data = _everywhere(fleet, tmp_path, "fleet-deactivate")
    fleet.cli.ok(fleet.members["ctl-c"].url, "admin-token", "image-deactivate", image_id)
    record = http("GET", f"{fleet.glance.url}/v2/images/{image_id}", "admin-token")[2]
    assert json.loads(record)["status"] == "deactivated"
    for m in IDS:
        url = f"{fleet.members[m].url}/v2/images/{image_id}/file"
        # Well within the 30 s the allowance would last if a member had not been told.
        refused = lambda url=url: http("GET", url, "token-p1")[0] == 403  # noqa: E731
        wait_for(refused, f"{m} refuses p1", within=10)
    status, _, body = http("GET", f"{fleet.members['ctl-a'].url}/v2/images/{image_id}/file",
                           "admin-token")  # fmt: skip
    assert (status, body == data) == (200, True)


def test_list_cached_all_hosts_by_image_sees_every_member(fleet: Fleet, tmp_path: Path) -> None:
    """``cached-manage list-cached --all-hosts --by-image`` (this node from ``-c``, the
    others from its ``fleet_members``) with the operator's token: the image on all three."""
    image_id, _ = _everywhere(fleet, tmp_path, "fleet-by-image")
    conf = fleet.members["ctl-a"].extra[1]
    argv = ["-m", "cached.ctl", "-c", conf, "--os-auth-token", "admin-token", "--json",
            "list-cached", "--all-hosts", "--by-image"]  # fmt: skip
    res = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    answer = json.loads(res.stdout)
    assert answer.get("errors") in (None, []), answer
    (image,) = [i for i in answer["images"] if i["image_id"] == image_id]
    assert len(image["hosts"]) == 3, image

"""The fleet's configuration (issue 17): the keys checked against each other, the key
file's size and mode, the options a fleet replaces, restart-only keys, and
``cached check-config --owner``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from daemonproc import run_cached

from cached import config as configuration
from cached.config import FleetMember
from cached.errors import ConfigError
from cached.fleet import ring
from cached.ops.lifecycle import LIVE, changed_options

MEMBERS = [
    {"id": "ctl-1", "url": "http://127.0.0.1:9001"},
    {"id": "ctl-2", "url": "http://127.0.0.1:9002"},
    {"id": "ctl-3", "url": "http://127.0.0.1:9003"},
]


def key_file(tmp_path: Path, size: int = 48, mode: int = 0o600, name: str = "fleet.key") -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size).hex()[:size].encode())
    path.chmod(mode)
    return path


def load(tmp_path: Path, **values: object) -> configuration.Config:
    path = tmp_path / "cached.yaml"
    path.write_text(yaml.safe_dump(values))
    return configuration.load(path)


def fleet(tmp_path: Path, **more: object) -> dict[str, object]:
    return {
        "fleet_self": "ctl-2",
        "fleet_members": MEMBERS,
        "fleet_secret_file": str(key_file(tmp_path)),
        **more,
    }


def test_a_fleet_loads(tmp_path: Path) -> None:
    c = load(tmp_path, **fleet(tmp_path, fleet_lookup_timeout=0.5))
    assert c.fleet and c.fleet_self == "ctl-2"
    assert c.fleet_members[0] == FleetMember("ctl-1", "http://127.0.0.1:9001")
    assert (c.fleet_lookup_timeout, c.fleet_max_peer_streams) == (0.5, 16)
    assert (c.fleet_connect_timeout, c.fleet_headers_timeout, c.fleet_stall_timeout) == (
        1.0,
        5.0,
        10.0,
    )


def test_one_member_is_no_fleet(tmp_path: Path) -> None:
    c = load(tmp_path, fleet_self="ctl-1", fleet_members=MEMBERS[:1])
    assert not c.fleet  # no key needed, behaviour unchanged
    assert not configuration.Config().fleet


@pytest.mark.parametrize(
    ("change", "key", "says"),
    [
        ({"fleet_self": "ctl-9"}, "fleet_self", "not in fleet_members"),
        ({"fleet_self": ""}, "fleet_self", "needed with fleet_members"),
        ({"fleet_secret_file": ""}, "fleet_secret_file", "needed with a fleet"),
        ({"fleet_secret_file": "/nonexistent/fleet.key"}, "fleet_secret_file", "cannot read"),
        ({"peers": ["http://127.0.0.1:9009"]}, "peers", "a fleet replaces it"),
        (
            {"worker_self_reference_url": "http://127.0.0.1:9002"},
            "worker_self_reference_url",
            "a fleet replaces it",
        ),
        (
            {"fleet_members": [*MEMBERS, {"id": "ctl-2", "url": "http://127.0.0.1:9"}]},
            "fleet_members",
            "listed twice",
        ),
        ({"fleet_listen": "nowhere"}, "fleet_listen", "HOST:PORT"),
        ({"fleet_listen": 9293}, "fleet_listen", "HOST:PORT"),
        ({"fleet_listen": "0.0.0.0:9292"}, "fleet_listen", "shares port 9292"),
        (
            {"fleet_listen": "127.0.0.1:9300", "admin_listen": "127.0.0.1:9300"},
            "fleet_listen",
            "shares port 9300",
        ),
        (
            {"fleet_listen": "127.0.0.1:9300", "fleet_members": MEMBERS[1:2]},
            "fleet_listen",
            "needs a fleet",
        ),
    ],
)
def test_bad_fleets_name_the_key(
    tmp_path: Path, change: dict[str, object], key: str, says: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, **{**fleet(tmp_path), **change})
    assert f"option {key!r}" in str(err.value) and says in str(err.value)


@pytest.mark.parametrize(
    ("size", "mode", "says"),
    [(31, 0o600, "at least 32"), (48, 0o640, "group or others"), (48, 0o604, "group or others")],
)
@pytest.mark.parametrize("key", ["fleet_secret_file", "fleet_previous_secret_file"])
def test_a_short_or_readable_key_is_refused(
    tmp_path: Path, key: str, size: int, mode: int, says: str
) -> None:
    bad = key_file(tmp_path, size, mode, name="bad.key")
    with pytest.raises(ConfigError) as err:
        load(tmp_path, **fleet(tmp_path, **{key: str(bad)}))
    assert f"option {key!r}" in str(err.value) and says in str(err.value)


def test_fleet_keys_need_a_restart(tmp_path: Path) -> None:
    old = load(tmp_path, **fleet(tmp_path))
    new = load(
        tmp_path,
        **fleet(
            tmp_path, fleet_self="ctl-3", fleet_lookup_timeout=1, fleet_listen="127.0.0.1:9300"
        ),
    )
    assert new.fleet_address == ("127.0.0.1", 9300)
    changed = changed_options(old, new)
    assert {"fleet_self", "fleet_lookup_timeout", "fleet_listen"} <= set(changed)
    assert not any(k.startswith("fleet_") for k in LIVE)  # so reload lists restart_needed


def test_check_config_prints_the_owner_and_fallback_order(tmp_path: Path) -> None:
    path = tmp_path / "cached.yaml"
    path.write_text(yaml.safe_dump(fleet(tmp_path)))
    image = "0f6e2b4c-8a51-4f0e-9d3f-2b7a1c9e5d10"
    res = run_cached("check-config", "-c", str(path), "--owner", image)
    assert res.returncode == 0, res.stderr
    expected = ring.order(["ctl-1", "ctl-2", "ctl-3"], image)
    assert res.stdout.splitlines() == [f"owner: {expected[0]}", f"order: {', '.join(expected)}"]
    bare = tmp_path / "bare.yaml"
    bare.write_text("{}\n")
    res = run_cached("check-config", "-c", str(bare), "--owner", image)
    assert res.returncode == 2 and "fleet_members" in res.stderr

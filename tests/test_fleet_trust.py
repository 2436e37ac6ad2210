"""The peer signature (cached/fleet/trust.py) and the siblings' health
(cached/fleet/peers.py ``PeerHealth``), as pure parts: fixed keys, a clock given to them."""

from __future__ import annotations

import pytest

from cached.config import FleetMember
from cached.fleet import trust
from cached.fleet.peers import PeerHealth

MEMBERS = tuple(FleetMember(i, f"http://127.0.0.1:{9000 + n}") for n, i in enumerate("abc"))
OLD, NEW = b"o" * 32, b"n" * 40
PATH = "/cached-peer/v1/images/0f6e2b4c-8a51-4f0e-9d3f-2b7a1c9e5d10"
NOW = 1_800_000_000.0


def member(self_id: str, key: bytes, previous: bytes | None = None) -> trust.Trust:
    return trust.Trust(self_id, MEMBERS, key, previous)


def test_a_signed_request_names_its_sender() -> None:
    headers = {**member("a", OLD).sign("GET", PATH, "b", "bytes=0-9", now=NOW)}
    headers["Range"] = "bytes=0-9"
    assert member("b", OLD).verify("GET", PATH, headers, now=NOW) == "a"


@pytest.mark.parametrize("skew", [-30, 30])
def test_thirty_seconds_of_skew_pass(skew: int) -> None:
    headers = member("a", OLD).sign("HEAD", PATH, "b", now=NOW + skew)
    assert member("b", OLD).verify("HEAD", PATH, headers, now=NOW) == "a"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"path": PATH + "x"}, "bad signature"),
        ({"method": "DELETE"}, "bad signature"),
        ({"range": "bytes=0-"}, "bad signature"),
        ({"skew": 31}, "off"),
        ({"skew": -31}, "off"),
        ({"drop": trust.SIGNATURE}, "not signed"),
        ({"drop": trust.TIMESTAMP}, "not signed"),
        ({"set": (trust.TIMESTAMP, "soon")}, "bad timestamp"),
        ({"set": (trust.SENDER, "c")}, "bad signature"),
        ({"set": (trust.SENDER, "z")}, "not a sibling"),
        ({"set": (trust.SENDER, "b")}, "not a sibling"),
        ({"set": (trust.TARGET, "c")}, "not for this member"),
        ({"key": b"x" * 32}, "bad signature"),
    ],
)
def test_a_request_not_signed_for_this_member_is_refused(
    change: dict[str, object], why: str
) -> None:
    key = change.get("key", OLD)
    assert isinstance(key, bytes)
    skew = change.get("skew", 0)
    assert isinstance(skew, int)
    headers = member("a", key).sign("HEAD", PATH, "b", now=NOW + skew)
    if "drop" in change:
        del headers[str(change["drop"])]
    if "set" in change:
        name, value = change["set"]  # type: ignore[misc]
        headers[name] = value
    if "range" in change:
        headers["Range"] = str(change["range"])
    method = str(change.get("method", "HEAD"))
    path = str(change.get("path", PATH))
    with pytest.raises(trust.Refused, match=why):
        member("b", OLD).verify(method, path, headers, now=NOW)


def test_a_key_change_takes_two_rolling_restarts_without_a_refusal() -> None:
    """Restart 1 accepts the new key as the previous one (everyone still signs with the old);
    restart 2 signs with the new key and still accepts the old: at no step is a request
    from a member on either side of a restart refused."""
    steps = [
        {"a": member("a", OLD), "b": member("b", OLD)},
        {"a": member("a", OLD, NEW), "b": member("b", OLD)},  # a restarted
        {"a": member("a", OLD, NEW), "b": member("b", OLD, NEW)},  # b restarted
        {"a": member("a", NEW, OLD), "b": member("b", OLD, NEW)},  # a signs with NEW
        {"a": member("a", NEW, OLD), "b": member("b", NEW, OLD)},  # b too
        {"a": member("a", NEW), "b": member("b", NEW, OLD)},  # the old key dropped
    ]
    for step in steps:
        for sender, target in (("a", "b"), ("b", "a")):
            headers = step[sender].sign("GET", PATH, target, now=NOW)
            assert step[target].verify("GET", PATH, headers, now=NOW) == sender


def test_the_list_digest_ignores_order_and_sees_changes() -> None:
    assert trust.list_digest(MEMBERS) == trust.list_digest(tuple(reversed(MEMBERS)))
    assert trust.list_digest(MEMBERS) != trust.list_digest(MEMBERS[:2])


def test_a_failed_sibling_is_down_for_one_second_doubling_to_thirty() -> None:
    now = [0.0]
    health = PeerHealth(clock=lambda: now[0])
    assert health.usable("b")
    waits = []
    for _ in range(7):
        health.failed("b", "refused")
        start = now[0]
        assert not health.usable("b") and health.down() == ["b"]
        while not health.usable("b"):
            now[0] += 0.25
        waits.append(now[0] - start)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    health.passed("b")  # the probe after the last wait passed: healthy, back-off reset
    health.failed("b", "again")
    assert not health.usable("b")
    now[0] += 1.0
    assert health.usable("b")

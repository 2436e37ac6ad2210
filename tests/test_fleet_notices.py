"""The notices a member sends its siblings (cached/fleet/notices.py) and the bounded suspect
list (cached/fleet/peers.py), in one process: a real :class:`Fleet` signing real requests
to a sibling played by a small aiohttp server that checks the signature with the
sibling's own :class:`Trust` and answers as the test programs it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from test_correctness import until
from test_ctl import dead_port

from cached.config import FleetMember
from cached.fleet import notices as fleet_notices
from cached.fleet import peers
from cached.fleet.notices import DELETE, FORGET, Notices
from cached.fleet.trust import Refused, Trust

KEY = b"k" * 48
IMAGE = "0f6e2b4c-8a51-4f0e-9d3f-2b7a1c9e5d1{}"


@dataclass
class Sibling:
    """Member ``b``: records the notices it took; answers ``statuses`` in turn (then 204);
    holds every request while ``hold`` is set."""

    statuses: list[int] = field(default_factory=list)
    got: list[tuple[str, str]] = field(default_factory=list)
    hold: asyncio.Event | None = None
    url: str = ""

    def app(self, trust: Trust) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            try:
                trust.verify(request.method, request.rel_url.raw_path, request.headers)
            except Refused:
                return web.Response(status=401)
            if self.hold is not None:
                await self.hold.wait()
            self.got.append((request.method, request.path))
            return web.Response(status=self.statuses.pop(0) if self.statuses else 204)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@pytest.fixture
async def sibling() -> AsyncIterator[tuple[Sibling, peers.Fleet]]:
    b = Sibling()
    members = (FleetMember("a", "http://unused"), FleetMember("b", "placeholder"))
    runner = web.AppRunner(b.app(Trust("b", members, KEY)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    b.url = f"http://127.0.0.1:{port}"
    members = (FleetMember("a", "http://unused"), FleetMember("b", b.url))
    timeouts = peers.Timeouts(headers=2.0)
    session = peers.Fleet.session_for(timeouts, False)
    fleet = peers.Fleet(Trust("a", members, KEY), session, timeouts)
    try:
        yield b, fleet
    finally:
        if b.hold is not None:
            b.hold.set()
        await fleet.close()
        await session.close()
        await runner.cleanup()


async def test_a_notice_is_retried_until_the_sibling_takes_it(
    sibling: tuple[Sibling, peers.Fleet],
) -> None:
    b, fleet = sibling
    b.statuses = [503, 401]  # down, then a key it does not know yet: both retried
    notices = Notices(fleet, initial=0.01, max_backoff=0.02)
    notices.tell(IMAGE.format(1), DELETE)
    assert notices.pending() == {"b": {"delete": 1}}
    await until(lambda: not notices.pending(), "delivered")
    path = f"/cached-peer/v1/images/{IMAGE.format(1)}"
    assert b.got == [("DELETE", path)] * 3
    notices.tell(IMAGE.format(2), FORGET)
    await until(lambda: not notices.pending(), "delivered")
    assert b.got[-1] == ("POST", f"/cached-peer/v1/images/{IMAGE.format(2)}/forget")
    await notices.close()


async def test_a_notice_is_given_up_after_its_time(sibling: tuple[Sibling, peers.Fleet]) -> None:
    b, fleet = sibling
    b.statuses = [503] * 1000
    notices = Notices(fleet, retry_for=0.2, initial=0.01, max_backoff=0.02)
    notices.tell(IMAGE.format(1), DELETE)
    await until(lambda: not notices.pending(), "given up")
    assert len(b.got) >= 2
    await notices.close()


async def test_pending_notices_are_bounded_and_a_delete_replaces_a_forget(
    sibling: tuple[Sibling, peers.Fleet],
) -> None:
    b, fleet = sibling
    b.hold = asyncio.Event()  # the sibling takes nothing meanwhile
    notices = Notices(fleet, max_pending=2)
    notices.tell(IMAGE.format(1), FORGET)
    notices.tell(IMAGE.format(1), DELETE)  # replaces the forget
    notices.tell(IMAGE.format(1), FORGET)  # adds nothing to the delete
    assert notices.pending() == {"b": {"delete": 1}}
    notices.tell(IMAGE.format(2), FORGET)
    notices.tell(IMAGE.format(3), FORGET)  # the third: the oldest (the delete) is dropped
    assert notices.pending() == {"b": {"forget": 2}}
    b.hold.set()
    await until(lambda: not notices.pending(), "delivered")
    assert sorted(p for _, p in b.got) == [
        f"/cached-peer/v1/images/{IMAGE.format(n)}/forget" for n in (2, 3)
    ]
    await notices.close()


async def test_the_suspect_list_is_bounded_and_expires(
    sibling: tuple[Sibling, peers.Fleet], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, fleet = sibling
    monkeypatch.setattr(peers, "SUSPECTS_MAX", 8)
    for n in range(20):
        fleet.suspect("b", f"0f6e2b4c-8a51-4f0e-9d3f-2b7a1c9e{n:04d}")
    assert fleet.suspects() == 8  # the oldest left
    monkeypatch.setattr(peers, "SUSPECT_FOR", 0.0)
    await asyncio.sleep(0.01)
    assert fleet.suspects() == 0
    await asyncio.gather(*list(fleet._tasks), return_exceptions=True)


def test_defaults_are_the_issues() -> None:
    assert fleet_notices.RETRY_FOR == 600.0
    assert (fleet_notices.RETRY_INITIAL, fleet_notices.RETRY_MAX) == (1.0, 30.0)


async def test_a_sibling_that_does_not_answer_is_retried(
    sibling: tuple[Sibling, peers.Fleet],
) -> None:
    """No answer at all (the connection refused): retried, and taken once it is back."""
    b, fleet = sibling
    dead = f"http://127.0.0.1:{dead_port()}"
    members = (FleetMember("a", "http://unused"), FleetMember("b", dead))
    away = peers.Fleet(Trust("a", members, KEY), fleet._session, fleet.timeouts)
    notices = Notices(away, initial=0.01, max_backoff=0.02)
    notices.tell(IMAGE.format(1), DELETE)
    notices.tell(IMAGE.format(2), DELETE)
    pending = notices._pending[("b", IMAGE.format(1))], notices._pending[("b", IMAGE.format(2))]
    await until(lambda: sum(p.attempts for p in pending) >= 2, "two attempts refused")
    assert notices.pending() == {"b": {"delete": 2}}  # still retrying
    away.siblings["b"] = FleetMember("b", b.url)  # back (at another address, for the test)
    await until(lambda: not notices.pending(), "delivered", within=40)
    assert sorted(b.got) == [
        ("DELETE", f"/cached-peer/v1/images/{IMAGE.format(n)}") for n in (1, 2)
    ]
    await notices.close()

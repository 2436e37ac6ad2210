"""Telling every sibling what changed about an image (issue 17).

When this member relays a change of an image to the upstream and the upstream accepts it
(cached/download/proxy.py ``Proxy.image_changed``), every sibling is told:

- the image was deleted: ``DELETE /cached-peer/v1/images/{id}``: it drops its copy (and
  queue entry, and remembered allowances), as this member dropped its own;
- anything else changed (``PATCH``, deactivation, reactivation, members):
  ``POST /cached-peer/v1/images/{id}/forget``: it forgets the authorisation answers it
  remembers for the image (cached/identity/authorizer.py), so its next download re-checks
  with the upstream; its copy stays.

A sibling that does not take the notice (no answer, a ``5xx``, a ``401`` during a key change)
is asked again, 1 s doubling to 30 s, for up to ``RETRY_FOR`` (10 minutes): a sibling that
is down for less than that and comes back (restarted on its cache directory) still drops
its copy. The notices are kept in memory only: a restart of *this* member forgets those
still pending (logged at warning when it stops). At most ``MAX_PENDING`` are pending; a new
one beyond that drops the oldest (logged, counted). A delete replaces a forget of the same
image for the same sibling; a forget adds nothing to a pending one.

A sibling answering ``404`` does not know the route (an older version): the notice is done.
A sibling that does not answer at all is *down* for every request (cached/fleet/peers.py
``PeerHealth``: 1 s doubling to 30 s): its other pending notices make no attempt meanwhile,
so a thousand pending notices to a stopped sibling cost one request per down period, not a
thousand.

Threads: the event loop only. :class:`Notices` owns ``_pending``; each notice is one task
kept there until it is done, given up, or dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp

from cached import metrics
from cached.fleet.peers import Fleet
from cached.fleet.serve import PREFIX

log = logging.getLogger("cached.fleet")

RETRY_FOR = 600.0  # seconds a notice is retried
RETRY_INITIAL = 1.0  # seconds before the first retry, doubling per failure ...
RETRY_MAX = 30.0  # ... up to this
MAX_PENDING = 10_000  # notices pending at once (per sibling and image)
DELETE, FORGET = "delete", "forget"


@dataclass
class _Notice:
    action: str
    since: float  # monotonic seconds
    task: asyncio.Task[None]
    attempts: int = 0
    last_error: str = ""


class Notices:
    """The notices this member still has to get to its siblings."""

    def __init__(
        self,
        fleet: Fleet,
        retry_for: float = RETRY_FOR,
        initial: float = RETRY_INITIAL,
        max_backoff: float = RETRY_MAX,
        max_pending: int = MAX_PENDING,
    ):
        self._fleet = fleet
        self._retry_for = retry_for
        self._initial = initial
        self._max_backoff = max_backoff
        self._max_pending = max_pending
        self._pending: dict[tuple[str, str], _Notice] = {}  # (sibling, image) -> notice

    def tell(self, image_id: str, action: str) -> None:
        """Tell every sibling that ``image_id`` was deleted (``delete``) or changed
        (``forget``); returns at once, the notices go on in the background."""
        for member_id in sorted(self._fleet.siblings):
            key = (member_id, image_id)
            pending = self._pending.get(key)
            if pending is not None:
                if pending.action == DELETE or action == FORGET:
                    continue  # what is pending does as much
                self._end(key, pending, "replaced")  # a forget, replaced by the delete
            if len(self._pending) >= self._max_pending:
                oldest = next(iter(self._pending))
                log.warning(
                    "more than %d notices pending: the %s of %s for %s is dropped",
                    self._max_pending,
                    self._pending[oldest].action,
                    oldest[1],
                    oldest[0],
                )
                self._end(oldest, self._pending[oldest], "dropped")
            task = asyncio.get_running_loop().create_task(self._deliver(member_id, image_id))
            self._pending[key] = _Notice(action, time.monotonic(), task)
            metrics.fleet_notice_pending(action, +1)

    def _end(self, key: tuple[str, str], notice: _Notice, result: str) -> None:
        if self._pending.get(key) is notice:
            del self._pending[key]
            metrics.fleet_notice_pending(notice.action, -1)
            if result != "replaced":
                metrics.fleet_notice(notice.action, result)
        if not notice.task.done() and asyncio.current_task() is not notice.task:
            notice.task.cancel()

    async def _deliver(self, member_id: str, image_id: str) -> None:
        key = (member_id, image_id)
        await asyncio.sleep(0)  # registered in _pending first
        backoff = self._initial
        health = self._fleet.health
        while (notice := self._pending.get(key)) is not None:
            delete = notice.action == DELETE
            path = f"{PREFIX}/images/{image_id}" + ("" if delete else "/forget")
            if not health.usable(member_id):
                # Down (it did not answer this or another request): no attempt until its
                # down time passed; then one request is the probe (cached/fleet/peers.py).
                status = None
            else:
                notice.attempts += 1
                try:
                    status = await self._fleet.signed(
                        "DELETE" if delete else "POST", member_id, path
                    )
                except (TimeoutError, aiohttp.ClientError) as exc:
                    notice.last_error = repr(exc)
                    health.failed(member_id, f"{notice.action} {image_id}: {exc!r}")
                    status = None
            if status is not None:
                if status < 300 or status == 404:
                    if status == 404:
                        log.warning("sibling %s does not take %s notices", member_id, notice.action)
                    log.info("sibling %s told: %s %s", member_id, notice.action, image_id)
                    self._end(key, notice, "done")
                    return
                notice.last_error = f"answered {status}"
            if time.monotonic() - notice.since + backoff > self._retry_for:
                log.warning(
                    "sibling %s never took the %s of %s (%d attempts over %.0fs; last: %s): "
                    "given up",
                    member_id,
                    notice.action,
                    image_id,
                    notice.attempts,
                    time.monotonic() - notice.since,
                    notice.last_error,
                )
                self._end(key, notice, "given-up")
                return
            log.info(
                "sibling %s did not take the %s of %s (%s): again in %.0fs",
                member_id,
                notice.action,
                image_id,
                notice.last_error,
                backoff,
            )
            metrics.fleet_notice(notice.action, "retried")
            await asyncio.sleep(backoff)
            backoff = min(self._max_backoff, backoff * 2)

    def pending(self) -> dict[str, dict[str, int]]:
        """Pending notices per sibling, by action (for the member's state)."""
        counts: dict[str, dict[str, int]] = {}
        for (member_id, _), notice in self._pending.items():
            per = counts.setdefault(member_id, {})
            per[notice.action] = per.get(notice.action, 0) + 1
        return counts

    async def close(self) -> None:
        if self._pending:
            log.warning(
                "stopping with %d notices to siblings undelivered (deletes and forgets of "
                "images; they are kept in memory only)",
                len(self._pending),
            )
        tasks = [n.task for n in self._pending.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pending.clear()

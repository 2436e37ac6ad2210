"""Download authorisation: the upstream decides, with the caller's own credentials.

A positive answer may be reused for ``ttl`` seconds per (credentials, image), but every
change to the image that passes through the proxy forgets the answers for that image, at
once: an answer whose probe began before the latest change of its image is never stored
(a per-image change counter), so a probe in flight cannot bring a forgotten answer back.
Negative answers are never reused: the caller gets the upstream's answer every time.

Owned by the event loop (``check`` and ``forget`` run there).
"""

from __future__ import annotations

import time

from cached import metrics
from cached.upstream import Authorization, Backend, Credentials, Decision

_MAX_REMEMBERED = 100_000


class Authorizer:
    def __init__(self, backend: Backend, ttl: float):
        self._backend = backend
        self._ttl = ttl
        self._allowed: dict[tuple[str, str], tuple[float, Authorization]] = {}
        self._changes = 0  # how many changes were seen, in all
        self._changed_at: dict[str, int] = {}  # image id -> number of its latest change
        self._cleared_at = 0  # number of the change at which _changed_at was last cleared
        self.probes = 0

    async def check(self, image_id: str, creds: Credentials) -> Authorization:
        key = (creds.key(), image_id)
        remembered = self._allowed.get(key)
        now = time.monotonic()
        if remembered is not None and remembered[0] > now:
            metrics.auth_reused()
            return remembered[1]
        self.probes += 1
        asked_after = self._changes
        answer = await self._backend.authorize(image_id, creds)
        latest = max(self._changed_at.get(image_id, 0), self._cleared_at)
        changed = latest > asked_after
        if answer.decision is Decision.ALLOW and self._ttl > 0 and not changed:
            if len(self._allowed) >= _MAX_REMEMBERED:
                self._expire(now)
            self._allowed[key] = (now + self._ttl, answer)
        else:
            self._allowed.pop(key, None)
        return answer

    def forget(self, image_id: str) -> None:
        """Drop every remembered answer about ``image_id`` (it changed through us), and
        keep any probe already in flight from storing its answer."""
        if self._ttl <= 0:
            return
        self._changes += 1
        if len(self._changed_at) >= _MAX_REMEMBERED:
            # Forgetting which image changed when: forget every answer instead.
            self._changed_at.clear()
            self._allowed.clear()
            self._cleared_at = self._changes
        self._changed_at[image_id] = self._changes
        for key in [k for k in self._allowed if k[1] == image_id]:
            del self._allowed[key]

    def _expire(self, now: float) -> None:
        for key in [k for k, (until, _) in self._allowed.items() if until <= now]:
            del self._allowed[key]
        if len(self._allowed) >= _MAX_REMEMBERED:
            self._allowed.clear()
